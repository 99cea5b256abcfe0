"""Fault injection for the reliability tests, and the multi-process (gloo) workers.

Shared by ``test_faults.py``, ``test_load.py`` and ``test_faults_gpu.py``:

* ``YieldFaults``: raise an exception in microbatch ``i`` at its ``k``-th yield of a step
  (every yield ``moe_exchange`` makes counts, from 0), or when its model call returns
  (``k`` = yields per step). It patches the two yield functions ``moe_hooks`` calls and
  wraps the model, so it works with the reference ``MoEDecoder`` unchanged, through
  ``CoopDBORunner``, ``UBatchScheduler`` and CUDA graph capture.
* ``FaultyBackendMixin``: a backend that raises (or times out) in its send or receive.
* ``spawn_bounded``: run ``world`` spawned processes under a parent-side deadline and kill
  every child that is still alive when it returns, whatever happened.
* Workers for the gloo tests (``*_worker``), importable by spawned children.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from coop_dbo import backends, dbo_current_ubatch_id, moe_hooks

SMALL_CFG_KW = dict(num_layers=2, hidden=32, num_heads=2, head_dim=16, num_experts=4,
                    top_k=2, moe_intermediate=16, shared_intermediate=16, vocab_size=64,
                    max_batch=256, max_seq_len=16)


class InjectedFault(RuntimeError):
    """The exception the tests inject (never raised by coop_dbo itself)."""


# -- faults at yields ---------------------------------------------------------------------

class YieldFaults:
    """Raise ``make_exc()`` in microbatch ``ubatch`` at its yield number ``index``.

    The count restarts at 0 whenever a microbatch's model call starts (``wrap``), so it is
    the yield index within the step, as in the scheduler's trace. The fault fires in place
    of the yield (the microbatch raises instead of yielding); ``index`` equal to the number
    of yields per step fires when the wrapped model call returns. ``ubatch=None`` or
    ``armed=False`` never fires. With ``only_capture`` it fires only in a step that runs
    under CUDA graph capture (decided when each microbatch starts).

    ``started`` / ``cleaned`` record, per step, which microbatches entered the model and
    whose ``finally`` ran (in order).
    """

    def __init__(self, ubatch: int | None = None, index: int = 0,
                 make_exc: Callable[[], BaseException] | None = None, *,
                 only_capture: bool = False) -> None:
        self.ubatch = ubatch
        self.index = index
        self.make_exc = make_exc or (lambda: InjectedFault(
            f"injected fault in microbatch {self.ubatch} at yield {self.index}"))
        self.only_capture = only_capture
        self.armed = True
        self.fired = 0
        self.counts: dict[int, int] = {}
        self.capturing: dict[int, bool] = {}
        self.started: list[int] = []
        self.cleaned: list[int] = []
        self._saved: dict[str, Any] = {}

    def set(self, ubatch: int | None, index: int = 0,
            make_exc: Callable[[], BaseException] | None = None) -> None:
        self.ubatch, self.index = ubatch, index
        if make_exc is not None:
            self.make_exc = make_exc
        self.fired = 0
        self.started.clear()
        self.cleaned.clear()

    def _due(self, ub: int, k: int) -> bool:
        if not self.armed or ub != self.ubatch or k != self.index:
            return False
        return not self.only_capture or self.capturing.get(ub, False)

    def _fire(self) -> None:
        self.fired += 1
        raise self.make_exc()

    def _count(self) -> None:
        ub = dbo_current_ubatch_id()
        if ub is None:
            return
        k = self.counts.get(ub, 0)
        self.counts[ub] = k + 1
        if self._due(ub, k):
            self._fire()

    # the yield functions moe_exchange calls, counted
    def _yield(self, site: str = "") -> None:
        self._count()
        self._saved["dbo_yield"](site)

    def _yield_and_switch(self, to: str, site: str = "") -> None:
        self._count()
        self._saved["dbo_yield_and_switch"](to, site)

    def install(self) -> None:
        if self._saved:
            return
        for name in ("dbo_yield", "dbo_yield_and_switch"):
            self._saved[name] = getattr(moe_hooks, name)
        moe_hooks.dbo_yield = self._yield  # type: ignore[assignment]
        moe_hooks.dbo_yield_and_switch = self._yield_and_switch  # type: ignore[assignment]

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(moe_hooks, name, fn)
        self._saved.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[YieldFaults]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    def wrap(self, model: Callable[..., Any]) -> Callable[..., Any]:
        """``model`` with the per-step count reset and the at-return fault."""

        def faulty_model(*args: Any, **kwargs: Any) -> Any:
            ub = dbo_current_ubatch_id()
            if ub is None:
                return model(*args, **kwargs)
            self.counts[ub] = 0
            if self.only_capture:
                self.capturing[ub] = bool(torch.cuda.is_available()
                                          and torch.cuda.is_current_stream_capturing())
            self.started.append(ub)
            try:
                out = model(*args, **kwargs)
                if self._due(ub, self.counts[ub]):
                    self._fire()
                return out
            finally:
                self.cleaned.append(ub)

        return faulty_model


# -- faulty communication backends --------------------------------------------------------

class FaultyBackendMixin:
    """Mix into a ``MoEBackend``: method ``fault_method`` raises at its ``fault_call``-th call
    made by microbatch ``fault_ubatch`` (``None``: any caller, counting every call).

    ``fault_kind``: ``"raise"`` raises ``InjectedFault`` at once; ``"timeout"`` first
    blocks for ``timeout_s`` (a transfer that never completes) and then raises
    ``TimeoutError``, as a communication library with a deadline does; ``"hang"`` waits
    up to ``timeout_s`` in a loop of 5 ms sleeps (a host-side wait polling a transfer
    that never completes), then raises ``TimeoutError``.
    """

    fault_method: str | None = None
    fault_ubatch: int | None = None
    fault_call: int = 0
    fault_kind: str = "raise"
    timeout_s: float = 0.02

    def arm_fault(self, method: str | None, ubatch: int | None = None, call: int = 0,
                  kind: str = "raise") -> None:
        self.fault_method, self.fault_ubatch, self.fault_call = method, ubatch, call
        self.fault_kind = kind
        self.fault_calls: dict[Any, int] = {}
        self.fault_fired = 0

    def maybe_fault(self, method: str) -> None:
        if method != getattr(self, "fault_method", None):
            return
        ub = dbo_current_ubatch_id()
        if self.fault_ubatch is not None and ub != self.fault_ubatch:
            return
        n = self.fault_calls.get(ub, 0)
        self.fault_calls[ub] = n + 1
        if n != self.fault_call:
            return
        self.fault_fired += 1
        if self.fault_kind == "hang":
            t0 = time.monotonic()
            while time.monotonic() - t0 < self.timeout_s:
                time.sleep(0.005)
            raise TimeoutError(f"{method} hung for {self.timeout_s:g} s (microbatch {ub}, "
                               f"call {n})")
        if self.fault_kind == "timeout":
            time.sleep(self.timeout_s)
            raise TimeoutError(f"{method} timed out after {self.timeout_s * 1e3:.0f} ms "
                               f"(microbatch {ub}, call {n})")
        raise InjectedFault(f"{method} failed (microbatch {ub}, call {n})")


class FaultySingleProcessBackend(FaultyBackendMixin, backends.SingleProcessBackend):
    """``SingleProcessBackend`` whose phases can fail: ``dispatch_pack`` /
    ``dispatch_transfer`` / ``dispatch_unpack`` and the same for combine (the switch
    schedule calls these; ``*_pack`` and ``*_unpack`` run on the compute stream, the
    transfers on the comm stream)."""

    PHASES = ("dispatch_pack", "dispatch_transfer", "dispatch_unpack", "combine_pack",
              "combine_transfer", "combine_unpack")

    def dispatch_pack(self, x, topk_idx, topk_weights):
        self.maybe_fault("dispatch_pack")
        return super().dispatch_pack(x, topk_idx, topk_weights)

    def dispatch_transfer(self, packed):
        self.maybe_fault("dispatch_transfer")
        return super().dispatch_transfer(packed)

    def dispatch_unpack(self, received):
        self.maybe_fault("dispatch_unpack")
        return super().dispatch_unpack(received)

    def combine_pack(self, expert_out, batch):
        self.maybe_fault("combine_pack")
        return super().combine_pack(expert_out, batch)

    def combine_transfer(self, packed):
        self.maybe_fault("combine_transfer")
        return super().combine_transfer(packed)

    def combine_unpack(self, received):
        self.maybe_fault("combine_unpack")
        return super().combine_unpack(received)


class FaultyTorchDistributedBackend(FaultyBackendMixin, backends.TorchDistributedBackend):
    """``TorchDistributedBackend`` whose payload exchange (``_exchange``) can fail.

    One more ``fault_kind``, ``"stuck"``: the exchange waits in a real receive from the
    next rank on a tag nobody sends (blocked inside the communication library, as in a
    transfer whose peer never answers) until the group's timeout or until something
    breaks the group.
    """

    STUCK_TAG = 4242

    def maybe_fault(self, method: str) -> None:
        if getattr(self, "fault_kind", "raise") == "stuck" and method == self.fault_method:
            ub = dbo_current_ubatch_id()
            if self.fault_ubatch is None or ub == self.fault_ubatch:
                n = self.fault_calls.get(ub, 0)
                self.fault_calls[ub] = n + 1
                if n == self.fault_call:
                    self.fault_fired += 1
                    peer = (self.rank + 1) % self.world_size
                    self._dist.recv(torch.zeros(1), src=peer, group=self.group,
                                    tag=self.STUCK_TAG)
                    raise InjectedFault(f"{method} got data it never should have")
            return
        super().maybe_fault(method)

    def _exchange(self, send, send_splits, recv_splits):
        self.maybe_fault("_exchange")
        return super()._exchange(send, send_splits, recv_splits)


def faulty_deep_ep_buffer() -> Any:
    """The deep_ep double (``tests/deep_ep_double.py``) with a fault in the send or the
    receive hook of dispatch or combine: arm with ``arm_fault(method, ubatch, call, kind)``,
    ``method`` one of ``dispatch_send``, ``dispatch_hook``, ``combine_send``,
    ``combine_hook``. A failing send holds nothing; a failing hook releases its buffer
    (the receive gave up) before raising."""
    from deep_ep_double import FakeLowLatencyBuffer

    class Faulty(FaultyBackendMixin, FakeLowLatencyBuffer):
        def _hooked(self, hook: Any, name: str) -> Any:
            def faulty_hook() -> None:
                try:
                    self.maybe_fault(name)
                except BaseException:
                    self.num_held -= 1
                    raise
                hook()
            return faulty_hook

        def low_latency_dispatch(self, *args: Any, **kwargs: Any) -> Any:
            self.maybe_fault("dispatch_send")
            recv_x, count, handle, event, hook = super().low_latency_dispatch(*args, **kwargs)
            return recv_x, count, handle, event, self._hooked(hook, "dispatch_hook")

        def low_latency_combine(self, *args: Any, **kwargs: Any) -> Any:
            self.maybe_fault("combine_send")
            combined, event, hook = super().low_latency_combine(*args, **kwargs)
            return combined, event, self._hooked(hook, "combine_hook")

    buf = Faulty()
    buf.arm_fault(None)
    return buf


# -- processes ----------------------------------------------------------------------------

def spawn_bounded(fn: Callable[..., None], args: tuple, world: int = 2,
                  deadline_s: float = 120.0) -> tuple[list[int | None], float]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes.

    Returns the exit codes and the wall time. Children still alive at ``deadline_s`` are
    killed (exit code ``None`` then); every child is killed in a ``finally``, so no process
    outlives the call, also when the caller is interrupted.
    """
    import torch.multiprocessing as mp

    t0 = time.monotonic()
    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, start_method="spawn",
                             join=False)
    codes: list[int | None] = [None] * world
    try:
        while time.monotonic() - t0 < deadline_s:
            if all(not p.is_alive() for p in ctx.processes):
                break
            time.sleep(0.1)
        for i, p in enumerate(ctx.processes):
            if not p.is_alive():
                codes[i] = p.exitcode
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
    return codes, time.monotonic() - t0


def _init(rank: int, world: int, rendezvous: str, timeout_s: float) -> None:
    from helpers import init_group

    init_group("gloo", rank, world, rendezvous, timeout_s)


def wait_for_peers(out_dir: str, tag: str, rank: int, world: int, limit_s: float) -> None:
    """A file barrier that needs no process group (the group may be broken)."""
    open(os.path.join(out_dir, f"{tag}.{rank}"), "w").close()
    t0 = time.monotonic()
    while not all(os.path.exists(os.path.join(out_dir, f"{tag}.{r}")) for r in range(world)):
        if time.monotonic() - t0 > limit_s:
            raise TimeoutError(f"rank {rank}: peers did not reach {tag!r} in {limit_s} s")
        time.sleep(0.02)


def end_group(out_dir: str, rank: int, world: int, tag: str = "end") -> None:
    """The end of a gloo worker: wait until every rank got here (a file barrier, so a
    broken group is no obstacle), then leave.

    Without an error in flight the process exits at once (``os._exit(0)``, output
    flushed, results already saved): tearing gloo down made a worker abort now and then
    in a full ``make test`` ("terminate called without an active exception", exit code
    -6) after all its work was done. With an error in flight the group is destroyed and
    the error goes on to the parent.
    """
    import torch.distributed as dist

    try:
        wait_for_peers(out_dir, tag, rank, world, 60.0)
    except TimeoutError:
        pass  # a peer died: nothing to wait for
    if sys.exc_info()[0] is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if dist.is_initialized():
        dist.destroy_process_group()


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "msg": str(exc),
            "notes": list(getattr(exc, "__notes__", [])),
            "ubatch_id": getattr(exc, "ubatch_id", None)}


def step_inputs(cfg: Any, batch: int, step: int, seed: int, rank: int = 0
                ) -> tuple[torch.Tensor, ...]:
    """Decode inputs (``batch`` <= 8) whose KV-cache slots are fresh for every ``step`` and
    rank (16 slots per step, 8 per rank), so a one-process model with an empty cache is
    the reference whatever ran before."""
    assert batch <= 8 and 16 * (step + 1) <= cfg.max_batch
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    positions = torch.randint(0, cfg.max_seq_len, (batch,), generator=g)
    slots = torch.arange(batch) + 16 * step + 8 * rank
    return tokens, positions, slots


class SwitchableCostModel:
    """``should_overlap`` says yes, no, or raises ``exc`` (set per step)."""

    def __init__(self) -> None:
        self.answer: bool | BaseException = True

    def should_overlap(self, num_tokens: int) -> bool:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


#: (rank 0 batch, rank 1 batch, what changes on which rank) of ``disagreement_worker``.
DISAGREEMENT_STEPS: list[tuple[int, int, str]] = [
    (6, 5, "both microbatch"),
    (6, 5, "rank 1 disabled"),
    (6, 5, "rank 0 min_tokens"),
    (6, 5, "rank 1 cost model says no"),
    (6, 1, "rank 1 batch of one"),
    (6, 5, "rank 0 cost model raises ValueError"),
    (6, 5, "rank 1 cost model raises KeyboardInterrupt"),
    (4, 7, "both microbatch again"),
]


def disagreement_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """Ranks that disagree about microbatching, or fail while planning: same decision or
    an error on every rank, and the group stays in step (the last step works)."""
    import torch.distributed as dist

    from coop_dbo import CoopDBORunner
    from coop_dbo.models import MoEConfig, MoEDecoder

    _init(rank, world, rendezvous, 30.0)
    results: list[dict[str, Any]] = []
    try:
        cfg = MoEConfig.tiny(**SMALL_CFG_KW)
        model = MoEDecoder(cfg, backends.TorchDistributedBackend(cfg.num_experts))
        cost = SwitchableCostModel()
        runner = CoopDBORunner(model, process_group=dist.group.WORLD, cost_model=cost)
        for step, (b0, b1, what) in enumerate(DISAGREEMENT_STEPS):
            runner.enabled, runner.min_tokens, cost.answer = True, 0, True
            if what == f"rank {rank} disabled":
                runner.enabled = False
            elif what == f"rank {rank} min_tokens":
                runner.min_tokens = 100
            elif what == f"rank {rank} cost model says no":
                cost.answer = False
            elif what == f"rank {rank} cost model raises ValueError":
                cost.answer = ValueError("cost model broke")
            elif what == f"rank {rank} cost model raises KeyboardInterrupt":
                cost.answer = KeyboardInterrupt()
            inputs = step_inputs(cfg, (b0, b1)[rank], step, seed=100 * step + rank, rank=rank)
            t0 = time.monotonic()
            rec: dict[str, Any] = {"step": step, "inputs": inputs}
            try:
                out = runner(*inputs)
                rec.update(path=runner.last_path, reason=runner.last_reason, out=out)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc))
            rec["elapsed"] = time.monotonic() - t0
            results.append(rec)
    finally:
        torch.save(results, os.path.join(out_dir, f"disagree{rank}.pt"))
        end_group(out_dir, rank, world)


#: (rank 0 scale, rank 1 scale, rank whose capture fails) per step of
#: ``graph_agreement_worker``; a scale is a value of the call, so a new one is a new graph;
#: scale 0: that rank's batch is 12 rows (no captured size holds it), with scale 1.
GRAPH_AGREEMENT_STEPS: list[tuple[float, float, int | None]] = [
    (1.0, 1.0, None),  # both capture
    (1.0, 1.0, None),  # both replay
    (1.0, 2.0, None),  # rank 1 has a new call: both capture (rank 0 again)
    (1.0, 1.0, None),  # both replay
    (3.0, 3.0, 1),     # both capture, rank 1's capture fails: both eager
    (3.0, 3.0, None),  # that graph failed: both eager
    (1.0, 1.0, None),  # both replay
    (1.0, 0.0, None),  # rank 1 brings 12 rows, more than any graph: both eager
    (1.0, 1.0, None),  # both replay
]


class _Scaled(torch.nn.Module):
    """The decoder called with keywords, and a value (``scale``) that is part of its key."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
        return self.model(tokens, positions, slots) * scale


def graph_agreement_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """Expert parallelism through the whole-call graph path (stand-in graphs, gloo): ranks
    whose graphs differ still replay, capture or run eagerly together. Each step's output
    and path per rank, with graphs and then with every step eager DBO."""
    import torch.distributed as dist
    from helpers import StandInCallGraph, stand_in_graphs

    from coop_dbo import CoopDBORunner
    from coop_dbo.models import MoEConfig, MoEDecoder

    class Injectable(StandInCallGraph):
        fail = False

    stand_in_graphs(setattr, Injectable)
    _init(rank, world, rendezvous, 30.0)
    results: dict[str, list[Any]] = {"graph": [], "eager": []}
    try:
        cfg = MoEConfig.tiny(**SMALL_CFG_KW)
        model = _Scaled(MoEDecoder(cfg, backends.TorchDistributedBackend(cfg.num_experts)))
        for mode in ("graph", "eager"):
            runner = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always")
            runner.graph_sizes = [8] if mode == "graph" else []  # (the argument needs CUDA)
            for step, (*scales, failing) in enumerate(GRAPH_AGREEMENT_STEPS):
                tokens, positions, slots = step_inputs(cfg, 8, step, seed=10 * step + rank,
                                                       rank=rank)
                scale = scales[rank]
                if scale == 0.0:  # 12 rows, in slots no step uses
                    scale = 1.0
                    tokens, positions = tokens.repeat(2)[:12], positions.repeat(2)[:12]
                    slots = torch.arange(cfg.max_batch - 12, cfg.max_batch)
                Injectable.fail = failing == rank
                out = runner(tokens=tokens, positions=positions, slots=slots, scale=scale)
                results[mode].append({"path": runner.last_path, "out": out})
    finally:
        torch.save(results, os.path.join(out_dir, f"graphs{rank}.pt"))
        end_group(out_dir, rank, world)


def _watched_whole_call_runners(out_dir: str) -> tuple[Any, Any, Any]:
    """``(cfg, runner, eager)`` for a gloo worker's whole calls: the ``_Scaled`` decoder
    over ``TorchDistributedBackend``; ``runner`` with graph size 8 (stand-in graphs) and
    a watchdog, ``eager`` without graphs. (With a watchdog, an error raised in the run
    phase breaks the group unless every rank raises it together: the workers' errors
    are, so the group must stay usable.)"""
    import torch.distributed as dist

    from coop_dbo import CoopDBORunner
    from coop_dbo.models import MoEConfig, MoEDecoder

    cfg = MoEConfig.tiny(**SMALL_CFG_KW)
    model = _Scaled(MoEDecoder(cfg, backends.TorchDistributedBackend(cfg.num_experts)))
    runner = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always",
                           watchdog_s=60, dump_dir=out_dir)
    runner.graph_sizes = [8]  # (the argument needs CUDA)
    eager = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always")
    return cfg, runner, eager


def interrupted_capture_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """Whole calls (stand-in graphs, gloo, a watchdog): in step 1 both ranks capture a new
    call and rank 1 is interrupted there (``KeyboardInterrupt`` where a capture would
    fail). Both must stop that step (rank 0 going on into the eager step's collectives
    would wait for a rank that left), the group must stay usable, and the next call must
    capture again on both and replay after. Each step's path or error, and output."""
    from helpers import StandInCallGraph, stand_in_graphs

    class Interruptible(StandInCallGraph):
        interrupt = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if type(self).interrupt:
                raise KeyboardInterrupt

    stand_in_graphs(setattr, Interruptible)
    _init(rank, world, rendezvous, 30.0)
    results: list[dict[str, Any]] = []
    try:
        cfg, runner, eager = _watched_whole_call_runners(out_dir)
        for step, scale in enumerate((1.0, 2.0, 2.0, 2.0)):
            tokens, positions, slots = step_inputs(cfg, 8, step, seed=10 * step + rank,
                                                   rank=rank)
            kwargs = {"tokens": tokens, "positions": positions, "slots": slots,
                      "scale": scale}
            Interruptible.interrupt = step == 1 and rank == 1
            rec: dict[str, Any] = {"step": step}
            try:
                rec.update(out=runner(**kwargs), path=runner.last_path)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc))
            Interruptible.interrupt = False
            if rec["path"] != "error":
                rec["eager"] = eager(**kwargs)
            results.append(rec)
    finally:
        torch.save(results, os.path.join(out_dir, f"interrupted{rank}.pt"))
        end_group(out_dir, rank, world)


def late_split_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """Whole calls (stand-in graphs, gloo): rank 0 holds the step's graph, so it skips the
    split before the ranks agree, while rank 1 brings a new call that must be captured.
    Rank 0's split then fails: both ranks must raise, not rank 0 alone while rank 1
    captures. Then a good step replays on both; then rank 1 fails to plan while rank 0
    skips its split again (both raise, no rank waits in a further agreement)."""
    from helpers import stand_in_graphs

    from coop_dbo.split import _DefaultPlan

    stand_in_graphs(setattr)
    split = _DefaultPlan.split
    fail_split = False

    def failing_split(plan: Any, sizes: list[int]) -> Any:
        if fail_split:
            raise RuntimeError("split failed (stand-in)")
        return split(plan, sizes)
    _DefaultPlan.split = failing_split  # type: ignore[method-assign]
    _init(rank, world, rendezvous, 30.0)
    results: list[dict[str, Any]] = []
    try:
        cfg, runner, eager = _watched_whole_call_runners(out_dir)
        plan = runner._splitter.plan

        def failing_plan(*_: Any) -> Any:
            raise RuntimeError("plan failed (stand-in)")
        steps = [(1.0, ""), (float(1 + rank), "split" if rank == 0 else ""), (1.0, ""),
                 (float(1 + rank), "plan" if rank == 1 else ""), (1.0, "")]
        for step, (scale, fault) in enumerate(steps):
            tokens, positions, slots = step_inputs(cfg, 8, step, seed=10 * step + rank,
                                                   rank=rank)
            kwargs = {"tokens": tokens, "positions": positions, "slots": slots,
                      "scale": scale}
            fail_split = fault == "split"
            if fault == "plan":  # a planning failure on rank 1 while rank 0 skips its split
                runner._splitter.plan = failing_plan  # type: ignore[method-assign]
            rec: dict[str, Any] = {"step": step}
            try:
                rec.update(out=runner(**kwargs), path=runner.last_path)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc))
            fail_split = False
            runner._splitter.plan = plan  # type: ignore[method-assign]
            rec["eager"] = eager(**kwargs)
            results.append(rec)
    finally:
        torch.save(results, os.path.join(out_dir, f"split{rank}.pt"))
        end_group(out_dir, rank, world)


#: (what happens on rank 1, how rank 0 calls) per step of ``capture_failure_worker``.
CAPTURE_FAILURE_STEPS: list[tuple[str, str]] = [
    ("example inputs raise", "batch tensors"),  # sizes 16 then 8: fails at 16, both stop
    ("capture fails", "batch tensors"),         # the same, a failed capture
    ("", "batch tensors"),                      # both capture, replay
    ("graphs released", "batch tensors"),       # rank 1 must capture: rank 0 captures too
    ("", "slots by keyword"),                   # a whole call on rank 0: both eager
    ("", "batch tensors"),                      # both replay
]


def capture_failure_worker(rank: int, world: int, rendezvous: str, out_dir: str,
                           watchdog: bool = False) -> None:
    """The batch-tensor graph path under expert parallelism (stand-in graphs, gloo). The
    first calls capture sizes 16 then 8, and rank 1 fails at 16 (its example inputs, then
    its capture): every rank must stop at that size (rank 0 going on to warm up size 8
    would wait in an all-to-all for ever). Then ranks that differ in having graphs capture
    together, and calls that take different graph paths on the two ranks run eagerly;
    every output is eager DBO's. ``watchdog``: the runner has one (an error raised in the
    run phase breaks the group, unless every rank raises it together, as here)."""
    import torch.distributed as dist
    from helpers import StandInCallGraph, StandInStepGraph, stand_in_graphs

    from coop_dbo import CoopDBORunner
    from coop_dbo.models import MoEConfig, MoEDecoder

    class Injectable(StandInStepGraph):
        fail = False

    stand_in_graphs(setattr, StandInCallGraph, Injectable)
    _init(rank, world, rendezvous, 30.0)
    results: list[dict[str, Any]] = []
    try:
        cfg = MoEConfig.tiny(**SMALL_CFG_KW)
        model = MoEDecoder(cfg, backends.TorchDistributedBackend(cfg.num_experts))
        runner = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always",
                               watchdog_s=60 if watchdog else None, dump_dir=out_dir)
        runner.graph_sizes = [8, 16]  # (the argument needs CUDA)
        example_fails = False

        def example(size: int) -> tuple[torch.Tensor, ...]:  # distinct slots, unused ones
            if example_fails:
                raise RuntimeError("out of memory making the example inputs (stand-in)")
            tokens, positions, _ = step_inputs(cfg, 8, 0, seed=rank, rank=rank)
            return (tokens.repeat(2)[:size], positions.repeat(2)[:size],
                    torch.arange(cfg.max_batch - size, cfg.max_batch))
        runner.graph_example_inputs = example
        eager = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always")
        for step, (on_rank1, how) in enumerate(CAPTURE_FAILURE_STEPS):
            tokens, positions, slots = step_inputs(cfg, 8, step, seed=10 * step + rank,
                                                   rank=rank)
            mine = on_rank1 if rank == 1 else ""
            example_fails = mine == "example inputs raise"
            Injectable.fail = mine == "capture fails"
            if mine == "graphs released":
                runner.release_graphs()
            rec: dict[str, Any] = {"step": step}
            try:
                out = (runner(tokens, positions, slots=slots)
                       if how == "slots by keyword" and rank == 0
                       else runner(tokens, positions, slots))
                rec.update(out=out, path=runner.last_path)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc))
            example_fails = Injectable.fail = False
            rec["eager"] = eager(tokens, positions, slots)
            results.append(rec)
    finally:
        torch.save(results, os.path.join(out_dir, f"capture{rank}.pt"))
        end_group(out_dir, rank, world)


def capture_agreement_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """``CoopDBORunner._capture_agreement`` on two gloo ranks: both agree (no failure, then
    rank 1 failed); then rank 1's all_reduce is another collective of the same size (as a
    peer's, failed inside a warm-up, could be), so rank 0 must report a failure that was
    not agreed. Saves ``(returned, failed together)`` per round."""
    import torch.distributed as dist

    from coop_dbo import CoopDBORunner

    _init(rank, world, rendezvous, 30.0)
    results: list[tuple[bool, bool]] = []
    try:
        runner = CoopDBORunner(torch.nn.Identity(), process_group=dist.group.WORLD)
        for failed in (False, rank == 1):
            results.append((runner._capture_agreement(failed),
                            runner._capture_failed_together))
        if rank == 0:
            results.append((runner._capture_agreement(True), runner._capture_failed_together))
        else:
            dist.all_reduce(torch.tensor([0, 0, 0], dtype=torch.int64), op=dist.ReduceOp.MAX)
    finally:
        torch.save(results, os.path.join(out_dir, f"agree{rank}.pt"))
        end_group(out_dir, rank, world)


#: The faults of ``midstep_fault_worker``, one per round (a round ends by re-creating the
#: process group, which a mid-step fault leaves out of step).
MIDSTEP_FAULTS = ["model raises at a yield", "send raises"]


def midstep_fault_worker(rank: int, world: int, rendezvous: list[str], timeout_s: float,
                         out_dir: str) -> None:
    """Rank 1 fails after the ranks agreed to microbatch; rank 0 waits in an all-to-all.

    Round r: a good step, then the faulty step (both ranks call the runner; rank 1
    fails), a file barrier, then the process group is destroyed and re-created on
    ``rendezvous[r + 1]``; the last round is one good step on the fresh group.
    """
    import torch.distributed as dist

    from coop_dbo import CoopDBORunner
    from coop_dbo.models import MoEConfig, MoEDecoder

    results: list[dict[str, Any]] = []
    cfg = MoEConfig.tiny(**SMALL_CFG_KW)
    faults = YieldFaults(None)
    faults.install()
    step = 0
    try:
        _init(rank, world, rendezvous[0], timeout_s)
        backend = FaultyTorchDistributedBackend(cfg.num_experts)
        backend.arm_fault(None)
        model = MoEDecoder(cfg, backend)
        runner = CoopDBORunner(faults.wrap(model), process_group=dist.group.WORLD,
                               decide="always")

        def one_step(kind: str) -> None:
            nonlocal step
            inputs = step_inputs(cfg, 6 - rank, step, seed=1000 + 10 * step + rank,
                                 rank=rank)
            rec: dict[str, Any] = {"step": step, "kind": kind, "inputs": inputs}
            t0 = time.monotonic()
            try:
                out = runner(*inputs)
                rec.update(path=runner.last_path, out=out)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc))
            rec["elapsed"] = time.monotonic() - t0
            results.append(rec)
            step += 1

        for r, fault in enumerate(MIDSTEP_FAULTS):
            one_step("good")
            if rank == 1 and fault == "model raises at a yield":
                faults.set(0, 2)  # microbatch 0, yield 2 (moe.combine of layer 0)
            elif rank == 1 and fault == "send raises":
                backend.arm_fault("_exchange", ubatch=1, call=1)  # its dispatch payload
            one_step(fault)
            faults.set(None)
            backend.arm_fault(None)
            # The group is out of step now: re-create it (all ranks), then go on.
            wait_for_peers(out_dir, f"round{r}", rank, world, 4 * timeout_s + 30)
            dist.destroy_process_group()
            _init(rank, world, rendezvous[r + 1], timeout_s)
            runner.process_group = dist.group.WORLD
        one_step("good")
    finally:
        faults.uninstall()
        torch.save(results, os.path.join(out_dir, f"midstep{rank}.pt"))
        end_group(out_dir, rank, world)
