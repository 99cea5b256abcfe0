"""coop-dbo: Dual-Batch Overlap for PyTorch MoE models, driven by greenlets on one thread.

The data path, top to bottom: a batch is split into microbatches (``runner``), each
microbatch runs in its own greenlet (``greenlet_sched``), MoE hooks yield inside the
all-to-all and switch streams (``moe_hooks``, ``streams``), the step runs as a captured
CUDA graph or eagerly (``cudagraph_capture``), and the outputs are merged (``runner``).
"""

from .errors import (
    CaptureError,
    CoopDBOError,
    SchedulerStateError,
    SplitError,
    UnsupportedModelError,
    YieldAsymmetryError,
)
from .greenlet_sched import (
    UBatchScheduler,
    dbo_current_ubatch_id,
    dbo_yield,
    dbo_yield_and_switch,
)
from .hf_moe import install_moe_hooks, remove_moe_hooks
from .runner import CoopDBORunner
from .trace import TraceEntry, format_trace, print_trace

__all__ = [
    "UBatchScheduler",
    "dbo_yield",
    "dbo_yield_and_switch",
    "dbo_current_ubatch_id",
    "YieldAsymmetryError",
    "SchedulerStateError",
    "CoopDBOError",
    "CaptureError",
    "UnsupportedModelError",
    "SplitError",
    "TraceEntry",
    "print_trace",
    "format_trace",
    "CoopDBORunner",
    "install_moe_hooks",
    "remove_moe_hooks",
]

__version__ = "0.1.0"
