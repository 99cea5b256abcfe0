"""Yield points inside expert-parallel MoE communication, and the backends that move tokens.

A routed MoE layer does: route (top-k experts per token) -> **dispatch** (send each token to
the ranks owning its experts) -> experts -> **combine** (send expert outputs back, weighted
sum per token). DBO overlaps one microbatch's dispatch/combine with the other's compute.
``moe_exchange`` runs that sequence for one microbatch and puts the yields in it, so a
model whose MoE communication goes through it gets overlap without any other change.

Two yield schedules, chosen by the backend (``MoEBackend.schedule``):

``"switch"`` (torch.distributed all-to-all, the single-process backend): communication
kernels run on the comm stream. Four yields per MoE layer, at these sites, always::

    compute: attention, gate ...; dispatch_pack (sort rows by destination)
    dbo_yield_and_switch("comm", "moe.dispatch")     # comm waits for compute
    comm:    dispatch_transfer (the all-to-all: counts, then payload)
    dbo_yield_and_switch("compute", "moe.experts")   # compute waits for comm
    compute: dispatch_unpack, shared experts, routed experts, combine_pack
    dbo_yield_and_switch("comm", "moe.combine")
    comm:    combine_transfer (the all-to-all back)
    dbo_yield_and_switch("compute", "moe.post")
    compute: combine_unpack (weighted sum per token) ...

Only the transfers run on the comm stream: what the other microbatch must hide is the
communication itself, not routing kernels.

``"hook"`` (deep_ep low-latency): the send kernel returns at once and a receive hook
completes the transfer later; no stream switch and no SMs held while data flies. Two
yields per MoE layer::

    dispatch_send -> dbo_yield("moe.dispatch") -> recv hook -> experts
    combine_send  -> dbo_yield("moe.combine")  -> recv hook

The receive hook runs in the microbatch that sent, right after its yield returns; a
microbatch unwound at that yield (another one failed) runs its receive before unwinding,
so no backend result stays held after a failed step.

``site_prefix`` (e.g. ``"L3."``, as the reference decoder passes per layer) is put
before each site, so that the symmetry check also tells MoE layers apart.

The counts are the same for every microbatch whatever the routing (a microbatch that
routes no token to some rank or expert still exchanges a zero count and yields).

**Cross-stream lifetimes, safe by construction.** In the switch schedule every tensor that
crosses between the compute and comm streams crosses through ``moe_exchange``: what a
``*_pack`` returns goes to the comm stream, what a ``*_transfer`` returns comes back. A
block of the caching allocator is handed out again only to work on the stream that
allocated it, once it is freed; so ``moe_exchange`` keeps each crossing object referenced
until the allocating stream has waited for the stream that reads it: a pack's output until
the following switch back to the compute stream, the dispatch's received rows until the
combine's switch to the comm stream. The combine's result (no later switch in the
exchange makes the comm stream wait for the compute stream's reads of it), anything held
when a switch issues no wait or an exception ends the exchange, and everything when the
exchange does not start on the step's compute stream, get ``Tensor.record_stream`` for the
stream that reads them. Either way the memory cannot be
reused while the other stream still reads it, in eager mode and under CUDA graph capture.
Backends never deal with this themselves. (One ``record_stream`` per layer instead of six:
each one makes the allocator record and later query a CUDA event, about 1.3 ms of host time
per eager step of the reference decoder with six per layer.)
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .errors import CaptureError
from .greenlet_sched import dbo_streams, dbo_yield, dbo_yield_and_switch

__all__ = [
    "ExpertBatch",
    "MoEBackend",
    "SingleProcessBackend",
    "TorchDistributedBackend",
    "DeepEPLowLatencyBackend",
    "moe_exchange",
    "validate_routing",
    "YIELD_SITES",
    "layer_sites",
]

#: The yield sites of one MoE layer, per schedule, in order.
YIELD_SITES: dict[str, tuple[str, ...]] = {
    "switch": ("moe.dispatch", "moe.experts", "moe.combine", "moe.post"),
    "hook": ("moe.dispatch", "moe.combine"),
}


@dataclasses.dataclass
class ExpertBatch:
    """The tokens this rank's experts must process, as a backend delivers them.

    Two layouts:

    * ``"flat"``: ``x`` is ``[num_rows, hidden]``, rows sorted by local expert;
      ``expert_offsets`` ``[num_local_experts]`` int32 holds the end row of each expert
      (cumulative counts). Rows at or beyond ``expert_offsets[-1]`` are padding: whatever
      is computed there is ignored by combine.
    * ``"padded"`` (deep_ep low-latency): ``x`` is
      ``[num_local_experts, num_max_rows_per_expert, hidden]``; ``recv_count``
      ``[num_local_experts]`` int32 holds the valid rows of each expert; rows beyond it are
      ignored by combine.

    ``handle`` is backend-private state that ``combine_send`` needs.
    """

    x: torch.Tensor
    layout: Literal["flat", "padded"]
    num_local_experts: int
    expert_offsets: torch.Tensor | None = None
    recv_count: torch.Tensor | None = None
    handle: Any = None

    def linear(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-expert matmul: row r of expert e becomes ``h[r] @ weight[e]``.

        Args:
            h: activations in this batch's layout (``[rows, in]`` or ``[E, rows, in]``).
            weight: ``[num_local_experts, in, out]``, same dtype as ``h``.
        Returns:
            ``[rows, out]`` or ``[E, rows, out]``.

        The flat layout uses ``torch._grouped_mm``, which needs ``in`` and ``out`` rows of
        a multiple of 16 bytes (8 bf16 or 4 fp32 values); on CUDA for dtypes other than
        bf16 (which ``_grouped_mm`` cannot capture) a masked per-expert matmul instead.
        """
        if h.dtype != weight.dtype or h.device != weight.device:
            raise ValueError(
                f"the experts' weights are {weight.dtype} on {weight.device} but the tokens "
                f"they get are {h.dtype} on {h.device}: pass MoE activations of the "
                "weights' dtype, on their device.")
        if self.layout == "padded":
            return torch.bmm(h, weight)
        assert self.expert_offsets is not None
        if h.is_cuda and h.dtype != torch.bfloat16:
            return _masked_expert_mm(h, weight, self.expert_offsets)
        return torch._grouped_mm(h, weight, offs=self.expert_offsets)


class MoEBackend(ABC):
    """Moves routed tokens to the experts and back, with a split send / receive.

    Contract (what ``moe_exchange`` relies on):

    * ``dispatch_send(x, topk_idx, topk_weights)`` starts the dispatch and returns an
      opaque pending object; ``dispatch_recv(pending)`` completes it and returns the
      ``ExpertBatch``. In the ``"switch"`` schedule both run back to back on the comm
      stream; in the ``"hook"`` schedule a yield separates them.
    * ``combine_send(expert_out, batch)`` / ``combine_recv(pending)``: the same for the
      way back; ``combine_recv`` returns ``[num_tokens, hidden]``: for each token the sum
      over its ``k`` of ``topk_weights[t, k] * expert_output``.
    * Shapes: ``x`` ``[num_tokens, hidden]``; ``topk_idx`` ``[num_tokens, top_k]`` int64
      global expert ids in ``[0, num_experts)``; ``topk_weights`` ``[num_tokens, top_k]``
      floating.
    * Every call issues the same collective operations whatever the routing, so that
      ranks and microbatches stay in step.
    """

    schedule: ClassVar[Literal["switch", "hook"]]
    num_experts: int
    world_size: int
    rank: int

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def local_expert_range(self) -> tuple[int, int]:
        n = self.num_local_experts
        return self.rank * n, (self.rank + 1) * n

    @abstractmethod
    def dispatch_send(self, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor) -> Any: ...

    @abstractmethod
    def dispatch_recv(self, pending: Any) -> ExpertBatch: ...

    @abstractmethod
    def combine_send(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any: ...

    @abstractmethod
    def combine_recv(self, pending: Any) -> torch.Tensor: ...

    # -- the "switch" schedule's phases ------------------------------------------------
    # moe_exchange runs each ``*_pack`` on the compute stream before it switches to the
    # comm stream, each ``*_transfer`` on the comm stream, and each ``*_unpack`` on the
    # compute stream after it switches back. The defaults put the whole send and receive
    # on the comm stream. A backend overrides them to keep the routing and permutation
    # kernels off the comm stream, so that only the transfer itself has to be hidden under
    # the other microbatch's compute.
    #
    # Lifetimes (what moe_exchange guarantees, and what a backend must keep to): the object
    # a ``*_pack`` returns is kept referenced until the compute stream has waited for the
    # transfer that reads it, and the object ``dispatch_transfer`` returns until the comm
    # stream has waited for the compute work issued before the combine's switch; the
    # object ``combine_transfer`` returns is marked with ``record_stream`` for the compute
    # stream. So a backend must (1) reach every tensor a transfer reads from its ``packed``
    # argument (or from objects alive until the exchange ends), (2) not drop references
    # inside the objects it is handed (no ``received.x = None``), and (3) return from
    # ``combine_transfer`` every comm-stream tensor that compute reads after the combine.

    def dispatch_pack(self, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor) -> Any:
        """Compute stream, before the transfer: lay out what is sent."""
        return (x, topk_idx, topk_weights)

    def dispatch_transfer(self, packed: Any) -> Any:
        """Comm stream: move ``dispatch_pack``'s output; returns what arrived."""
        return self.dispatch_recv(self.dispatch_send(*packed))

    def dispatch_unpack(self, received: Any) -> ExpertBatch:
        """Compute stream, after the transfer: the ``ExpertBatch`` for the experts."""
        return received  # type: ignore[no-any-return]

    def combine_pack(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any:
        """Compute stream, before the transfer: lay out the expert outputs to send back."""
        return (expert_out, batch)

    def combine_transfer(self, packed: Any) -> Any:
        """Comm stream: move ``combine_pack``'s output back; returns what arrived."""
        return self.combine_recv(self.combine_send(*packed))

    def combine_unpack(self, received: Any) -> torch.Tensor:
        """Compute stream, after the transfer: ``[num_tokens, hidden]`` weighted sums."""
        return received  # type: ignore[no-any-return]


def _masked_expert_mm(h: torch.Tensor, weight: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert matmul without host syncs, for CUDA dtypes ``torch._grouped_mm`` lacks.

    ``_grouped_mm`` on CUDA takes bf16 only; its fallback for other dtypes reads the
    offsets on the host, which a CUDA graph cannot capture. This computes every expert
    over all rows and keeps each row's own expert: ``num_local_experts`` times the work,
    fine for fp32 tests, not meant for speed. Padding rows come out as zeros.
    """
    rows = torch.arange(h.shape[0], device=h.device)
    row_expert = torch.searchsorted(offsets.to(torch.int64), rows, right=True)
    out = h.new_zeros(h.shape[0], weight.shape[2])
    for e in range(weight.shape[0]):
        out += (row_expert == e).unsqueeze(1).to(h.dtype) * (h @ weight[e])
    return out


def validate_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                     num_experts: int, hidden: int | None = None) -> None:
    """Raise a clear error for inputs a backend cannot route.

    Checks shapes, dtypes, devices, ``top_k <= num_experts`` and, on CPU tensors (where it
    costs no device sync), that expert ids are in range.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {tuple(x.shape)}.")
    if hidden is not None and x.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[1]} but the experts expect {hidden}: "
                         "pass activations of the model's hidden size.")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [num_tokens={x.shape[0]}, top_k], got "
                         f"{tuple(topk_idx.shape)}.")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have the shape of "
                         f"topk_idx {tuple(topk_idx.shape)}.")
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be int64 expert ids, got {topk_idx.dtype}.")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}.")
    if topk_idx.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_idx.shape[1]} is larger than num_experts="
                         f"{num_experts}: each token picks top_k distinct experts.")
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move all "
                             "MoE inputs to one device.")
    if x.device.type == "cpu" and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids must be in [0, {num_experts}), got ids from {lo} "
                             f"to {hi}.")


#: Dataclass field metadata of backend state that one stream makes and reads: ``_mark``
#: skips such a field (e.g. a handle used by pack and unpack, both on the compute stream).
SAME_STREAM = {"coop_dbo_same_stream": True}
_MARKED_FIELDS: dict[type, tuple[str, ...]] = {}


def _mark(obj: Any, stream: Any) -> None:
    """``record_stream(stream)`` on every CUDA tensor in ``obj`` (tensor, tuple, list,
    dataclass; dataclass fields with ``SAME_STREAM`` metadata are skipped)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _mark(o, stream)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _MARKED_FIELDS.get(type(obj))
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(obj)
                          if not f.metadata.get("coop_dbo_same_stream"))
            _MARKED_FIELDS[type(obj)] = names
        for name in names:
            _mark(getattr(obj, name), stream)


def _hand_over(obj: Any, to: Literal["comm", "compute"]) -> None:
    streams = dbo_streams()
    if streams is not None:
        _mark(obj, streams.comm if to == "comm" else streams.compute)


def _transfer(fn: Any, packed: Any) -> Any:
    """``fn(packed)`` on the comm stream; if it raises, ``packed`` (which kernels it
    already issued may still read) is marked for the comm stream before it is dropped."""
    try:
        return fn(packed)
    except BaseException:
        _hand_over(packed, "comm")
        raise


def _switch_holding(to: Literal["comm", "compute"], site: str, held: Any,
                    held_for: Literal["comm", "compute"], held_safely: bool) -> None:
    """``dbo_yield_and_switch(to, site)``; ``held`` (read by stream ``held_for``) is marked
    with ``record_stream`` unless the switch made stream ``to`` wait and ``held_safely``
    (stream ``to`` allocated it): when no wait was issued (the step is being unwound) or
    the switch raised (this microbatch is unwound), the caller drops ``held`` without the
    wait that would have protected it."""
    try:
        waited = dbo_yield_and_switch(to, site)
    except BaseException:
        _hand_over(held, held_for)
        raise
    if not (waited and held_safely):
        _hand_over(held, held_for)


def _yield_holding(recv: Any, pending: Any, site: str) -> None:
    """``dbo_yield(site)`` between a send and its receive (hook schedule).

    A microbatch can be unwound at this yield (``GreenletExit`` when another microbatch
    failed, ``KeyboardInterrupt``, an asymmetry error) while its send holds a backend
    result; deep_ep holds at most two, so a result never received would make every later
    step fail ("a third dispatch was started while 2 were still held"). The receive is
    completed before the exception goes on, so the backend is clean for the next step.
    """
    try:
        dbo_yield(site)
    except BaseException:
        recv(pending)
        raise


@functools.lru_cache(maxsize=1024)
def _sites(schedule: str, prefix: str) -> tuple[str, ...]:
    return tuple(prefix + site for site in YIELD_SITES[schedule])


def layer_sites(schedule: Literal["switch", "hook"], num_layers: int,
                prefix: str = "L{}.") -> list[str]:
    """The sites one microbatch yields at through ``num_layers`` MoE layers whose
    ``site_prefix`` is ``prefix.format(layer)`` (as ``MoEDecoder`` passes them)."""
    return [site for layer in range(num_layers) for site in _sites(schedule,
                                                                  prefix.format(layer))]


def moe_exchange(backend: MoEBackend, x: torch.Tensor, topk_idx: torch.Tensor,
                 topk_weights: torch.Tensor, experts: Any, *,
                 shared_experts: Any = None, site_prefix: str = "") -> torch.Tensor:
    """Dispatch, run ``experts(batch) -> Tensor``, combine; with this backend's yields.

    Args:
        backend: the communication backend.
        x: ``[num_tokens, hidden]`` activations of this microbatch.
        topk_idx: ``[num_tokens, top_k]`` int64 global expert ids.
        topk_weights: ``[num_tokens, top_k]`` routing weights.
        experts: callable taking an ``ExpertBatch`` and returning the expert outputs in
            the batch's layout (``[rows, hidden]`` or ``[E, rows, hidden]``).
        shared_experts: optional callable ``x -> [num_tokens, hidden]`` (a shared expert
            MLP, or any work that needs only ``x``), called with ``x`` on the compute
            stream after the dispatch, before the routed experts; its result is added to
            the output. Work put here moves from the stretch before the dispatch to the
            experts' stretch: where it belongs is the caller's choice, whichever makes the
            two compute stretches of a layer closer in length, since each must line up
            with a transfer of the other microbatch (the reference decoder decides by
            microbatch size, ``MoELayer.step``). A tensor the callable computed earlier
            and returns must come from the step's compute stream (it is not marked for
            other streams).
        site_prefix: put before every site name (e.g. ``"L3."``), so that the symmetry
            check also tells layers apart: a microbatch that skips layer 0's exchange and
            one that skips layer 1's then fail instead of being paired.
    Returns:
        ``[num_tokens, hidden]``, the weighted sum of expert outputs per token.

    Outside a scheduler the yields are no-ops and this is a plain MoE forward.
    """
    sites = _sites(backend.schedule, site_prefix)
    if backend.schedule == "hook":
        pending = backend.dispatch_send(x, topk_idx, topk_weights)
        _yield_holding(backend.dispatch_recv, pending, sites[0])
        batch = backend.dispatch_recv(pending)
        shared = shared_experts(x) if shared_experts is not None else None
        y = experts(batch)
        pending = backend.combine_send(y, batch)
        _yield_holding(backend.combine_recv, pending, sites[1])
        out = backend.combine_recv(pending)
        return out if shared is None else out + shared

    # Cross-stream lifetimes (see the module docstring): ``packed`` (made on the compute
    # stream, read by the transfer on the comm stream) stays referenced here until the
    # switch back has made the compute stream wait for the transfer; the dispatch's
    # ``received`` (made on the comm stream, read by the unpack on the compute stream)
    # until the combine's switch has made the comm stream wait for the unpack. Only then
    # can the caching allocator hand their blocks out again, to work ordered after those
    # waits. No later switch in the exchange makes the comm stream wait for the compute
    # stream's reads of the combine's result, so that one gets ``record_stream``; so does
    # anything held when a switch issues no wait or an exception ends the exchange, and
    # everything when the exchange does not start on the step's compute stream (the
    # waits then order another stream than the one that allocated the packs).
    streams = dbo_streams()
    held_safely = streams is None or streams.current_key() == streams.compute_key
    packed = backend.dispatch_pack(x, topk_idx, topk_weights)          # compute stream
    dbo_yield_and_switch("comm", sites[0])
    received = _transfer(backend.dispatch_transfer, packed)            # comm stream
    _switch_holding("compute", sites[1], packed, "comm", held_safely)
    try:
        batch = backend.dispatch_unpack(received)                      # compute stream
        shared = shared_experts(x) if shared_experts is not None else None
        y = experts(batch)
        packed = backend.combine_pack(y, batch)
    except BaseException:
        _hand_over(received, "compute")
        raise
    _switch_holding("comm", sites[2], received, "compute", held_safely)
    received = _transfer(backend.combine_transfer, packed)             # comm stream
    try:
        _switch_holding("compute", sites[3], packed, "comm", held_safely)
    finally:
        _hand_over(received, "compute")
    out = backend.combine_unpack(received)                             # compute stream
    return out if shared is None else out + shared


# -- flat all-to-all backends -------------------------------------------------------------

@dataclasses.dataclass
class _FlatHandle:
    """What combine needs to send expert outputs home (per microbatch, per layer)."""

    token_of_pair: torch.Tensor  # [num_pairs] int64: source token of each sent row
    weight_of_pair: torch.Tensor  # [num_pairs] weight of each sent row
    num_tokens: int
    send_pos: torch.Tensor | None  # [num_pairs] int64 row in the padded send buffer
    # exact mode over several ranks: (send, recv) rows per rank, set by the transfer
    splits: tuple[list[int], list[int]] | None = None
    recv_perm: torch.Tensor | None = None  # [num_recv_rows] received -> sorted row (unpack)


@dataclasses.dataclass
class _FlatDispatch:
    """Rows of one dispatch, before (``dispatch_pack``) or after (``dispatch_transfer``)
    the all-to-all."""

    x: torch.Tensor  # [num_rows, hidden] rows grouped by rank (static: padded slots)
    local_expert: torch.Tensor  # [num_rows] int64 local expert id (padding: n_local)
    # [world_size] int64 rows sent to each rank: exact mode over several ranks, pack only
    counts: torch.Tensor | None
    # made by pack and unpack, read by combine's pack and unpack: compute stream only
    handle: _FlatHandle = dataclasses.field(metadata=SAME_STREAM)


@dataclasses.dataclass
class _FlatCombine:
    """Expert outputs of one combine, before or after the all-to-all back."""

    y: torch.Tensor  # [num_rows, hidden] in received (before) / sent (after) row order
    handle: _FlatHandle = dataclasses.field(metadata=SAME_STREAM)


def _stable_order(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``argsort(ids, stable=True)`` for ids in ``[0, n)``: the indices that group equal ids,
    keeping their order within a group.

    The keys are narrowed to the smallest integer type that holds ``n - 1`` first: a radix
    sort makes one pass per key byte, so on an H100 sorting 1024 expert ids as uint8 takes
    about 14 us against 30 us as int64 (``bench/RESULTS.md``), and it runs once in each
    compute stretch of a layer.
    """
    key_dtype = torch.uint8 if n <= 256 else torch.int16 if n <= 32_768 else torch.int32
    return torch.sort(ids.to(key_dtype), stable=True).indices


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``bincount(ids, minlength=n)`` for ids < n, without the host sync bincount does on
    CUDA (it reads the max id to size its output), so it can be captured."""
    counts = torch.zeros(n, dtype=torch.int64, device=ids.device)
    return counts.index_add_(0, ids, torch.ones_like(ids))


class _FlatA2ABackend(MoEBackend):
    """Dispatch by all-to-all of (token, expert) rows, grouped by destination rank.

    Exact mode (``num_max_tokens_per_rank=None``): counts are exchanged first, the host
    reads them, and the payload moves with exact split sizes. Eager only (the host read
    cannot be captured).

    Static mode (``num_max_tokens_per_rank=N``): every rank sends a fixed
    ``[world_size, N * min(top_k, num_local_experts), hidden]`` buffer whose unused rows
    are padding; the counts travel as a tensor. No host sync, so it can be captured in a
    CUDA graph. Padding rows are computed and ignored.
    """

    schedule: ClassVar[Literal["switch", "hook"]] = "switch"

    def __init__(self, num_experts: int, world_size: int, rank: int,
                 num_max_tokens_per_rank: int | None) -> None:
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the "
                             f"expert-parallel size {world_size}.")
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.num_max_tokens_per_rank = num_max_tokens_per_rank

    # hooks for subclasses: the actual data movement
    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _exchange(self, send: torch.Tensor, send_splits: list[int] | None,
                  recv_splits: list[int] | None) -> torch.Tensor:
        raise NotImplementedError

    def _after_exchange(self, kind: Literal["dispatch", "combine"],
                        device: torch.device) -> None:
        """Called once per dispatch and per combine, after the payload moved."""

    # The four-method contract, composed of the switch schedule's phases.
    def dispatch_send(self, x, topk_idx, topk_weights):
        return self.dispatch_transfer(self.dispatch_pack(x, topk_idx, topk_weights))

    def dispatch_recv(self, pending: Any) -> ExpertBatch:
        return self.dispatch_unpack(pending)

    def combine_send(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any:
        return self.combine_transfer(self.combine_pack(expert_out, batch))

    def combine_recv(self, pending: Any) -> torch.Tensor:
        return self.combine_unpack(pending)

    def dispatch_pack(self, x, topk_idx, topk_weights) -> _FlatDispatch:
        """Rows grouped by destination rank (static mode: in their padded slots)."""
        validate_routing(x, topk_idx, topk_weights, self.num_experts)
        num_tokens, top_k = topk_idx.shape
        world, n_local = self.world_size, self.num_local_experts
        static = self.num_max_tokens_per_rank is not None
        if static and num_tokens > self.num_max_tokens_per_rank:  # type: ignore[operator]
            raise ValueError(f"{num_tokens} tokens exceed num_max_tokens_per_rank="
                             f"{self.num_max_tokens_per_rank} of this backend: construct "
                             "it with num_max_tokens_per_rank >= the largest (micro)batch "
                             "it will see.")
        if (not static and world > 1 and torch.cuda.is_available()
                and torch.cuda.is_current_stream_capturing()):
            raise CaptureError(
                "TorchDistributedBackend in exact mode reads the token counts on the host, "
                "which cannot be captured in a CUDA graph: construct it with "
                "num_max_tokens_per_rank=<largest tokens per rank> for capture.")
        expert = topk_idx.reshape(-1)
        order = _stable_order(expert, self.num_experts)  # pairs grouped by expert, so by rank
        expert_sorted = expert[order]
        token_of_pair = torch.div(order, top_k, rounding_mode="floor")
        weight_of_pair = topk_weights.reshape(-1)[order]
        dest = torch.div(expert_sorted, n_local, rounding_mode="floor")
        send_counts = _count(dest, world)
        send_x = x.index_select(0, token_of_pair)
        send_le = expert_sorted - dest * n_local  # local expert id at the destination
        send_pos = None
        if static:
            cap = self.num_max_tokens_per_rank * min(top_k, n_local)  # type: ignore[operator]
            start = torch.cumsum(send_counts, 0) - send_counts
            send_pos = (torch.arange(expert.numel(), device=x.device) - start[dest]
                        + dest * cap)
            buf = x.new_zeros(world * cap, x.shape[1])
            buf.index_copy_(0, send_pos, send_x)
            le_buf = torch.full((world * cap,), n_local, dtype=torch.int64, device=x.device)
            le_buf.index_copy_(0, send_pos, send_le)
            send_x, send_le = buf, le_buf
        handle = _FlatHandle(token_of_pair, weight_of_pair, num_tokens, send_pos)
        exact_multi_rank = not static and world > 1
        return _FlatDispatch(send_x, send_le, send_counts if exact_multi_rank else None,
                             handle)

    def dispatch_transfer(self, packed: _FlatDispatch) -> _FlatDispatch:
        """The all-to-all (exact mode: counts first, read on the host)."""
        h = packed.handle
        if packed.counts is not None:  # exact mode over several ranks
            recv_counts = self._exchange_counts(packed.counts)
            h.splits = (packed.counts.tolist(), recv_counts.tolist())
            recv_x = self._exchange(packed.x, *h.splits)
            recv_le = self._exchange(packed.local_expert, *h.splits)
        else:
            recv_x = self._exchange(packed.x, None, None)
            recv_le = (self._exchange(packed.local_expert, None, None)
                       if self.world_size > 1 or h.send_pos is not None
                       else packed.local_expert)
        self._after_exchange("dispatch", packed.x.device)
        return _FlatDispatch(recv_x, recv_le, None, h)

    def dispatch_unpack(self, received: _FlatDispatch) -> ExpertBatch:
        """Received rows sorted by local expert; padding (id ``n_local``) sorts last."""
        n_local = self.num_local_experts
        perm = _stable_order(received.local_expert, n_local + 1)
        per_expert = _count(received.local_expert, n_local + 1)[:n_local]
        offsets = torch.cumsum(per_expert, 0).to(torch.int32)
        received.handle.recv_perm = perm
        return ExpertBatch(x=received.x.index_select(0, perm), layout="flat",
                           num_local_experts=n_local, expert_offsets=offsets,
                           handle=received.handle)

    def combine_pack(self, expert_out: torch.Tensor, batch: ExpertBatch) -> _FlatCombine:
        """Expert outputs back in received order."""
        h: _FlatHandle = batch.handle
        y_recv = torch.empty_like(expert_out)
        y_recv.index_copy_(0, h.recv_perm, expert_out)
        return _FlatCombine(y_recv, h)

    def combine_transfer(self, packed: _FlatCombine) -> _FlatCombine:
        h = packed.handle
        if h.splits is not None:
            back = self._exchange(packed.y, h.splits[1], h.splits[0])
        else:
            back = self._exchange(packed.y, None, None)
        self._after_exchange("combine", back.device)
        return _FlatCombine(back, h)

    def combine_unpack(self, received: _FlatCombine) -> torch.Tensor:
        """For each token the weighted sum of its rows."""
        back, h = received.y, received.handle
        if h.send_pos is not None:
            back = back.index_select(0, h.send_pos)
        out = back.new_zeros(h.num_tokens, back.shape[1])
        out.index_add_(0, h.token_of_pair, back * h.weight_of_pair.to(back.dtype)[:, None])
        return out


def _calibrate_sleep_cycles_per_us(device: torch.device) -> float:
    """Clock cycles of ``torch.cuda._sleep`` per microsecond on this GPU (measured)."""
    cycles = 1_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e3)


def _calibrate_h2d_bytes_per_us() -> float:
    """Pinned host-to-device copy bandwidth of this GPU, bytes per microsecond."""
    nbytes = 64 << 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes / (start.elapsed_time(end) * 1e3)


class SingleProcessBackend(_FlatA2ABackend):
    """Expert parallelism of size 1 in one process, with simulated transfer time.

    It performs the exact data movement of an expert-parallel all-to-all of size 1 (rows
    gathered per expert, sent, received, sent back, weighted sum) and, on a GPU, spends
    ``dispatch_us`` / ``combine_us`` microseconds on the comm stream in a kernel that
    spins on one SM (``torch.cuda._sleep``, calibrated once per process). That stands in
    for an RDMA-style transfer (DeepEP low-latency over InfiniBand): time passes on the
    comm stream while the compute stream keeps almost every SM. It does **not** model
    NVLink copy engines or NCCL kernels that occupy SMs. On CPU the simulated time is 0.

    ``transfer="copy_engine"`` spends the time in a pinned-host-to-device copy instead,
    sized from a measured bandwidth: a DMA engine moves bytes over PCIe into GPU memory
    and no SM is held at all, as when a NIC writes an RDMA transfer into GPU memory. The
    1-GPU benchmark uses it: on an H100 the spin kernel's one SM cost the DBO graph about
    10 points of share hidden at comm = compute (bench/RESULTS.md). It needs one eager call
    at each size before a capture (the copy buffers grow outside capture only).

    Args:
        num_experts: total routed experts.
        dispatch_us / combine_us: simulated transfer time per call, microseconds.
        num_max_tokens_per_rank: static (graph-capturable) padded mode; ``None`` = exact.
        transfer: ``"spin"`` (default) or ``"copy_engine"``, how the time is spent.
    """

    _cycles_per_us: ClassVar[float | None] = None
    _copy_bytes_per_us: ClassVar[float | None] = None
    # One pinned source and one device target per device, grown on eager calls (warm-up
    # runs them before any capture with the same sizes).
    _copy_buffers: ClassVar[dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __init__(self, num_experts: int, *, dispatch_us: float = 0.0, combine_us: float = 0.0,
                 num_max_tokens_per_rank: int | None = None,
                 transfer: Literal["spin", "copy_engine"] = "spin") -> None:
        super().__init__(num_experts, 1, 0, num_max_tokens_per_rank)
        if dispatch_us < 0 or combine_us < 0:
            raise ValueError("dispatch_us and combine_us must be >= 0.")
        if transfer not in ("spin", "copy_engine"):
            raise ValueError(f"transfer must be 'spin' or 'copy_engine', got {transfer!r}.")
        self.dispatch_us = dispatch_us
        self.combine_us = combine_us
        self.transfer = transfer

    def _exchange(self, send, send_splits, recv_splits):
        return send.clone()  # the transfer: a real copy into a receive buffer

    def _after_exchange(self, kind: Literal["dispatch", "combine"],
                        device: torch.device) -> None:
        us = self.dispatch_us if kind == "dispatch" else self.combine_us
        if us > 0 and device.type == "cuda":
            cls = SingleProcessBackend
            if self.transfer == "copy_engine":
                cls._copy_for_us(us)
                return
            if cls._cycles_per_us is None:
                cls._cycles_per_us = _calibrate_sleep_cycles_per_us(torch.device("cuda"))
            torch.cuda._sleep(int(us * cls._cycles_per_us))

    @classmethod
    def _copy_for_us(cls, us: float) -> None:
        """A host-to-device copy on the current stream that takes about ``us``."""
        if cls._copy_bytes_per_us is None:
            cls._copy_bytes_per_us = _calibrate_h2d_bytes_per_us()
        nbytes = max(4096, int(us * cls._copy_bytes_per_us) // 4096 * 4096)
        dev = torch.cuda.current_device()
        bufs = cls._copy_buffers.get(dev)
        if bufs is None or bufs[0].numel() < nbytes:
            if torch.cuda.is_current_stream_capturing():
                raise CaptureError("SingleProcessBackend(transfer='copy_engine') needs an "
                                   "eager run at this size before capture (warm-up).")
            bufs = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
                    torch.empty(nbytes, dtype=torch.uint8, device=dev))
            cls._copy_buffers[dev] = bufs
        bufs[1][:nbytes].copy_(bufs[0][:nbytes], non_blocking=True)


class TorchDistributedBackend(_FlatA2ABackend):
    """Expert parallelism over a ``torch.distributed`` process group (NCCL, gloo).

    Rank ``r`` owns experts ``[r * E / W, (r + 1) * E / W)``. Dispatch exchanges the row
    counts per rank (``all_to_all_single`` of ``[W]`` int64), then the payload rows and
    their local expert ids; combine sends the expert outputs back with the reverse split.
    Runs on the comm stream in the ``"switch"`` schedule.

    Args:
        num_experts: total routed experts (divisible by the group size).
        group: the expert-parallel process group (default: the world).
        num_max_tokens_per_rank: static padded mode for CUDA graph capture (see
            ``_FlatA2ABackend``); ``None`` = exact splits, eager only.
    """

    def __init__(self, num_experts: int, group: Any = None, *,
                 num_max_tokens_per_rank: int | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedBackend needs torch.distributed to be "
                               "initialised (dist.init_process_group, e.g. under torchrun).")
        self.group = group
        self._dist = dist
        super().__init__(num_experts, dist.get_world_size(group), dist.get_rank(group),
                         num_max_tokens_per_rank)

    def _exchange_counts(self, send_counts):
        recv = torch.empty_like(send_counts)
        self._dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv

    def _exchange(self, send, send_splits, recv_splits):
        if recv_splits is None:
            out = torch.empty_like(send)
        else:
            out = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        self._dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits,
                                     group=self.group)
        return out


# -- deep_ep low-latency ------------------------------------------------------------------

class DeepEPLowLatencyBackend(MoEBackend):
    """Adapter over ``deep_ep.Buffer.low_latency_dispatch / low_latency_combine``.

    Uses ``return_recv_hook=True`` (``async_finish=False``): the send kernels return at
    once, ``hook()`` launches the receive. Hook schedule: two yields per MoE layer.

    deep_ep holds at most two low-latency results at once (double buffering), so at most
    two microbatches may have a dispatch or combine in flight: this adapter counts held
    results and raises before a third would be taken.

    Expert batches arrive in deep_ep's padded layout:
    ``recv_x`` ``[num_local_experts, num_max_dispatch_tokens_per_rank * world_size,
    hidden]`` bf16 and ``recv_count`` ``[num_local_experts]`` int32.

    Not run against real deep_ep here (it needs NVSHMEM with InfiniBand GPUDirect Async);
    tested against a double that enforces the same contract.

    Args:
        buffer: a ``deep_ep.Buffer`` made with ``low_latency_mode=True`` (or a double).
        num_experts: total routed experts.
        num_max_dispatch_tokens_per_rank: the largest microbatch, in tokens.
        use_fp8: let deep_ep cast the dispatch payload to FP8 (the experts then receive a
            ``(fp8, scales)`` pair, which ``ExpertBatch.linear`` does not handle; off by
            default).
    """

    schedule: ClassVar[Literal["switch", "hook"]] = "hook"
    MAX_HELD: ClassVar[int] = 2

    def __init__(self, buffer: Any, num_experts: int, num_max_dispatch_tokens_per_rank: int,
                 *, use_fp8: bool = False) -> None:
        self.buffer = buffer
        self.num_experts = num_experts
        group = getattr(buffer, "group", None)
        self.world_size = int(getattr(buffer, "group_size", None) or (
            group.size() if group is not None else 1))
        self.rank = int(getattr(buffer, "rank", 0))
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the "
                             f"expert-parallel size {self.world_size}.")
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.use_fp8 = use_fp8
        self.num_held = 0  # dispatch/combine results sent and not yet received

    @staticmethod
    def load_buffer_class() -> Any:
        """``deep_ep.Buffer``, imported on demand with a clear error when missing."""
        try:
            import deep_ep  # noqa: PLC0415
        except ImportError as e:
            raise ImportError("deep_ep is not installed: pip install 'coop-dbo[deepep]' "
                              "(needs NVSHMEM with InfiniBand GPUDirect Async).") from e
        return deep_ep.Buffer

    def _take(self, what: str) -> None:
        if self.num_held >= self.MAX_HELD:
            raise RuntimeError(
                f"deep_ep low-latency holds at most {self.MAX_HELD} results at once; a "
                f"third {what} was started while {self.num_held} were still held. Run at "
                "most two microbatches with this backend, and call each receive hook "
                "before the microbatch sends again.")
        self.num_held += 1

    def dispatch_send(self, x, topk_idx, topk_weights):
        validate_routing(x, topk_idx, topk_weights, self.num_experts)
        if x.shape[0] > self.num_max_dispatch_tokens_per_rank:
            raise ValueError(f"{x.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank="
                             f"{self.num_max_dispatch_tokens_per_rank}.")
        self._take("dispatch")
        try:
            recv_x, recv_count, handle, _event, hook = self.buffer.low_latency_dispatch(
                x, topk_idx, self.num_max_dispatch_tokens_per_rank, self.num_experts,
                use_fp8=self.use_fp8, async_finish=False, return_recv_hook=True)
        except BaseException:
            self.num_held -= 1
            raise
        return (recv_x, recv_count, (handle, topk_idx, topk_weights), hook)

    def dispatch_recv(self, pending):
        recv_x, recv_count, handle, hook = pending
        try:
            hook()
        finally:
            self.num_held -= 1
        return ExpertBatch(x=recv_x, layout="padded",
                           num_local_experts=self.num_local_experts,
                           recv_count=recv_count, handle=handle)

    def combine_send(self, expert_out, batch):
        handle, topk_idx, topk_weights = batch.handle
        self._take("combine")
        try:
            combined, _event, hook = self.buffer.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, async_finish=False,
                return_recv_hook=True)
        except BaseException:
            self.num_held -= 1
            raise
        return combined, hook

    def combine_recv(self, pending):
        combined, hook = pending
        try:
            hook()
        finally:
            self.num_held -= 1
        return combined


def swiglu_experts(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """An ``experts`` callable for ``moe_exchange``: SwiGLU MLP per local expert.

    Args:
        w_gate, w_up: ``[num_local_experts, hidden, intermediate]``.
        w_down: ``[num_local_experts, intermediate, hidden]``.
    """
    def run(batch: ExpertBatch) -> torch.Tensor:
        x = batch.x
        return batch.linear(F.silu(batch.linear(x, w_gate)) * batch.linear(x, w_up), w_down)
    return run
