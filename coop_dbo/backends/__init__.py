"""Communication backends for ``moe_exchange``: the contract (``base``) and one module per
backend.

=============================  =========  ==================================================
backend                        schedule   what it is
=============================  =========  ==================================================
``SingleProcessBackend``       switch     expert parallelism of size 1 with a simulated
                                          transfer time (``single_process``)
``TorchDistributedBackend``    switch     all-to-all over ``torch.distributed``
                                          (``torch_dist``)
``DeepEPLowLatencyBackend``    hook       deep_ep's low-latency kernels with receive hooks
                                          (``deep_ep``)
=============================  =========  ==================================================

``FlatAllToAllBackend`` (``flat``) is the layout the first two share; subclass it, or
``MoEBackend`` (``base``), for another transport.
"""

from .base import SAME_STREAM, ExpertBatch, MoEBackend, validate_routing
from .deep_ep import DeepEPLowLatencyBackend
from .flat import FlatAllToAllBackend
from .single_process import SingleProcessBackend
from .torch_dist import TorchDistributedBackend

__all__ = [
    "MoEBackend",
    "ExpertBatch",
    "validate_routing",
    "SAME_STREAM",
    "FlatAllToAllBackend",
    "SingleProcessBackend",
    "TorchDistributedBackend",
    "DeepEPLowLatencyBackend",
]
