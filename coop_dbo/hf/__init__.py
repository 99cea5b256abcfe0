"""The ``transformers`` integration: MoE-block adapters (``adapters``) and KV-cache
splitting (``cache``, registered with the split layer on import).

``install_moe_hooks(model)`` routes a model's MoE blocks through ``moe_exchange``;
``remove_moe_hooks(model)`` restores them. transformers itself is imported only when a
cache is checked, never at import time.
"""

from .adapters import (
    FusedExpertsAdapter,
    MoEAdapter,
    MoEHooks,
    fused_experts_fn,
    install_moe_hooks,
    register_moe_adapter,
    remove_moe_hooks,
    unregister_moe_adapter,
)
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
    "split_cache",
    "merge_caches",
]
