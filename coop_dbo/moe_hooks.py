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
Backends never deal with this themselves. (Waits are preferred to ``record_stream``: each
record makes the allocator record and later query a CUDA event, a host cost per tensor.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .backends.base import SAME_STREAM, ExpertBatch, MoEBackend
from .greenlet_sched import dbo_streams, dbo_yield, dbo_yield_and_switch
from .watchdog import current_monitor

__all__ = [
    "moe_exchange",
    "YIELD_SITES",
    "layer_sites",
    "swiglu_experts",
]

#: The yield sites of one MoE layer, per schedule, in order.
YIELD_SITES: dict[str, tuple[str, ...]] = {
    "switch": ("moe.dispatch", "moe.experts", "moe.combine", "moe.post"),
    "hook": ("moe.dispatch", "moe.combine"),
}

#: Per dataclass type, the fields ``_mark`` walks (those without ``SAME_STREAM``).
_MARKED_FIELDS: dict[type, tuple[str, ...]] = {}
_SAME_STREAM_KEY = next(iter(SAME_STREAM))


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
                          if not f.metadata.get(_SAME_STREAM_KEY))
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


def _checked(y: Any, batch: ExpertBatch, x: torch.Tensor) -> torch.Tensor:
    """``y``, the experts' output, if it has one row per row of ``batch.x`` and the width of
    the tokens ``x``; else a clear error (the combine would fail deep inside, or broadcast
    a ``[rows, 1]`` output silently)."""
    rows = batch.x[0] if isinstance(batch.x, (tuple, list)) else batch.x  # fp8: (x, scales)
    want = (*rows.shape[:-1], x.shape[-1])
    if isinstance(y, torch.Tensor) and y.shape == want:
        return y
    got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
    raise ValueError(
        f"moe_exchange: the experts callable returned {got} for an ExpertBatch whose x is "
        f"{tuple(rows.shape)} ({batch.layout} layout): it must return one output row per "
        f"row of batch.x, as wide as the tokens' hidden size {x.shape[-1]}, i.e. a tensor "
        f"of shape {want}.")


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
    monitor = current_monitor()
    if monitor is not None:  # a runner's watchdog is on: record each backend call
        backend = monitor.probe(backend)
    sites = _sites(backend.schedule, site_prefix)
    if backend.schedule == "hook":
        pending = backend.dispatch_send(x, topk_idx, topk_weights)
        _yield_holding(backend.dispatch_recv, pending, sites[0])
        batch = backend.dispatch_recv(pending)
        shared = shared_experts(x) if shared_experts is not None else None
        y = _checked(experts(batch), batch, x)
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
        y = _checked(experts(batch), batch, x)
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
