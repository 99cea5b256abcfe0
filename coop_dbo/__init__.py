"""coop-dbo: Dual-Batch Overlap for PyTorch MoE models, driven by greenlets on one thread.

The data path, top to bottom: ``runner`` takes one call and decides its path; ``split``
cuts the batch into microbatches; each microbatch runs in its own greenlet
(``greenlet_sched``, with its CUDA streams in ``streams``); MoE hooks yield inside the
all-to-all and hand tensors between streams safely (``moe_hooks``), moving tokens through a
backend (``backends``); the step runs as a captured CUDA graph or eagerly
(``cudagraph_capture``); ``split`` merges the outputs. ``hf`` fits transformers models,
``trace`` records and prints the yields, ``errors`` holds every exception.
"""

from .errors import (
    CaptureError,
    CoopDBOError,
    GroupBrokenError,
    PeerRankError,
    ScheduleMismatchError,
    SchedulerStateError,
    SplitError,
    StepTimeoutError,
    UnsupportedModelError,
    YieldAsymmetryError,
)
from .greenlet_sched import (
    UBatchScheduler,
    dbo_current_ubatch_id,
    dbo_yield,
    dbo_yield_and_switch,
)
from .hf import install_moe_hooks, remove_moe_hooks
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
    "ScheduleMismatchError",
    "StepTimeoutError",
    "PeerRankError",
    "GroupBrokenError",
    "TraceEntry",
    "print_trace",
    "format_trace",
    "CoopDBORunner",
    "install_moe_hooks",
    "remove_moe_hooks",
]

__version__ = "0.1.0"
