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

__all__ = ["balanced_sizes", "split_tensors", "merge_outputs", "pad_rows", "map_tensors"]


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
    by field; ``None`` stays ``None``; other values must be equal in every microbatch.
    """
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            raise SplitError("cannot merge 0-d tensor outputs of microbatches (a loss or "
                             "a scalar?): pass a merge function for this model.")
        return torch.cat(list(outputs), dim=dim)
    if first is None:
        return None
    if isinstance(first, Mapping):
        keys = list(first.keys())
        merged = {k: merge_outputs([o[k] for o in outputs], dim) for k in keys}
        try:
            return type(first)(**merged)
        except TypeError:
            return merged
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge_outputs([o[i] for o in outputs], dim)
                             for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(merge_outputs([o[i] for o in outputs], dim)
                           for i in range(len(first)))
    if all(o == first for o in outputs[1:]):
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
