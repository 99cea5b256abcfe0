"""Split a batch into microbatches, pad it to a captured size, merge outputs back.

Used by the CUDA-graph step runner and by ``CoopDBORunner``: one implementation of
"balanced split along dim 0" and "concatenate back in order" for tensors and for nested
tuples, lists, dicts and transformers ``ModelOutput``s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import SplitError

__all__ = [
    "balanced_sizes",
    "split_tensors",
    "merge_outputs",
    "pad_rows",
    "map_tensors",
    "split_along_batch",
    "merge_outputs_with",
    "offsets_of",
]


def balanced_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total``, differing by at most one, larger ones first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}.")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_tensors(tensors: Sequence[torch.Tensor], parts: int) -> list[tuple[torch.Tensor, ...]]:
    """Split every tensor along dim 0 into the same balanced sizes (views, no copies)."""
    if not tensors:
        raise SplitError("nothing to split: pass at least one tensor whose dim 0 is the batch.")
    total = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != total:
            raise SplitError(f"input {i} has shape {tuple(t.shape)}, but the batch is "
                             f"{total}: every split input needs the batch as dim 0.")
    sizes = balanced_sizes(total, parts)
    return list(zip(*(t.split(sizes) for t in tensors)))


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested structure, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(**items)  # ModelOutput and dataclass-like mappings
        except TypeError:
            return type(obj)(items) if not isinstance(obj, dict) else items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def merge_outputs(outputs: Sequence[Any], dim: int = 0) -> Any:
    """Concatenate per-microbatch outputs of the same structure along ``dim``.

    Tensors are concatenated; tuples, lists, dicts and ``ModelOutput``s are merged field
    by field (their keys and lengths must agree); ``None`` stays ``None``; other values
    must be equal in every microbatch.
    """
    return merge_outputs_with(outputs, None, dim)


def _merge_leaf(outputs: Sequence[Any], dim: int) -> Any:
    """The leaf rule of ``merge_outputs``: cat tensors, keep ``None`` and equal values."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            raise SplitError("cannot merge 0-d tensor outputs of microbatches (a loss or "
                             "a scalar?): pass a merge function for this model.")
        return torch.cat(list(outputs), dim=dim)
    if first is None or all(o == first for o in outputs[1:]):
        return first
    raise SplitError(f"cannot merge outputs of type {type(first).__name__} that differ "
                     "between microbatches: pass a merge function.")


def pad_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` grown to ``size`` rows by repeating its last row (edge padding)."""
    n = t.shape[0]
    if n == size:
        return t
    if n == 0:
        raise SplitError("cannot pad an empty batch.")
    return torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])])


# -- nested split / merge for CoopDBORunner ----------------------------------------------

def offsets_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` row ranges of consecutive parts of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def split_along_batch(obj: Any, sizes: Sequence[int], batch: int) -> list[Any]:
    """Split ``obj`` into ``len(sizes)`` parts along the batch dimension (views, no copies).

    Every tensor of at least one dimension whose dim 0 equals ``batch`` is sliced into rows
    ``sizes[0], sizes[1], ...``; tuples, lists, dicts (and namedtuples) are split element
    by element; everything else (0-d tensors, tensors of another dim 0, scalars, ``None``)
    is shared by all parts as it is.

    Args:
        obj: a tensor or a nested structure of them.
        sizes: rows per part, summing to ``batch``.
        batch: the batch size (dim 0 of the split tensors).
    Returns:
        ``len(sizes)`` objects of the structure of ``obj``.
    """
    if sum(sizes) != batch:
        raise ValueError(f"sizes {list(sizes)} must sum to the batch {batch}.")
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 1 and obj.shape[0] == batch:
            return list(obj.split(list(sizes)))
        return [obj] * len(sizes)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        cols = [split_along_batch(v, sizes, batch) for v in obj]
        return [type(obj)(*(c[i] for c in cols)) for i in range(len(sizes))]
    if isinstance(obj, (tuple, list)):
        cols = [split_along_batch(v, sizes, batch) for v in obj]
        return [type(obj)(c[i] for c in cols) for i in range(len(sizes))]
    if isinstance(obj, dict):
        cols = {k: split_along_batch(v, sizes, batch) for k, v in obj.items()}
        return [type(obj)((k, c[i]) for k, c in cols.items()) if type(obj) is not dict
                else {k: c[i] for k, c in cols.items()} for i in range(len(sizes))]
    return [obj] * len(sizes)


def merge_outputs_with(outputs: Sequence[Any], leaf: Any = None, dim: int = 0) -> Any:
    """``merge_outputs`` with a hook for values it cannot merge itself.

    ``leaf(values) -> merged`` is called first on every list of corresponding values that
    is neither a tensor, ``None``, a mapping, a tuple nor a list (e.g. a KV-cache object);
    it returns ``NotImplemented`` to fall back to ``merge_outputs``' rule (equal values
    are kept, different ones raise ``SplitError``).
    """
    first = outputs[0]
    if isinstance(first, torch.Tensor) or first is None:
        return _merge_leaf(outputs, dim)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for o in outputs[1:]:
            if list(o.keys()) != keys:
                raise SplitError(f"microbatch outputs have different keys ({keys} and "
                                 f"{list(o.keys())}): pass a merge function.")
        merged = {k: merge_outputs_with([o[k] for o in outputs], leaf, dim) for k in keys}
        try:
            return type(first)(**merged)
        except TypeError:
            return merged
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge_outputs_with([o[i] for o in outputs], leaf, dim)
                             for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        if any(len(o) != len(first) for o in outputs):
            raise SplitError("microbatch outputs are sequences of different lengths: pass a "
                             "merge function.")
        return type(first)(merge_outputs_with([o[i] for o in outputs], leaf, dim)
                           for i in range(len(first)))
    if leaf is not None:
        merged = leaf(list(outputs))
        if merged is not NotImplemented:
            return merged
    return _merge_leaf(outputs, dim)
