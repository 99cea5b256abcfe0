"""KV caches of ``transformers`` models, split per microbatch for ``CoopDBORunner``.

Importing this module registers ``transformers.cache_utils.Cache`` with the split layer
(``coop_dbo.split.register_split_type``), so a cache passed to a wrapped model is split
into one cache per microbatch and merged back into the caller's object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..errors import SplitError
from ..split import offsets_of, register_split_type

__all__ = ["split_cache", "merge_caches", "cache_fingerprint", "cache_snapshot"]


_GIVEN = "_coop_dbo_given"  # on a split part: per layer, {attr: tensor handed out}


def _check_cache(cache: Any, batch: int) -> None:
    from transformers.cache_utils import CacheLayerMixin, DynamicLayer, StaticLayer

    name = type(cache).__qualname__
    hint = ("pass split=/merge= to CoopDBORunner that give each microbatch its own cache "
            "(or use DynamicCache / StaticCache)")
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise SplitError(f"CoopDBORunner cannot split a {name}: it has no list of layers; "
                         f"{hint}.")
    for i, layer in enumerate(layers):
        ok = isinstance(layer, CacheLayerMixin) and isinstance(layer, (DynamicLayer, StaticLayer))
        if not ok or type(layer).__name__.startswith(("Quantized", "Quanto", "HQQ")):
            raise SplitError(f"CoopDBORunner cannot split layer {i} of a {name}: "
                             f"{type(layer).__qualname__} is not a plain dynamic or static KV "
                             f"layer; {hint}.")
        if getattr(layer, "is_initialized", False) and isinstance(layer.keys, torch.Tensor) \
                and layer.keys.dim() >= 1 and layer.keys.numel() and layer.keys.shape[0] != batch:
            raise SplitError(f"the {name} passed to CoopDBORunner holds a batch of "
                             f"{layer.keys.shape[0]} sequences but the inputs have {batch}: "
                             "pass the cache that belongs to these inputs.")
    for attr, v in vars(cache).items():
        if attr != "layers" and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch:
            raise SplitError(f"CoopDBORunner cannot split a {name}: its attribute {attr!r} "
                             f"holds per-sequence state; {hint}.")


def split_cache(cache: Any, sizes: list[int], batch: int) -> list[Any]:
    """One cache per microbatch, made of views of ``cache``'s rows (no copy).

    Works for ``transformers`` caches whose state is a list of ``DynamicLayer`` /
    ``StaticLayer`` (and subclasses: sliding-window, indexed) layers, e.g. ``DynamicCache``
    and ``StaticCache``. Each part is a shallow copy of the cache and of each layer, with
    every tensor attribute of batch dim 0 (keys, values ``[B, heads, seq, head_dim]``)
    sliced to the microbatch's rows and every other tensor attribute cloned (e.g. a static
    layer's ``cumulative_length``). Static layers then write into the caller's tensors in
    place; dynamic layers make new ones, which ``merge_caches`` concatenates back.
    """
    _check_cache(cache, batch)
    parts = []
    for lo, hi in offsets_of(sizes):
        part = copy.copy(cache)
        part.layers = []
        given: list[dict[str, torch.Tensor]] = []
        for layer in cache.layers:
            new = copy.copy(layer)
            g: dict[str, torch.Tensor] = {}
            for attr, v in vars(layer).items():
                if isinstance(v, torch.Tensor):
                    if v.dim() >= 1 and v.shape[0] == batch:
                        g[attr] = v[lo:hi]
                        setattr(new, attr, g[attr])
                    else:
                        setattr(new, attr, v.clone())
                elif attr == "batch_size" and isinstance(v, int):
                    setattr(new, attr, hi - lo)
            part.layers.append(new)
            given.append(g)
        part.__dict__[_GIVEN] = given
        parts.append(part)
    return parts


def merge_caches(parts: list[Any], original: Any = None) -> Any:
    """Merge the per-microbatch caches of one step; returns ``original`` updated in place.

    ``original`` is the cache ``split_cache`` split (the caller's object, which
    ``generate`` keeps using), or ``None`` when each microbatch made its own cache (then a
    new cache of the same class is returned). Per layer and attribute: batch tensors that a
    static layer updated in place are left as they are; other batch tensors are
    concatenated along dim 0; 0-d tensors are copied into the original's tensor (keeping
    its address); ``batch_size`` is summed; everything else is taken from microbatch 0
    (equal in every microbatch: they advance by the same number of positions).
    """
    first = parts[0]
    n_layers = len(first.layers)
    if any(len(p.layers) != n_layers for p in parts):
        raise SplitError("microbatch caches have different numbers of layers "
                         f"({[len(p.layers) for p in parts]}): every microbatch must run "
                         "every layer.")
    if original is None:
        target = copy.copy(first)
        target.__dict__.pop(_GIVEN, None)
        target.layers = []
    else:
        target = original
    for i in range(n_layers):
        pls = [p.layers[i] for p in parts]
        given = [p.__dict__.get(_GIVEN, []) for p in parts]
        given_i = [g[i] if i < len(g) else {} for g in given]
        if i < len(target.layers):
            t = target.layers[i]
        else:
            t = copy.copy(pls[0])
            target.layers.append(t)
        for attr, v0 in vars(pls[0]).items():
            vals = [vars(pl).get(attr) for pl in pls]
            if isinstance(v0, torch.Tensor) and v0.dim() >= 1:
                if all(g.get(attr) is v for g, v in zip(given_i, vals, strict=True)):
                    continue  # written in place into the caller's tensor
                if not all(isinstance(v, torch.Tensor) for v in vals):
                    raise SplitError(f"cache layer {i} attribute {attr!r} is a tensor in "
                                     "some microbatches only.")
                setattr(t, attr, torch.cat(vals, 0))
            elif isinstance(v0, torch.Tensor):
                cur = vars(t).get(attr)
                if isinstance(cur, torch.Tensor) and cur is not v0 and cur.shape == v0.shape \
                        and cur.device == v0.device and cur.dtype == v0.dtype:
                    cur.copy_(v0)
                else:
                    setattr(t, attr, v0)
            elif attr == "batch_size" and isinstance(v0, int):
                setattr(t, attr, sum(int(v) for v in vals))
            else:
                setattr(t, attr, v0)
    return target


# -- CUDA graphs over a cache ------------------------------------------------------------

# Attention layers' keys and values: a step writes its token's row at its position, so a
# warm-up run repeats a write (or writes one position ahead, which the next step overwrites
# before any step reads it). Everything else a step may advance (position counters,
# recurrent and convolution states) is saved and restored around warm-up.
_IDEMPOTENT_ATTRS = frozenset({"keys", "values"})


def cache_fingerprint(cache: Any) -> tuple | None:
    """Where a cache's tensors live, for CUDA graphs; ``None`` for a cache that grows by
    reallocating (a dynamic cache) or is not initialised yet, which cannot be replayed."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None
    if not all(getattr(layer, "is_compileable", False) and getattr(layer, "is_initialized",
                                                                    False)
               for layer in layers):
        return None
    return tuple((i, attr, v.data_ptr(), tuple(v.shape), v.dtype)
                 for i, layer in enumerate(layers) for attr, v in vars(layer).items()
                 if isinstance(v, torch.Tensor))


def cache_snapshot(cache: Any) -> Callable[[], None]:
    """Save what a step advances in ``cache`` (see ``_IDEMPOTENT_ATTRS``); the returned
    function puts it back in place (same tensors, so a captured graph stays valid)."""
    saved = [(v, v.clone()) for layer in cache.layers for attr, v in vars(layer).items()
             if isinstance(v, torch.Tensor) and attr not in _IDEMPOTENT_ATTRS]

    def restore() -> None:
        for live, copy_ in saved:
            live.copy_(copy_)
    return restore


# transformers is not imported here: the registry matches the class by its qualified name.
register_split_type("transformers.cache_utils.Cache", split_cache, merge_caches,
                    fingerprint=cache_fingerprint, snapshot=cache_snapshot)
