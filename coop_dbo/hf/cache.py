"""Caches of ``transformers`` models, split per microbatch for ``CoopDBORunner``.

Importing this module registers ``transformers.cache_utils.Cache`` with the split layer
(``coop_dbo.split.register_split_type``), so a cache passed to a wrapped model is split
into one cache per microbatch and merged back into the caller's object.

**What is split.** A cache, its layers and every cache object inside them (the layers of
an ``EncoderDecoderCache``, ...) are walked attribute by attribute, into dicts, lists and
tuples, so that per-sequence state is found wherever a cache class keeps it: attention
keys and values ``[B, heads, seq, head_dim]``, sliding-window and indexer keys, the
convolution and recurrent states of linear-attention and Mamba layers (dicts of
``[B, ...]`` tensors), compressor buffers, MiniMax's per-layer ``linear_cache`` list.
Every tensor found is one of:

* **rows**: dim 0 is the batch (dim 1 for the ``[sections, B, seq]`` position ids that
  Qwen4-Exp binds to its cache). Each microbatch gets a view of its rows (no copy), so a
  layer that writes in place (static caches, recurrent states) writes into the caller's
  tensor, and one that replaces the tensor (dynamic caches) gets its rows concatenated
  back by the merge.
* **a counter**: a tensor of one element (a static layer's position). Each microbatch gets
  its own copy; the merge copies microbatch 0's back into the caller's tensor (same
  address), after checking that all microbatches advanced it alike where that costs no
  device sync (CPU tensors; every microbatch runs the same positions).
* **empty**: a placeholder of no elements before the layer's lazy initialisation; each
  microbatch gets its own.

Any other tensor (several elements, batch dim not the batch) holds state whose rows cannot
be told apart: the split raises ``SplitError`` naming it, so that no microbatch ever reads
another's state. Plain values (ints, flags, dicts of flags) are copied per microbatch
(layers mutate them, e.g. ``has_previous_state``) and merged back after checking that all
microbatches agree; a layer's ``batch_size`` is the microbatch's and is summed. Objects
that are not cache objects and hold tensors, offloaded caches and quantized layers raise.

One limit is inherent: a tensor that is not per sequence but whose first dim happens to
equal the batch would be split as rows. transformers' cache classes hold none.
"""

from __future__ import annotations

import copy
import functools
import itertools
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import SplitError
from ..split import HashedTuple, offsets_of, register_split_type

__all__ = ["split_cache", "merge_caches", "cache_fingerprint", "cache_snapshot",
           "pad_cache"]

_GIVEN = "_coop_dbo_given"  # on a split part: its _Given


class _Given:
    """What ``split_cache`` handed one microbatch: its rows, and per path of the state
    the tensor it handed out and its kind (``"rows"``, ``"counter"``, ``"empty"``)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.tensors: dict[Path, tuple[torch.Tensor, str]] = {}

#: Values held as they are: they hold no tensor and nothing a layer mutates.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
          type)

Path = tuple[Any, ...]


def _batch_dim(path: Path, t: torch.Tensor) -> int:
    """The batch dim of the tensor at ``path``: 0, but 1 for the ``[sections, B, seq]``
    position ids that Qwen4-Exp keeps on its cache (``cache.position_ids``)."""
    return 1 if path and path[-1] == "position_ids" and t.dim() == 3 else 0

_HINT = ("pass split=/merge= to CoopDBORunner that give each microbatch its own cache (or "
         "use DynamicCache / StaticCache)")


def _cache_classes() -> tuple[type, ...]:
    """The transformers classes whose objects are walked as cache state."""
    from transformers import cache_utils as cu

    return (cu.Cache, cu.CacheLayerMixin, cu.LinearAttentionCacheLayerMixin)


def _fmt(path: Path) -> str:
    out = ""
    for p in path:
        if isinstance(p, str) and p.isidentifier():
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out or "the cache"


# -- checks --------------------------------------------------------------------------------

def _check_cache(cache: Any, batch: int) -> None:
    """Refuse what cannot be split, with the reason and what to do."""
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

    name = type(cache).__qualname__
    if getattr(cache, "offloading", False):
        raise SplitError(f"CoopDBORunner cannot split an offloaded {name}: its layers move "
                         "between devices on a side stream while the microbatches run; "
                         "make the cache without offloading.")
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        inner = [v for v in vars(cache).values() if isinstance(v, _cache_classes()[0])]
        if not inner:  # an EncoderDecoderCache holds two caches instead of layers
            raise SplitError(f"CoopDBORunner cannot split a {name}: it has no list of "
                             f"layers; {_HINT}.")
        for c in inner:
            _check_cache(c, batch)
        return
    for i, layer in enumerate(layers):
        if not isinstance(layer, (CacheLayerMixin, LinearAttentionCacheLayerMixin)):
            raise SplitError(f"CoopDBORunner cannot split layer {i} of a {name}: "
                             f"{type(layer).__qualname__} is not a transformers cache layer; "
                             f"{_HINT}.")
        if any(c.__name__ == "QuantizedLayer" for c in type(layer).__mro__):
            raise SplitError(f"CoopDBORunner cannot split layer {i} of a {name}: "
                             f"{type(layer).__qualname__} keeps its keys quantized, and "
                             f"its rows cannot be cut; {_HINT}.")
        keys = vars(layer).get("keys")
        if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.numel() \
                and keys.shape[0] != batch:
            raise SplitError(f"the {name} passed to CoopDBORunner holds a batch of "
                             f"{keys.shape[0]} sequences but the inputs have {batch}: "
                             "pass the cache that belongs to these inputs.")


# -- split ---------------------------------------------------------------------------------

class _Splitter:
    """Cuts rows ``lo:hi`` out of one cache; records what it handed out."""

    def __init__(self, cache_name: str, lo: int, hi: int, batch: int) -> None:
        self.cache_name = cache_name
        self.lo, self.hi, self.batch = lo, hi, batch
        self.given = _Given(hi - lo)
        self.classes = _cache_classes()

    def obj(self, obj: Any, path: Path) -> Any:
        new = copy.copy(obj)
        for attr, v in vars(obj).items():
            if attr == _GIVEN:
                continue
            if attr == "batch_size" and isinstance(v, int) and not isinstance(v, bool):
                setattr(new, attr, self.hi - self.lo)
            else:
                setattr(new, attr, self.value(v, (*path, attr)))
        return new

    def value(self, v: Any, path: Path) -> Any:
        if isinstance(v, torch.Tensor):
            return self.tensor(v, path)
        if isinstance(v, _PLAIN):
            return v
        if isinstance(v, dict):
            return {k: self.value(x, (*path, k)) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x, (*path, i)) for i, x in enumerate(v)]
        if isinstance(v, tuple) and type(v) is tuple:
            return tuple(self.value(x, (*path, i)) for i, x in enumerate(v))
        if isinstance(v, self.classes):
            return self.obj(v, path)
        if _holds_tensor(v):
            raise SplitError(f"CoopDBORunner cannot split a {self.cache_name}: "
                             f"{_fmt(path)} is a {type(v).__qualname__} holding tensors, "
                             f"which the cache split does not know; {_HINT}.")
        return v  # shared: holds no tensor (e.g. a config)

    def tensor(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        dim = _batch_dim(path, t)
        if t.dim() > dim and t.shape[dim] == self.batch:
            out, kind = t.narrow(dim, self.lo, self.hi - self.lo), "rows"
        elif t.numel() == 1:  # a batch of >= 2 has no per-sequence state of one element
            out, kind = t.clone(), "counter"
        elif t.numel() == 0:
            out, kind = t.clone(), "empty"
        else:
            raise SplitError(
                f"CoopDBORunner cannot split a {self.cache_name}: {_fmt(path)} is a tensor "
                f"of shape {tuple(t.shape)} whose dim {dim} is not the batch "
                f"({self.batch}), so its rows cannot be given to the microbatches; "
                f"{_HINT}.")
        self.given.tensors[path] = (out, kind)
        return out


def _holds_tensor(obj: Any, depth: int = 3) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or isinstance(obj, _PLAIN) or callable(obj):
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth - 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds_tensor(v, depth - 1) for v in obj)
    return any(_holds_tensor(v, depth - 1) for v in getattr(obj, "__dict__", {}).values())


def split_cache(cache: Any, sizes: list[int], batch: int) -> list[Any]:
    """One cache per microbatch, made of views of ``cache``'s rows (see the module doc).

    Args:
        cache: a ``transformers.cache_utils.Cache`` of ``batch`` sequences.
        sizes: rows per microbatch (summing to ``batch``).
        batch: the batch size of the call.
    Returns:
        one shallow copy of ``cache`` per microbatch, every per-sequence tensor (at any
        depth) cut to the microbatch's rows.
    Raises:
        SplitError: state that cannot be split (named), an offloaded cache, quantized
            layers, or a cache of another batch.
    """
    _check_cache(cache, batch)
    name = type(cache).__qualname__
    parts = []
    for lo, hi in offsets_of(sizes):
        cut = _Splitter(name, lo, hi, batch)
        part = cut.obj(cache, ())
        part.__dict__[_GIVEN] = cut.given
        parts.append(part)
    return parts


# -- merge ---------------------------------------------------------------------------------

class _Merger:
    """Puts the microbatches' state back together, into the caller's objects."""

    def __init__(self, parts: list[Any]) -> None:
        given = [p.__dict__.get(_GIVEN) for p in parts]
        self.given: list[dict[Path, tuple[torch.Tensor, str]]] = [
            g.tensors if isinstance(g, _Given) else {} for g in given]
        #: rows per microbatch, when the parts are split_cache's (else the model's own)
        self.sizes: list[int] | None = (
            [g.rows for g in given if isinstance(g, _Given)]
            if all(isinstance(g, _Given) for g in given) else None)
        self.classes = _cache_classes()

    def obj(self, target: Any, parts: list[Any], path: Path) -> Any:
        names = [[a for a in vars(p) if a != _GIVEN] for p in parts]
        if any(set(n) != set(names[0]) for n in names):
            raise SplitError(f"the microbatches' caches differ in what {_fmt(path)} holds "
                             f"({[sorted(n) for n in names]}): every microbatch must run "
                             "the same layers.")
        merged: dict[str, Any] = {}
        for attr in names[0]:
            vals = [vars(p)[attr] for p in parts]
            alias = next((a for a in merged if all(vars(p)[a] is v
                                                    for p, v in zip(parts, vals, strict=True))),
                         None)
            if alias is not None and isinstance(vals[0], torch.Tensor):
                merged[attr] = merged[alias]  # e.g. values that are the keys
            elif attr == "batch_size" and all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in vals):
                merged[attr] = sum(vals)
            else:
                merged[attr] = self.value(vals, vars(target).get(attr), (*path, attr))
        for attr, v in merged.items():
            if vars(target).get(attr) is not v:
                setattr(target, attr, v)
        return target

    def value(self, vals: list[Any], cur: Any, path: Path) -> Any:
        v0 = vals[0]
        if all(isinstance(v, torch.Tensor) for v in vals):
            return self.tensor(vals, cur, path)
        kinds = {type(v) for v in vals}
        if len(kinds) > 1 and not all(isinstance(v, _PLAIN) for v in vals):
            raise SplitError(f"the microbatches' caches hold different kinds of "
                             f"{_fmt(path)} ({sorted(k.__name__ for k in kinds)}): every "
                             "microbatch must run the same layers.")
        if isinstance(v0, dict):
            keys = list(v0)
            if any(list(v) != keys for v in vals):
                raise SplitError(f"the microbatches' caches hold different keys in "
                                 f"{_fmt(path)}: every microbatch must run the same layers.")
            target: dict[Any, Any] = cur if isinstance(cur, dict) else {}
            for k in keys:  # in place: the caller's dict stays the layer's dict
                target[k] = self.value([v[k] for v in vals], target.get(k), (*path, k))
            return target
        if isinstance(v0, list):
            n = len(v0)
            if any(len(v) != n for v in vals):
                raise SplitError(f"the microbatches' caches hold lists of different lengths "
                                 f"in {_fmt(path)}: every microbatch must run the same "
                                 "layers.")
            old = cur if isinstance(cur, list) else []
            items = [self.value([v[i] for v in vals], old[i] if i < len(old) else None,
                                (*path, i)) for i in range(n)]
            if isinstance(cur, list):
                cur[:] = items
                return cur
            return items
        if isinstance(v0, tuple) and type(v0) is tuple:
            return tuple(self.value([v[i] for v in vals], None, (*path, i))
                         for i in range(len(v0)))
        if isinstance(v0, self.classes):
            obj = cur if type(cur) is type(v0) else copy.copy(v0)
            obj.__dict__.pop(_GIVEN, None)
            return self.obj(obj, vals, path)
        if all(v == v0 for v in vals[1:]):
            return v0
        raise SplitError(f"the microbatches' caches disagree on {_fmt(path)} ({vals}); it "
                         "is not per-sequence state, so every microbatch must leave it "
                         "alike.")

    def tensor(self, vals: list[torch.Tensor], cur: Any, path: Path) -> Any:
        given = [g.get(path) for g in self.given]
        handed = [g[0] if g is not None else None for g in given]
        sizes = self.sizes
        dim = _batch_dim(path, vals[0])
        if all(h is v for h, v in zip(handed, vals, strict=True)) and given[0] is not None \
                and isinstance(cur, torch.Tensor):
            kind = given[0][1]
            if kind == "empty" or kind == "rows" and sizes is not None and cur.dim() > dim \
                    and cur.shape[dim] == sum(sizes):
                return cur  # untouched, or written in place into the caller's tensor
        if sizes is not None:
            per_rows = all(v.dim() > dim for v in vals) and [v.shape[dim] for v in vals] == sizes
        else:  # the model's own caches: each holds its microbatch's rows
            per_rows = all(v.dim() > dim and v.numel() and v.dim() == vals[0].dim()
                           for v in vals)
        if per_rows:
            return torch.cat(vals, dim)
        # Values are compared on the CPU only: on a GPU the comparison is a device sync
        # per tensor and step, which a CUDA graph capture refuses and an eager step pays.
        same = all(v.shape == vals[0].shape and v.dtype == vals[0].dtype
                   and v.device == vals[0].device
                   and (v.device.type != "cpu" or torch.equal(v, vals[0]))
                   for v in vals[1:])
        if not same:
            raise SplitError(
                f"the microbatches' caches disagree on {_fmt(path)}: shapes "
                f"{[tuple(v.shape) for v in vals]} are neither the microbatches' rows "
                f"({sizes}) nor one value they share, so it cannot be merged.")
        v0 = vals[0]
        if isinstance(cur, torch.Tensor) and cur is not v0 and cur.shape == v0.shape \
                and cur.dtype == v0.dtype and cur.device == v0.device:
            cur.copy_(v0)  # a counter: keep the caller's tensor (and its address)
            return cur
        return v0


def merge_caches(parts: list[Any], original: Any = None) -> Any:
    """Merge the per-microbatch caches of one step (see the module doc).

    Args:
        parts: the microbatches' caches, in microbatch order (those ``split_cache`` made,
            which the model updated, or caches the model made itself).
        original: the cache ``split_cache`` split (the caller's object, which ``generate``
            keeps using), or ``None`` when each microbatch made its own cache.
    Returns:
        ``original`` updated in place, or a new cache of the parts' class.
    Raises:
        SplitError: the microbatches' caches do not fit together (different layers, or
            state they should share but left different).
    """
    if original is None:
        target = copy.copy(parts[0])
        target.__dict__.pop(_GIVEN, None)
    else:
        target = original
    _Merger(parts).obj(target, parts, ())
    return target


# -- CUDA graphs over a cache ------------------------------------------------------------

# Attention layers' keys and values (and indexer keys): a step writes its token's row at
# its position, so a warm-up run repeats a write (or writes one position ahead, which the
# next step overwrites before any step reads it). Everything else a step may advance
# (position counters, recurrent and convolution states, flags) is saved and restored
# around warm-up.
_IDEMPOTENT_ATTRS = frozenset({"keys", "values", "indexer_keys"})
# Positions kept as Python ints: a step advances them and the layer branches on them (a
# sliding window fills up), which a replayed graph would not follow.
_PYTHON_POSITIONS = frozenset({"cumulative_length", "cumulative_length_int", "entry_count"})


def _leaves(obj: Any, path: Path = ()) -> Iterator[tuple[Any, Any, Path, Any]]:
    """``(holder, key, path, value)`` for every tensor and plain value of a cache's state,
    at any depth; ``holder`` is the object (``key`` an attribute) or the dict or list
    (``key`` an item) that holds ``value``."""
    classes = _cache_classes()

    def walk(holder: Any, key: Any, path: Path, v: Any) -> Iterator[tuple[Any, Any, Path, Any]]:
        if isinstance(v, (torch.Tensor, *_PLAIN)):
            yield holder, key, path, v
        elif isinstance(v, dict):
            for k, x in v.items():
                yield from walk(v, k, (*path, k), x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield from walk(v, i, (*path, i), x)
        elif isinstance(v, classes):
            for attr, x in vars(v).items():
                if attr != _GIVEN:
                    yield from walk(v, attr, (*path, attr), x)

    for attr, v in vars(obj).items():
        if attr != _GIVEN:
            yield from walk(obj, attr, (*path, attr), v)


def _put(holder: Any, key: Any, v: Any) -> None:
    """Set what ``_leaves`` named ``(holder, key)``: an item of a dict or list, else an
    attribute."""
    if isinstance(holder, (dict, list)):
        holder[key] = v
    else:
        setattr(holder, key, v)


def _resolve(obj: Any, path: Path) -> Any:
    """The object, dict or list at ``path`` below ``obj`` (as ``_leaves`` names paths)."""
    for p in path:
        obj = obj[p] if isinstance(obj, (dict, list)) else getattr(obj, p)
    return obj


def _replayable(layer: Any) -> bool:
    """Whether a cache layer keeps every tensor at one address from step to step once a
    prefill ran: a compileable layer that is initialised (static attention layers), and for
    linear-attention layers (convolution and recurrent states, updated in place) every
    state a step reads initialised, and no past recorded (``record_past`` appends)."""
    if not getattr(layer, "is_compileable", False):
        return False
    previous = getattr(layer, "has_previous_state", None)
    if isinstance(previous, dict):  # a linear-attention layer (alone or with attention)
        if getattr(layer, "record_past", False):
            return False
        conv = getattr(layer, "is_conv_states_initialized", {})
        recurrent = getattr(layer, "is_recurrent_states_initialized", {})
        if not all(conv.get(i) or recurrent.get(i) for i, seen in previous.items() if seen):
            return False
        if any(previous.values()):  # the attention half of a mixed layer, if it has one
            return bool(getattr(layer, "is_initialized", True))
        # no linear state used (yet): an attention layer of a mixed cache, or not run yet
    return bool(getattr(layer, "is_initialized", False))


class _Seen:
    """What a cache's fingerprint was computed from: every container of its state (an
    object's ``__dict__``, a dict or a list) with its keys and values, and every tensor
    value with its address and shape. ``unchanged()`` tells that nothing was replaced,
    added, removed, moved or reshaped since, in a few passes that run in C (tens of
    nanoseconds per value: a decode step's check hardly grows with the number of layers).

    Invariants (as they were when made): ``lens`` are the containers' lengths, ``keys``
    the dicts' keys in order; ``values`` every value of all dicts, then of all lists, in
    order (kept alive, so that no new tensor can take an old one's address); ``tensors``
    are the tensor values, ``ptrs`` / ``shapes`` their addresses and shapes. A value is
    unchanged only as the same object (an equal copy of a dict or of a one-element tensor
    is a change, and so is an equal int that is another object), as the per-link check
    before it did.
    """

    def __init__(self, cache: Any) -> None:
        dicts: list[dict] = []
        lists: list[list] = []
        self._walk(vars(cache), dicts, lists, _cache_classes())
        self.dicts, self.lists = dicts, lists
        self.lens = list(map(len, itertools.chain(dicts, lists)))
        self.keys = list(itertools.chain.from_iterable(dicts))
        self.values = self._values()
        self.tensors = [v for v in self.values if isinstance(v, torch.Tensor)]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        self.shapes = list(map(_shape_of, self.tensors))

    def _walk(self, container: Any, dicts: list[dict], lists: list[list],
              classes: tuple) -> None:
        if isinstance(container, dict):
            dicts.append(container)
            values = [v for k, v in container.items() if k != _GIVEN]
        else:
            lists.append(container)
            values = list(container)
        for v in values:
            if isinstance(v, (dict, list)):
                self._walk(v, dicts, lists, classes)
            elif isinstance(v, classes):
                self._walk(vars(v), dicts, lists, classes)

    def _values(self) -> list[Any]:
        chain = itertools.chain.from_iterable
        return list(itertools.chain(chain(map(dict.values, self.dicts)), chain(self.lists)))

    def unchanged(self) -> bool:
        # (the same objects in the same places: so the tensors are the ones seen, and only
        # their storage can have moved or been reshaped in place)
        return (list(map(len, itertools.chain(self.dicts, self.lists))) == self.lens
                and list(itertools.chain.from_iterable(self.dicts)) == self.keys
                and all(map(operator.is_, self._values(), self.values))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and list(map(_shape_of, self.tensors)) == self.shapes)


_shape_of = operator.attrgetter("shape")


# The last fingerprint of each cache and what it was computed from.
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple, _Seen]] = \
    weakref.WeakKeyDictionary()


def cache_fingerprint(cache: Any) -> tuple | None:
    """Where a cache's tensors live and its flags and sizes, for CUDA graphs; ``None`` for a
    cache that cannot be replayed: one that grows by reallocating (a dynamic cache), is not
    initialised yet, or keeps a position as a Python int a step advances.

    A decode step calls this once per step: the last result is kept per cache and reused
    while ``_Seen.unchanged()`` holds, so that the host time per step hardly grows with
    the number of layers."""
    try:
        memo = _FINGERPRINTS.get(cache)
    except TypeError:  # a cache class without weak references
        return _fingerprint(cache)
    if memo is not None and memo[1].unchanged():
        return memo[0]
    fingerprint = _fingerprint(cache)
    if fingerprint is None:  # not kept: its links would hold a dynamic cache's old tensors
        _FINGERPRINTS.pop(cache, None)
    else:
        _FINGERPRINTS[cache] = (fingerprint, _Seen(cache))
    return fingerprint


def _fingerprint(cache: Any) -> tuple | None:
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None
    if not all(_replayable(layer) for layer in layers):
        return None
    out: list[tuple] = []
    for _, _, path, v in _leaves(cache):
        if isinstance(v, torch.Tensor):
            out.append((path, v.data_ptr(), tuple(v.shape), v.dtype))
        elif any(p in _PYTHON_POSITIONS for p in path if isinstance(p, str)):
            return None
        elif not isinstance(v, type):
            out.append((path, v))
    return HashedTuple(out)  # kept per cache (the memo): hashed once, not every step


def cache_snapshot(cache: Any) -> Callable[[], None]:
    """Save what a step advances in ``cache`` (all state but ``_IDEMPOTENT_ATTRS``, at any
    depth); the returned function puts it back in place (same tensors, so a captured graph
    stays valid)."""
    tensors: list[tuple[Any, Any, torch.Tensor, torch.Tensor | None]] = []
    plain: list[tuple[Any, Any, Any]] = []
    for holder, key, path, v in _leaves(cache):
        if isinstance(v, torch.Tensor):
            idempotent = any(p in _IDEMPOTENT_ATTRS for p in path if isinstance(p, str))
            tensors.append((holder, key, v, None if idempotent else v.clone()))
        else:
            plain.append((holder, key, v))

    def restore() -> None:
        for holder, key, live, saved in tensors:
            if saved is not None:
                live.copy_(saved)
            _put(holder, key, live)
        for holder, key, v in plain:
            _put(holder, key, v)
    return restore


class _Padder(_Splitter):
    """A copy of a cache with ``rows`` rows: new tensors holding the caller's rows first,
    scratch rows after; one-element counters shared with the caller's cache."""

    def tensor(self, t: torch.Tensor, path: Path) -> torch.Tensor:
        dim = _batch_dim(path, t)
        if t.dim() > dim and t.shape[dim] == self.batch:
            shape = list(t.shape)
            shape[dim] = self.hi
            big = t.new_zeros(shape)
            big.narrow(dim, 0, self.batch).copy_(t)
            return big
        if t.numel() <= 1:
            return t  # a counter (or placeholder): the graph advances the caller's own
        raise SplitError(f"CoopDBORunner cannot pad a {self.cache_name}: {_fmt(path)} has "
                         f"shape {tuple(t.shape)}, not the batch {self.batch} in dim {dim}.")


class _Padding:
    """One cache padded to ``rows`` rows: the padded copy and how the caller's cache was
    rebound to it.

    Invariants: every per-sequence tensor of the caller's cache is a view of the first
    ``batch`` rows of the padded copy's tensor at the same path, and every other tensor
    is the same object in both; ``caller`` and ``copy`` are what both looked like after
    the last rebinding (``sync``), so a step that assigned something on the copy, or a
    caller's cache changed from outside, is seen by one pass of identity checks.
    """

    def __init__(self, cache: Any, rows: int, batch: int) -> None:
        self.rows, self.batch = rows, batch
        self.padded = _Padder(type(cache).__qualname__, 0, rows, batch).obj(cache, ())
        # What the copy held at each path when the caller was last rebound to it.
        self.given: dict[Path, Any] = {}
        self._rebind(cache, everything=True)

    def _rebind(self, cache: Any, everything: bool = False) -> None:
        """Give the caller's cache what the copy holds where it changed (every path when
        ``everything``): its rows of a per-sequence tensor, anything else as it is."""
        for _, key, path, v in _leaves(self.padded):
            if not everything and self.given.get(path, _ABSENT) is v:
                continue
            if isinstance(v, torch.Tensor):
                dim = _batch_dim(path, v)
                if v.dim() > dim and v.shape[dim] == self.rows:
                    v = v.narrow(dim, 0, self.batch)
            elif key == "batch_size" and isinstance(v, int) and v == self.rows:
                v = self.batch  # the copy's layers count its rows, the caller's its own
            _put(_resolve(cache, path[:-1]), key, v)
        self.given = {path: v for _, _, path, v in _leaves(self.padded)}
        self.caller, self.copy = _Seen(cache), _Seen(self.padded)
        _FINGERPRINTS.pop(cache, None)  # it would keep the tensors the caller had before

    def sync(self, cache: Any) -> None:
        """After a padded step: what the step assigned on the copy (a tensor it replaced,
        a flag it set) is the caller's too, per-sequence tensors cut to its rows."""
        if not self.copy.unchanged():
            try:
                self._rebind(cache)
            except (AttributeError, KeyError, IndexError, TypeError) as e:
                raise SplitError(
                    f"CoopDBORunner cannot hand a padded step's {type(cache).__qualname__} "
                    f"back: the step changed the cache's structure ({e!r}); run this model "
                    "without padding (capture its exact batch sizes).") from e


_ABSENT = object()


# The paddings of each cache, per row count.
_PADDED: weakref.WeakKeyDictionary[Any, dict[int, _Padding]] = weakref.WeakKeyDictionary()


def pad_cache(cache: Any, rows: int, batch: int) -> tuple[Any, Callable[[], None]] | None:
    """The cache of a call padded to ``rows`` rows, for a CUDA graph captured at that size.

    Every per-sequence tensor of ``cache`` is copied into a new tensor of ``rows`` rows,
    and ``cache`` itself is rebound to views of their first ``batch`` rows, so that the
    graph's writes to the real rows are the caller's state and its padding rows write only
    scratch rows nobody reads. Counters stay shared. The same padded cache comes back for
    the same ``cache`` and ``rows`` while neither changed (the graph replays on its
    tensors).

    Returns:
        ``(padded cache, sync)``, ``sync()`` to be called after each padded step: it
        hands what the step assigned on the padded cache (a replaced tensor, a flag) to
        ``cache``; or ``None`` for a cache that cannot be replayed (``cache_fingerprint``)
        or whose state cannot be padded.
    """
    if cache_fingerprint(cache) is None:
        return None
    try:
        memo = _PADDED.setdefault(cache, {})
    except TypeError:  # a cache class without weak references
        return None
    padding = memo.get(rows)
    if padding is None or padding.batch != batch or not padding.caller.unchanged():
        try:
            padding = memo[rows] = _Padding(cache, rows, batch)
        except SplitError:
            memo.pop(rows, None)
            return None
    return padding.padded, functools.partial(padding.sync, cache)


# transformers is not imported here: the registry matches the class by its qualified name.
register_split_type("transformers.cache_utils.Cache", split_cache, merge_caches,
                    fingerprint=cache_fingerprint, snapshot=cache_snapshot, pad=pad_cache)
