"""The ``transformers`` integration: MoE hooks (``adapters``: found by structure, at the
unified experts interface; ``blocks``: adapters for the blocks that differ) and cache
splitting (``cache``, registered with the split layer on import).

``install_moe_hooks(model)`` routes a model's MoE blocks through ``moe_exchange``;
``remove_moe_hooks(model)`` restores them. transformers itself is imported only when a
cache is checked, never at import time.
"""

from .adapters import (
    FusedExpertsAdapter,
    MoEAdapter,
    MoEHooks,
    SharedBesideDispatch,
    experts_interface_mismatch,
    fused_experts_fn,
    install_moe_hooks,
    register_moe_adapter,
    remove_moe_hooks,
    shared_experts_of,
    unregister_moe_adapter,
    uses_experts_interface,
)
from .blocks import LocalBlockAdapter
from .cache import merge_caches, split_cache

__all__ = [
    "MoEAdapter",
    "FusedExpertsAdapter",
    "MoEHooks",
    "install_moe_hooks",
    "remove_moe_hooks",
    "register_moe_adapter",
    "unregister_moe_adapter",
    "fused_experts_fn",
    "experts_interface_mismatch",
    "uses_experts_interface",
    "SharedBesideDispatch",
    "shared_experts_of",
    "LocalBlockAdapter",
    "split_cache",
    "merge_caches",
]
