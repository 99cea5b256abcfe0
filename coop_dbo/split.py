"""The split layer: one batch into microbatches, and their outputs back into one.

Used by ``CoopDBORunner`` (any call: nested arguments, KV caches, user split functions)
and by ``DBOGraphRunner`` (tensors only). The rules, stated once:

* **Per-argument rule.** ``CoopDBORunner(per_row={name or position: bool})`` states it
  for an argument: ``True``, its tensors are per row (dim 0 must be the batch);
  ``False``, it is passed whole to every microbatch. Arguments it does not name follow
  the rules below. Shapes cannot tell a per-row tensor from one whose dim 0 only equals
  the batch by chance (a ``[4, 4]`` weight at batch 4): say which with ``per_row``.
* **Batch size.** The batch size is dim 0 of the first tensor of at least one dimension
  in the arguments ``per_row`` marks ``True``, else in all arguments but those marked
  ``False``, in call order (positional first, then keyword), looking into tuples, lists,
  dicts and namedtuples (``torch.utils._pytree``'s containers); ``nn.Parameter``s (model
  state, never per row) do not count.
* **Split.** Every tensor whose dim 0 equals the batch is sliced into consecutive rows of
  the microbatch sizes (views, no copies), except ``nn.Parameter``s and arguments marked
  ``False``; every other tensor (0-d, another dim 0) and every value that holds no tensor
  (``None``, numbers, flags, modules) is passed to every microbatch as it is. Containers
  are split element by element and rebuilt. A type registered with
  ``register_split_type`` (a transformers KV cache is registered by ``coop_dbo.hf``) is
  split by its own function. Any other object that holds tensors raises ``SplitError``
  naming the argument.
* **Merge.** The microbatches' outputs must have one structure, and each value is merged
  by what it is in every microbatch, given the rows of each microbatch:

  - a tensor whose dim 0 is its microbatch's row count in every microbatch is per row:
    the tensors are concatenated along dim 0 in microbatch order;
  - any other tensor (0-d, a fixed shape) is per step: it must be the same (shape,
    dtype, values) in every microbatch, and the merge is that tensor;
  - a list whose length is its microbatch's row count in every microbatch, and whose
    items are not per-row tensors themselves, is a list of per-row items: the lists are
    concatenated; a list of one length in every microbatch is merged item by item;
  - tuples, namedtuples, dicts and ``ModelOutput``s are merged item by item;
  - a registered type is merged by its own function (into the object that was split,
    when it was an argument); any other value must be equal in every microbatch.

  A value that fits none of these (a per-step tensor or value that differs between
  microbatches, such as a loss; a list of other lengths) raises ``SplitError`` naming it:
  pass ``merge=``. When all microbatches have the same row count, a per-step tensor
  whose dim 0 equals that count (or a per-step list of that length) cannot be told from
  a per-row one and is merged as per row; such a model needs ``merge=`` too. Per-token
  outputs flattened over rows (``[rows * tokens, ...]``) are not per row either.
* **Sizes.** ``balanced_sizes``: sizes differing by at most one, larger ones first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import SplitError

__all__ = [
    "balanced_sizes",
    "offsets_of",
    "pad_rows",
    "map_tensors",
    "split_tensors",
    "merge_outputs",
    "num_tokens_of",
    "SplitType",
    "register_split_type",
    "SplitPlan",
    "StaticCall",
    "HashedTuple",
    "DefaultSplitter",
    "FunctionSplitter",
    "SplitFn",
    "MergeFn",
]

#: ``split(args, kwargs, sizes) -> [(args_i, kwargs_i) per microbatch]``.
SplitFn = Callable[[tuple, dict, list[int]], Sequence[tuple[tuple, dict]]]
#: ``merge(outputs) -> output``.
MergeFn = Callable[[list[Any]], Any]


# -- sizes and rows -----------------------------------------------------------------------

class HashedTuple(tuple):
    """A tuple whose hash is computed once, when it is made. A ``StaticCall.key`` holds
    state fingerprints as long as the model is deep, and a replayed step looks its key up
    several times: a plain tuple would hash every element each time (host time growing
    with the number of layers). Equal to, and hashing like, the plain tuple."""

    _hash: int

    def __new__(cls, items: Any = ()) -> HashedTuple:
        self = super().__new__(cls, items)
        self._hash = tuple.__hash__(self)
        return self

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type, tuple[tuple]]:
        # (hashed again when unpickled: a string's hash differs from process to process)
        return type(self), (tuple(self),)


def balanced_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total``, differing by at most one, larger ones first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}.")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` row ranges of consecutive parts of the given sizes."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def pad_rows(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` grown to ``size`` rows by repeating its last row (edge padding)."""
    n = t.shape[0]
    if n == size:
        return t
    if n == 0:
        raise SplitError("cannot pad an empty batch.")
    return torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])])


def unpad_rows(out: Any, rows: int, batch: int, objects: Mapping[int, Any] | None = None
               ) -> Any:
    """``out`` of a call padded from ``batch`` to ``rows`` rows, for the caller: every
    tensor of ``rows`` rows (dim 0, the merge's per-row rule) cut to its first ``batch``,
    and every object whose id is in ``objects`` (a padded state object) replaced by the
    value there (the caller's)."""
    objects = objects or {}
    leaves, spec = _flatten(out)
    return pytree.tree_unflatten([
        v[:batch] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
        else objects.get(id(v), v) for v in leaves], spec)


def num_tokens_of(t: torch.Tensor) -> int:
    """Tokens of a batch tensor: all its elements for token ids (integer ``[B]`` or
    ``[B, L]``), all rows but the hidden dim for activations (floating ``[B, ..., H]``)."""
    if t.dim() == 0:
        return 0
    if t.is_floating_point() or t.is_complex():
        n = 1
        for s in t.shape[:-1] if t.dim() > 1 else t.shape:
            n *= int(s)
        return n
    return t.numel()


# -- registered types ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitType:
    """How to split and merge one argument type that holds per-row state.

    Attributes:
        split: ``split(obj, sizes, batch) -> [part per microbatch]``.
        merge: ``merge(parts, original) -> merged``; ``original`` is the object that was
            split into the parts, or ``None`` when the model made them itself.
        fingerprint: for CUDA graphs: ``fingerprint(obj) -> hashable`` that changes
            whenever the object's tensors move (new allocations, other shapes), or
            ``None`` when the object cannot be captured as it is (e.g. a cache that grows
            by reallocating). Without it, calls holding such an object never replay.
        snapshot: for CUDA graphs: ``snapshot(obj) -> restore()`` saving the state a
            step advances (e.g. a cache's position counters), so that the warm-up runs
            before a capture leave no trace.
        pad: for CUDA graphs of a batch size that was not captured: ``pad(obj, rows,
            batch) -> (padded, sync)``, ``padded`` with ``rows > batch`` rows, the first
            ``batch`` of which are ``obj``'s own state (same memory: ``obj`` is rebound
            to them) and the others scratch, the same object each time for one ``obj``
            and ``rows``; ``sync()``, called after each padded step, hands ``obj`` what
            the step assigned on ``padded``. ``None`` when it cannot be padded. Without
            it, such calls never replay padded.
    """

    split: Callable[[Any, list[int], int], list[Any]]
    merge: Callable[[list[Any], Any], Any]
    fingerprint: Callable[[Any], Hashable | None] | None = None
    snapshot: Callable[[Any], Callable[[], None]] | None = None
    pad: Callable[[Any, int, int], tuple[Any, Callable[[], None]] | None] | None = None


# Keys are classes or "module.QualName" strings, matched along the MRO: a string key lets
# an integration register a type without importing the library that defines it.
_SPLIT_TYPES: dict[type | str, SplitType] = {}


def register_split_type(cls: type | str, split: Callable[[Any, list[int], int], list[Any]],
                        merge: Callable[[list[Any], Any], Any], *,
                        fingerprint: Callable[[Any], Hashable | None] | None = None,
                        snapshot: Callable[[Any], Callable[[], None]] | None = None,
                        pad: Callable[[Any, int, int],
                                      tuple[Any, Callable[[], None]] | None] | None = None
                        ) -> None:
    """Teach the default splitter an argument type that holds per-row state.

    Args:
        cls: the type, or its ``"module.QualName"`` (subclasses match too).
        split: ``split(obj, sizes, batch) -> list`` of one object per microbatch.
        merge: ``merge(parts, original) -> merged``; ``parts`` are the corresponding
            objects of the microbatches' outputs (one per microbatch); ``original`` is the
            object that was split into them, or ``None`` when the model made them itself.
        fingerprint / snapshot: what a call holding such an object needs to be captured
            as a CUDA graph (see ``SplitType``); leave them out for objects that cannot.
        pad: what it needs to replay a larger captured batch size (``SplitType.pad``);
            only with ``fingerprint`` and ``snapshot``.
    """
    if not (isinstance(cls, (type, str)) and callable(split) and callable(merge)):
        raise TypeError("register_split_type(cls, split, merge) takes a type (or its "
                        "'module.QualName') and two functions.")
    if (fingerprint is None) != (snapshot is None):
        raise TypeError("register_split_type: pass both fingerprint= and snapshot= (a "
                        "capturable type) or neither.")
    if pad is not None and fingerprint is None:
        raise TypeError("register_split_type: pad= needs fingerprint= and snapshot= (only a "
                        "capturable type can be padded for a graph).")
    _SPLIT_TYPES[cls] = SplitType(split, merge, fingerprint, snapshot, pad)


def split_type_of(obj: Any) -> SplitType | None:
    """The registered ``SplitType`` of ``obj``'s class or nearest base, else ``None``."""
    for cls in type(obj).__mro__:
        entry = _SPLIT_TYPES.get(cls) or _SPLIT_TYPES.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


def _is_leaf(obj: Any) -> bool:
    """Registered types stay whole even where pytree knows them as containers."""
    return split_type_of(obj) is not None


def _flatten(obj: Any) -> tuple[list[Any], pytree.TreeSpec]:
    return pytree.tree_flatten(obj, is_leaf=_is_leaf)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nested structure, keeping the structure."""
    leaves, spec = _flatten(obj)
    return pytree.tree_unflatten([fn(v) if isinstance(v, torch.Tensor) else v
                                  for v in leaves], spec)


_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                torch.memory_format, torch.layout, type, slice, range)


def _holds_tensor(obj: Any, depth: int = 3) -> bool:
    """Whether ``obj`` holds a tensor within ``depth`` levels of attributes / items."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or isinstance(obj, (*_PLAIN_TYPES, nn.Module)) or callable(obj):
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth - 1) for v in obj.values())
    if isinstance(obj, (tuple, list, set, frozenset)):
        return any(_holds_tensor(v, depth - 1) for v in obj)
    values = list(getattr(obj, "__dict__", {}).values())
    for slot in getattr(type(obj), "__slots__", ()):
        if isinstance(slot, str) and hasattr(obj, slot):
            values.append(getattr(obj, slot))
    return any(_holds_tensor(v, depth - 1) for v in values)


# -- tensors only (the graph path) -------------------------------------------------------

def split_tensors(tensors: Sequence[torch.Tensor], parts: int) -> list[tuple[torch.Tensor, ...]]:
    """Split every tensor along dim 0 into the same balanced sizes (views, no copies)."""
    if not tensors:
        raise SplitError("nothing to split: pass at least one tensor whose dim 0 is the batch.")
    total = tensors[0].shape[0] if tensors[0].dim() else -1
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != total:
            raise SplitError(f"input {i} has shape {tuple(t.shape)}, but the batch is "
                             f"{total}: every split input needs the batch as dim 0.")
    sizes = balanced_sizes(total, parts)
    return list(zip(*(t.split(sizes) for t in tensors), strict=True))


# -- merge --------------------------------------------------------------------------------

LeafMerge = Callable[[list[Any]], Any]


_MERGE_HINT = ("pass merge=<fn(outputs) -> output> to CoopDBORunner (outputs: one per "
               "microbatch, in order).")


def _where(path: str) -> str:
    return f"output{path}" if path else "the output"


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a.isnan(), b.isnan())
                    and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return bool(torch.equal(a, b))


def _per_row(t: Any, rows: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == rows


def _merge_tensors(values: list[torch.Tensor], sizes: Sequence[int], path: str
                   ) -> torch.Tensor:
    if all(_per_row(v, n) for v, n in zip(values, sizes, strict=True)):
        return torch.cat(values, dim=0)
    first = values[0]
    if all(isinstance(v, torch.Tensor) and _same_tensor(v, first) for v in values[1:]):
        return first
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
              for v in values]
    raise SplitError(
        f"cannot merge {_where(path)}: in the microbatches (rows {list(sizes)}) it has shapes "
        f"{shapes}, so it is not per row (dim 0 = the microbatch's rows), and it differs "
        "between microbatches, so it is not one value for the whole batch either (a loss, "
        f"a statistic of the rows?): {_MERGE_HINT}")


def _merge_lists(values: list[Any], sizes: Sequence[int], leaf: LeafMerge | None,
                 path: str) -> list[Any]:
    if not all(type(v) is list for v in values):
        raise SplitError(f"cannot merge {_where(path)}: it is a list in microbatch 0 but "
                         f"{[type(v).__name__ for v in values]} in the others: "
                         f"{_MERGE_HINT}")
    lengths = [len(v) for v in values]
    if lengths == list(sizes) and not any(
            all(_per_row(v[i], n) for v, n in zip(values, sizes, strict=True))
            for i in range(min(lengths))):
        return [item for v in values for item in v]  # one item per row
    if len(set(lengths)) == 1:
        return [_merge_value([v[i] for v in values], sizes, leaf, f"{path}[{i}]")
                for i in range(lengths[0])]
    raise SplitError(f"cannot merge {_where(path)}: a list of {lengths} items in the "
                     f"microbatches (rows {list(sizes)}), neither one item per row nor one "
                     f"length in every microbatch: {_MERGE_HINT}")


def _merge_value(values: list[Any], sizes: Sequence[int], leaf: LeafMerge | None,
                 path: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return _merge_tensors(values, sizes, path)
    if leaf is not None:
        merged = leaf(values)
        if merged is not NotImplemented:
            return merged
    st = split_type_of(first)
    if st is not None:
        return st.merge(values, None)
    if type(first) is list:
        return _merge_lists(values, sizes, leaf, path)
    leaves = [_flatten_one_level(v) for v in values]
    if leaves[0] is not None:  # a tuple, dict, namedtuple, ModelOutput...
        spec = leaves[0][1]
        for other in leaves[1:]:
            if other is None or other[1] != spec:
                raise SplitError(f"microbatch outputs have different structures at "
                                 f"{_where(path)} ({spec} and "
                                 f"{other[1] if other else type(other).__name__}): "
                                 f"{_MERGE_HINT}")
        merged_children = [
            _merge_value([lv[0][i][1] for lv in leaves], sizes, leaf,  # type: ignore[index]
                         path + leaves[0][0][i][0])
            for i in range(len(leaves[0][0]))]
        return pytree.tree_unflatten(merged_children, spec)
    if first is None or all(v is first or v == first for v in values[1:]):
        return first
    raise SplitError(f"cannot merge {_where(path)}: a {type(first).__name__} that differs "
                     f"between microbatches ({values!r}): {_MERGE_HINT}")


def _flatten_one_level(obj: Any) -> tuple[list[tuple[str, Any]], pytree.TreeSpec] | None:
    """``([(key path, child), ...], spec)`` of a pytree container one level down, or
    ``None`` for a leaf (tensors, registered types and lists are handled before)."""
    if _is_leaf(obj) or pytree.tree_is_leaf(obj):
        return None
    children, spec = pytree.tree_flatten_with_path(obj, is_leaf=lambda x: x is not obj)
    return [(pytree.keystr(kp), child) for kp, child in children], spec


def merge_outputs(outputs: Sequence[Any], leaf: LeafMerge | None = None, *,
                  sizes: Sequence[int] | None = None) -> Any:
    """Merge per-microbatch outputs of one structure into one (see the module doc).

    Args:
        outputs: one output per microbatch, in microbatch order.
        leaf: optional ``leaf(values) -> merged`` tried first for every non-tensor value;
            it returns ``NotImplemented`` to fall back to the default rule.
        sizes: the rows of each microbatch (what decides per row). Default: dim 0 of the
            first tensor of each output, for callers whose first output is per row.
    Raises:
        SplitError: outputs the rules cannot merge (names the output and what to do).
    """
    if sizes is None:
        sizes = []
        for o in outputs:
            t = next((v for v in pytree.tree_leaves(o) if isinstance(v, torch.Tensor)
                      and v.dim() >= 1), None)
            sizes.append(int(t.shape[0]) if t is not None else -1)
    if len(sizes) != len(outputs):
        raise ValueError(f"merge_outputs got {len(outputs)} outputs but {len(sizes)} sizes.")
    return _merge_value(list(outputs), sizes, leaf, "")


# -- plans: how one call splits and merges ------------------------------------------------

def _arg_name(key: int | str) -> str:
    return f"positional argument {key}" if isinstance(key, int) else f"argument {key!r}"


class SplitPlan:
    """How one call's arguments split into microbatches, and how its outputs merge.

    Made by a splitter's ``plan(args, kwargs)``. Attributes: ``batch_size``,
    ``num_tokens`` (the token count ``min_tokens`` and the cost model see), ``device`` (of
    the batch tensors, or ``None``), ``graph_ok`` (the call fits the CUDA graph path:
    positional batch tensors only), ``args`` / ``kwargs`` (the call).
    """

    args: tuple
    kwargs: dict
    batch_size: int
    num_tokens: int
    device: torch.device | None
    graph_ok: bool

    def split(self, sizes: list[int]) -> list[tuple[tuple, dict]]:
        raise NotImplementedError

    def merge(self, outputs: list[Any]) -> Any:
        raise NotImplementedError

    def static_call(self, rows: int | None = None) -> StaticCall | None:
        """The call as a ``StaticCall`` for CUDA graphs, or ``None`` when it holds something
        a graph cannot replay (the default: plans of user split functions). ``rows``
        larger than the batch: the call padded to that many rows (per-row tensors by
        repeating their last row, state objects by ``SplitType.pad``), or ``None`` when
        something in it cannot be padded."""
        return None


@dataclasses.dataclass
class StaticCall:
    """A call whose tensors can be copied into static buffers and replayed as a graph.

    Attributes:
        key: equal for calls one graph can replay: the same structure, tensor shapes,
            dtypes and devices, the same state objects at the same addresses
            (``SplitType.fingerprint``) and equal other values.
        tensors: the call's tensors in argument order (what a replay copies in).
        rebuild: ``rebuild(tensors) -> (args, kwargs)``: the call with other tensors of
            the same shapes in their places, state objects and values unchanged.
        snapshots: one ``snapshot() -> restore()`` per state object.
        rows: the batch size the call runs at: the caller's own, or the larger captured
            size it was padded to (``SplitPlan.static_call(rows)``); 0 from a plan that
            does not say.
        finish: ``finish(output) -> output`` for the caller: a padded call's per-row
            outputs cut to the caller's rows and padded state objects replaced by the
            caller's; the identity otherwise.
        states: the ids of the call's state objects (those in ``key``), in order.
    """

    key: Hashable
    tensors: list[torch.Tensor]
    rebuild: Callable[[Sequence[torch.Tensor]], tuple[tuple, dict]]
    snapshots: list[Callable[[], Callable[[], None]]]
    rows: int = 0
    finish: Callable[[Any], Any] = lambda out: out
    states: tuple[int, ...] = ()


def _no_batch_error() -> SplitError:
    return SplitError(
        "CoopDBORunner found no tensor argument with a batch dimension, so it cannot "
        "tell the batch size: pass the batch as a tensor (dim 0 = batch), or pass "
        "split=<fn(args, kwargs, sizes) -> [(args, kwargs) per microbatch]>.")


class _DefaultPlan(SplitPlan):
    """The default rules of the module doc, for one call.

    Args:
        per_row: the per-argument rule, ``{position or keyword: bool}``.
        names: the model's parameter name at each position, so that ``per_row`` may name
            an argument passed by position.
    """

    def __init__(self, args: tuple, kwargs: dict, per_row: dict[int | str, bool] | None = None,
                 names: Sequence[str] = ()) -> None:
        self.args, self.kwargs = args, kwargs
        self.device = None
        self.graph_ok = False
        # Leaves of every argument, keyed by argument (for error messages).
        self._leaves: list[tuple[int | str, list[Any], pytree.TreeSpec]] = [
            (key, *_flatten(v))
            for key, v in [*enumerate(args), *kwargs.items()]]
        self._origin: dict[int, tuple[Any, SplitType]] = {}  # id(part) -> (original, type)
        self._keep: list[Any] = []  # the parts, alive so their ids stay unique
        self._sizes: list[int] | None = None  # rows per microbatch, set by split()
        # The per-argument rule of each argument: True / False / None (the default rules).
        rule = per_row or {}
        self._rule: dict[int | str, bool | None] = {}
        for key, _, _ in self._leaves:
            flag = rule.get(key)
            if flag is None and isinstance(key, int) and key < len(names):
                flag = rule.get(names[key])
            self._rule[key] = flag
        marked = any(self._rule.values())
        first = next(((key, v) for key, leaves, _ in self._leaves for v in leaves
                      if (self._rule[key] if marked else self._rule[key] is not False)
                      and isinstance(v, torch.Tensor) and v.dim() >= 1
                      and not isinstance(v, nn.Parameter)), None)
        if first is None:
            raise _no_batch_error()
        first_key, first_t = first
        self.batch_size = batch = int(first_t.shape[0])
        self.num_tokens = num_tokens_of(first_t)
        self.device = first_t.device
        for key, leaves, _ in self._leaves:
            for v in leaves:
                self._check(key, v, first_key, first_t, batch)
        self.graph_ok = (not kwargs and len(args) > 0 and all(
            self._splits(key, a) for key, a in enumerate(args)))

    def _splits(self, key: int | str, v: Any) -> bool:
        """Whether tensor ``v`` of argument ``key`` is split (per row)."""
        rule = self._rule.get(key)
        return (rule is not False and isinstance(v, torch.Tensor) and v.dim() >= 1
                and v.shape[0] == self.batch_size and not isinstance(v, nn.Parameter))

    def _check(self, key: int | str, v: Any, first_key: int | str, first_t: torch.Tensor,
               batch: int) -> None:
        if isinstance(v, torch.Tensor):
            if self._rule[key] and not self._splits(key, v):
                what = ("an nn.Parameter" if isinstance(v, nn.Parameter) else
                        f"a tensor of shape {tuple(v.shape)}")
                raise SplitError(
                    f"CoopDBORunner(per_row=...) marks {_arg_name(key)} as per row, but it "
                    f"holds {what}, whose dim 0 is not the batch {batch} (from "
                    f"{_arg_name(first_key)}): give it the batch as dim 0, or mark it "
                    "False (passed whole to every microbatch).")
            if self._splits(key, v) and v.device != first_t.device:
                raise SplitError(
                    f"CoopDBORunner got batch inputs on different devices: {_arg_name(key)} "
                    f"is on {v.device} but {_arg_name(first_key)} is on {first_t.device}. "
                    "Move every batch input to the model's device (or pass split= for "
                    "inputs that live on another device on purpose).")
            return
        if split_type_of(v) is None and _holds_tensor(v):
            cls = type(v)
            raise SplitError(
                f"CoopDBORunner's default splitter cannot split {_arg_name(key)} of type "
                f"{cls.__module__}.{cls.__qualname__}: it holds tensors but is not a tensor, "
                "tuple, list or dict, so the runner does not know which of its rows belong "
                "to which microbatch. Pass split=<fn(args, kwargs, sizes) -> [(args, kwargs) "
                "per microbatch]> and merge=<fn(outputs) -> output> to CoopDBORunner, or "
                "teach the default splitter with coop_dbo.split.register_split_type("
                f"{cls.__qualname__}, split, merge).")

    def _split_leaf(self, key: int | str, v: Any, sizes: list[int]) -> list[Any]:
        batch = self.batch_size
        if isinstance(v, torch.Tensor):
            if self._splits(key, v):
                return list(v.split(sizes))
            return [v] * len(sizes)
        if self._rule[key] is False:
            return [v] * len(sizes)
        st = split_type_of(v)
        if st is None:
            return [v] * len(sizes)
        parts = st.split(v, sizes, batch)
        if len(parts) != len(sizes):
            raise SplitError(f"the splitter of {type(v).__name__} returned {len(parts)} parts "
                             f"for {len(sizes)} microbatches.")
        for p in parts:
            self._origin[id(p)] = (v, st)
            self._keep.append(p)
        return parts

    def split(self, sizes: list[int]) -> list[tuple[tuple, dict]]:
        if sum(sizes) != self.batch_size:
            raise ValueError(f"sizes {list(sizes)} must sum to the batch {self.batch_size}.")
        n = len(sizes)
        self._sizes = list(sizes)
        per_arg: list[tuple[int | str, list[Any]]] = []
        for key, leaves, spec in self._leaves:
            columns = [self._split_leaf(key, v, sizes) for v in leaves]
            per_arg.append((key, [pytree.tree_unflatten([c[i] for c in columns], spec)
                                  for i in range(n)]))
        out = []
        for i in range(n):
            args = tuple(parts[i] for key, parts in per_arg if isinstance(key, int))
            kwargs = {key: parts[i] for key, parts in per_arg if isinstance(key, str)}
            out.append((args, kwargs))
        return out

    def static_call(self, rows: int | None = None) -> StaticCall | None:
        batch = self.batch_size
        if rows is None or rows == batch:
            return self._static_call(self._leaves, batch)
        if rows < batch:
            raise ValueError(f"static_call(rows={rows}): a call of {batch} rows can only be "
                             "padded to more rows.")
        originals: dict[int, Any] = {}  # id(padded state object) -> the caller's
        syncs: list[Callable[[], None]] = []
        layout: list[tuple[int | str, list[Any], pytree.TreeSpec]] = []
        for arg, leaves, spec in self._leaves:
            padded: list[Any] = []
            for v in leaves:
                if isinstance(v, torch.Tensor):
                    padded.append(pad_rows(v, rows) if self._splits(arg, v) else v)
                    continue
                st = split_type_of(v) if self._rule[arg] is not False else None
                if st is not None:
                    done = st.pad(v, rows, batch) if st.pad is not None else None
                    if done is None:
                        return None
                    big, sync = done
                    originals[id(big)] = v
                    syncs.append(sync)
                    v = big
                padded.append(v)
            layout.append((arg, padded, spec))

        def finish(out: Any) -> Any:
            for sync in syncs:
                sync()
            return unpad_rows(out, rows, batch, originals)

        return self._static_call(layout, rows, finish)

    @staticmethod
    def _static_call(layout: list[tuple[int | str, list[Any], pytree.TreeSpec]], rows: int,
                     finish: Callable[[Any], Any] | None = None) -> StaticCall | None:
        key: list[Hashable] = []
        tensors: list[torch.Tensor] = []
        snapshots: list[Callable[[], Callable[[], None]]] = []
        states: list[int] = []
        for arg, leaves, spec in layout:
            key.append((arg, repr(spec)))
            for v in leaves:
                if isinstance(v, torch.Tensor):
                    key.append((tuple(v.shape), v.dtype, v.device))
                    tensors.append(v)
                    continue
                st = split_type_of(v)
                if st is not None:
                    fp = st.fingerprint(v) if st.fingerprint is not None else None
                    if fp is None or st.snapshot is None:
                        return None
                    key.append(("state", id(v), fp))
                    states.append(id(v))
                    snapshots.append(functools.partial(st.snapshot, v))
                    continue
                try:
                    hash(v)
                except TypeError:
                    return None
                key.append(("value", type(v), v))

        def rebuild(new: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
            it = iter(new)
            rebuilt = {arg: pytree.tree_unflatten(
                [next(it) if isinstance(v, torch.Tensor) else v for v in leaves], spec)
                for arg, leaves, spec in layout}
            return (tuple(v for k, v in rebuilt.items() if isinstance(k, int)),
                    {k: v for k, v in rebuilt.items() if isinstance(k, str)})

        return StaticCall(HashedTuple(key), tensors, rebuild, snapshots, rows,
                          finish or (lambda out: out), tuple(states))

    def _merge_leaf(self, values: list[Any]) -> Any:
        origin = self._origin.get(id(values[0]))
        if origin is not None:
            original, st = origin
            return st.merge(values, original)
        return NotImplemented

    def merge(self, outputs: list[Any]) -> Any:
        try:
            return merge_outputs(outputs, self._merge_leaf, sizes=self._sizes)
        finally:
            self._origin.clear()
            self._keep.clear()


class DefaultSplitter:
    """The splitter ``CoopDBORunner`` uses unless given ``split=`` (see the module doc).

    Args:
        per_row: ``{position or keyword: bool}``, the per-argument rule of the module doc.
        names: the model's positional parameter names, in order, so that ``per_row`` may
            name an argument that is passed by position.
    """

    def __init__(self, per_row: dict[int | str, bool] | None = None,
                 names: Sequence[str] = ()) -> None:
        self.per_row = dict(per_row or {})
        self.names = tuple(names)

    def plan(self, args: tuple, kwargs: dict) -> SplitPlan:
        return _DefaultPlan(args, kwargs, self.per_row, self.names)


class _FunctionPlan(SplitPlan):
    """A user's ``split`` / ``merge`` functions; the batch comes from the first tensor."""

    def __init__(self, args: tuple, kwargs: dict, split: SplitFn | None,
                 merge: MergeFn | None, default: DefaultSplitter | None = None) -> None:
        self.args, self.kwargs = args, kwargs
        self._split_fn, self._merge_fn = split, merge
        self._default: _DefaultPlan | None = None
        self._sizes: list[int] | None = None  # rows per microbatch, set by split()
        if split is None:  # custom merge only
            per_row, names = (default.per_row, default.names) if default else (None, ())
            self._default = _DefaultPlan(args, kwargs, per_row, names)
            self.batch_size = self._default.batch_size
            self.num_tokens = self._default.num_tokens
            self.device = self._default.device
        else:
            leaves, _ = _flatten((args, kwargs))
            t = next((v for v in leaves if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
            if t is None:
                raise _no_batch_error()
            self.batch_size = int(t.shape[0])
            self.num_tokens = num_tokens_of(t)
            self.device = t.device
        self.graph_ok = False

    def split(self, sizes: list[int]) -> list[tuple[tuple, dict]]:
        if self._split_fn is None:
            assert self._default is not None
            return self._default.split(sizes)
        parts = list(self._split_fn(self.args, self.kwargs, list(sizes)))
        self._sizes = list(sizes)
        if len(parts) != len(sizes):
            raise SplitError(f"split= returned {len(parts)} microbatches for sizes "
                             f"{list(sizes)}: return one (args, kwargs) pair per size.")
        out = []
        for i, p in enumerate(parts):
            if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], (tuple, list))
                    and isinstance(p[1], dict)):
                raise SplitError(f"split= returned {type(p).__name__} for microbatch {i}: "
                                 "return a (args tuple, kwargs dict) pair per microbatch.")
            out.append((tuple(p[0]), p[1]))
        return out

    def merge(self, outputs: list[Any]) -> Any:
        if self._merge_fn is not None:
            return self._merge_fn(outputs)
        if self._default is not None:
            return self._default.merge(outputs)
        return merge_outputs(outputs, sizes=self._sizes)


class FunctionSplitter:
    """A splitter made of a user's ``split`` and / or ``merge`` functions."""

    def __init__(self, split: SplitFn | None, merge: MergeFn | None, *,
                 per_row: dict[int | str, bool] | None = None,
                 names: Sequence[str] = ()) -> None:
        self.split, self.merge = split, merge
        self._default = DefaultSplitter(per_row, names)  # the split when split is None

    def plan(self, args: tuple, kwargs: dict) -> SplitPlan:
        return _FunctionPlan(args, kwargs, self.split, self.merge, self._default)
