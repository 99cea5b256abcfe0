"""The microbatch scheduler: one greenlet per microbatch, on the caller's thread.

``UBatchScheduler.run(fns)`` starts microbatch 0; every ``dbo_yield`` hands the thread to
the next live microbatch in round-robin order by switching greenlets directly (no trip
through a scheduler loop). When a microbatch returns, control comes back to ``run``, which
resumes the next live one. So for symmetric microbatches the order is always::

    ub0 to its yield 0, ub1 to its yield 0, ..., ub0 to its yield 1, ub1 to its yield 1, ...

What follows a microbatch across every switch (greenlets share one thread):

* its id and its own ``contextvars`` context (``greenlet.gr_context``, set before the
  greenlet starts, a copy of the caller's context);
* torch's current CUDA stream, saved on yield and restored on resume (only when CUDA is
  initialised; this module imports torch lazily and works without it).

Symmetry is checked at every yield and every return: the first microbatch to reach yield
index ``k`` fixes the site of index ``k``; any other microbatch that yields a different
site there, yields more often than one that already returned, or returns after fewer
yields than another made, raises ``YieldAsymmetryError`` at that moment, in that step.

Any exception in a microbatch unwinds the others (``GreenletExit`` is thrown into each
started one, so its ``finally`` blocks run, and yields during that unwinding do nothing),
restores the caller's stream, and re-raises the original exception with a note naming
the microbatch. The scheduler is reusable right after.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import greenlet

from .errors import SchedulerStateError, YieldAsymmetryError
from .trace.record import TraceEntry, UBatchPosition

__all__ = [
    "UBatchScheduler",
    "bind_microbatch",
    "dbo_yield",
    "dbo_yield_and_switch",
    "dbo_current_ubatch_id",
    "MAX_UBATCHES",
]

MAX_UBATCHES = 8

# Trace kinds of stream-switching yields (no string built per yield).
_SWITCH_KIND = {"comm": "switch->comm", "compute": "switch->compute"}

# Set on first CUDA use: the C-level event record / wait, skipping Python wrappers.
_event_record: Any = None
_event_wait: Any = None
# Set on first use with torch loaded: torch's per-thread grad mode, read and set in C.
_is_grad_enabled: Any = None
_set_grad_enabled: Any = None

# The microbatch running in the current context, or None outside a scheduler. Every
# microbatch greenlet runs in its own copy of the caller's context with this set, so a
# lookup here is all a yield needs to find its scheduler, also with several threads each
# running their own scheduler.
_CURRENT: contextvars.ContextVar[_UBatch | None] = contextvars.ContextVar(
    "coop_dbo_current_ubatch", default=None)


def _describe(kind: str) -> str:
    return "a plain yield" if kind == "yield" else (
        "a stream switch" if kind == "switch" else f"a stream switch to {kind[8:]}")


class _UBatch:
    """One microbatch of one ``run``."""

    __slots__ = ("id", "step", "succ", "glet", "num_yields", "done", "stream_key", "event",
                 "nvtx_open", "streams")

    def __init__(self, ubatch_id: int, step: _Step) -> None:
        self.id = ubatch_id
        self.step = step
        self.succ: _UBatch = self  # the next microbatch in round-robin order (set by _Step)
        self.glet: greenlet.greenlet | None = None
        self.num_yields = 0  # yields made so far; equals the index of the next yield
        self.done = False  # its function returned or raised
        self.stream_key: Any = None  # CUDA stream key saved at its last yield (CUDA only)
        self.event: Any = None  # its reusable CUDA event for stream-switching yields
        self.nvtx_open = False  # an NVTX range of this microbatch is pushed
        self.streams: Any = None  # the step's DeviceStreams on CUDA, else None

    # The microbatch protocol that dbo_yield & co. call (see bind_microbatch): id,
    # streams, yield_(site), switch_(to, site).

    def yield_(self, site: str, kind: str = "yield", resume_key: Any = None,
               cur_key: Any = None) -> None:
        """Hand the thread to the next live microbatch; return when resumed.

        This is the hot path (one call per yield). The common case (no tracing, nobody
        finished, same site as the others) costs one flag test, one list lookup and one
        string comparison before the greenlet switch; with torch loaded one read of the
        grad mode, and on CUDA one read of the current stream, each written back only
        when it differs on resume.

        Args:
            resume_key: the stream to be on when resumed (default: the current one).
            cur_key: the current stream's key if the caller already read it.
        """
        step = self.step
        k = self.num_yields
        sites = step.sites
        if step.slow or k >= len(sites) or sites[k] != site or step.kinds[k] is not kind:
            if step.aborting:
                return
            step.check_yield(self, site, kind)  # appends a new site, or raises
            if step.trace is not None:
                step.record(self, site, kind)
                if self.nvtx_open:
                    step.nvtx.range_pop()
                    self.nvtx_open = False
        self.num_yields = k + 1
        nxt = self.succ
        if nxt.done:
            nxt = step.next_live(self.id)  # type: ignore[assignment]  # self is live: never None
        streams = step.streams
        if streams is not None:
            # handoff_key: the stream current on this thread as the next greenlet runs.
            key = streams.current_key() if cur_key is None else cur_key
            step.handoff_key = key
            self.stream_key = key if resume_key is None else resume_key
        if nxt is not self and nxt is not None:
            grad = step.grad  # torch's grad mode is per thread: carry this microbatch's
            if grad is not None:
                grad = _is_grad_enabled()
            step.current = nxt.id
            nxt.glet.switch()  # type: ignore[union-attr]  # set for all before run starts
            if grad is not None and _is_grad_enabled() != grad:
                _set_grad_enabled(grad)
            if step.aborting:
                return
        if streams is not None and step.handoff_key != self.stream_key:
            streams.set_key(self.stream_key)
            step.handoff_key = self.stream_key
        if step.nvtx is not None:
            step.nvtx.range_push(f"ub{self.id}:{site or '-'}")
            self.nvtx_open = True

    def switch_(self, to: str, site: str) -> bool:
        """``dbo_yield_and_switch`` for this microbatch (see there)."""
        step = self.step
        streams = step.streams
        if streams is None or step.aborting:
            self.yield_(site, "switch")
            return False
        event = self.event
        cur = streams.current_key()
        _event_record(event, streams.objects.get(cur) or streams.stream_object(cur))
        if to == "comm":
            key = streams.comm_key
            target = streams.comm
        else:
            key = streams.compute_key
            target = streams.compute
        self.yield_(site, _SWITCH_KIND[to], key, cur)
        if not step.aborting:
            _event_wait(event, target)
            # Only now has the comm stream waited on the compute stream (under capture:
            # joined the capture), so only now may the step's end join it back. A
            # microbatch unwound at this yield never waits; joining a comm stream that
            # never forked in would invalidate the capture (cudaErrorStreamCaptureIsolation).
            if target is streams.comm:
                streams.comm_used = True
            return True
        return False


class _Step:
    """The state of one ``UBatchScheduler.run`` call.

    Invariants:
        ``current`` is the id of the microbatch whose greenlet runs (or ran last).
        ``sites[k]`` / ``kinds[k]`` are the site and the kind (plain yield or stream
        switch) of yield index ``k`` as the first microbatch to reach it yielded it; every
        other microbatch must yield the same site and kind at ``k``.
        ``finished_yields`` is ``None`` until a microbatch returns, then its yield count;
        no microbatch may yield at an index ``>=`` it, nor return with another count.
        Once ``aborting`` is set, yields return at once (cleanup code may still yield).
        With an agreed schedule (``run(schedule=...)``) ``sites`` / ``kinds`` hold it from
        the start (``agreed`` yields, never appended to): every microbatch must follow it.
    """

    __slots__ = ("ubatches", "num", "current", "sites", "kinds", "finished_yields",
                 "finished_by", "aborting", "failure", "results", "trace", "streams",
                 "handoff_key", "nvtx", "t0", "slow", "grad", "agreed", "unwound")

    def __init__(self, num: int, trace: bool,
                 schedule: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        self.num = num
        self.ubatches = [_UBatch(i, self) for i in range(num)]
        for i, ub in enumerate(self.ubatches):
            ub.succ = self.ubatches[(i + 1) % num]
        self.current = 0
        self.sites: list[str] = []
        self.kinds: list[str] = []  # kinds[k]: how index k yielded (plain or stream switch)
        # Yields of the agreed schedule (sites[:agreed]), or -1 without one.
        self.agreed = -1
        if schedule is not None:
            self.sites, self.kinds = list(schedule[0]), list(schedule[1])
            self.agreed = len(self.sites)
        self.unwound: list[int] = []  # microbatches suspended at a yield when unwound
        self.finished_yields: int | None = None
        self.finished_by = -1
        self.aborting = False
        self.failure: tuple[int, BaseException] | None = None
        self.results: list[Any] = [None] * num
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.streams: Any = None  # streams.DeviceStreams when CUDA is initialised
        self.handoff_key: Any = None  # stream current at the last hand-off (CUDA only)
        self.nvtx: Any = None  # torch.cuda.nvtx when tracing on CUDA
        self.t0 = time.perf_counter_ns()
        # True when a yield must take the slow path: tracing, a microbatch finished, or
        # aborting. Kept equal to (trace is not None or finished_yields is not None or
        # aborting) by every write of those fields.
        self.slow = trace
        # The caller's torch grad mode (None without torch). Each microbatch starts with it
        # and keeps its own across switches; the caller gets it back after the step.
        self.grad: bool | None = None

    # -- symmetry ----------------------------------------------------------------------

    def _asym(self, ub: _UBatch, message: str, expected: str | None,
              actual: str | None) -> YieldAsymmetryError:
        counts = [u.num_yields for u in self.ubatches]
        err = YieldAsymmetryError(
            f"{message} Yield counts so far: {counts}. Every microbatch must yield the "
            "same number of times at the same sites; make the yield points of the model "
            "independent of the data in each microbatch (e.g. yield even when no token is "
            "routed to this rank).",
            ubatch=ub.id, index=ub.num_yields, expected_site=expected, actual_site=actual,
            counts=counts, trace=list(self.trace) if self.trace is not None else None,
            agreed=self.agreed >= 0)
        # Recorded here, not only when it propagates: a model that swallows the error
        # still fails the step, and from now on yields stop switching.
        if self.failure is None:
            self.failure = (ub.id, err)
        self.aborting = self.slow = True
        return err

    def check_yield(self, ub: _UBatch, site: str, kind: str) -> None:
        k = ub.num_yields
        if self.finished_yields is not None and k >= self.finished_yields:
            raise self._asym(
                ub, f"Microbatch {ub.id} yielded at index {k} (site {site!r}), but "
                f"microbatch {self.finished_by} returned after {self.finished_yields} "
                "yields.", None, site)
        if k < len(self.sites):
            expected = self.sites[k]
            if expected != site:
                first = (f"the agreed schedule has site {expected!r} there" if k < self.agreed
                         else f"the microbatch that reached index {k} first yielded at site "
                         f"{expected!r}")
                raise self._asym(
                    ub, f"Microbatch {ub.id} yielded at index {k} at site {site!r}, but "
                    f"{first}.", expected, site)
            if self.kinds[k] != kind:
                first = ("the agreed schedule has" if k < self.agreed else
                         f"the microbatch that reached index {k} first yielded there with")
                raise self._asym(
                    ub, f"Microbatch {ub.id} yielded at index {k} (site {site!r}) with "
                    f"{_describe(kind)}, but {first} {_describe(self.kinds[k])}.",
                    expected, site)
        elif self.agreed >= 0:
            raise self._asym(
                ub, f"Microbatch {ub.id} yielded at index {k} (site {site!r}), but the "
                f"agreed schedule ends after {self.agreed} yields.", None, site)
        else:
            self.sites.append(site)
            self.kinds.append(kind)

    def check_return(self, ub: _UBatch) -> None:
        n = ub.num_yields
        if 0 <= self.agreed != n:  # n < agreed: a yield beyond the schedule raised
            raise self._asym(
                ub, f"Microbatch {ub.id} returned after {n} yields, but the agreed "
                f"schedule has {self.agreed} (next: site {self.sites[n]!r}).",
                self.sites[n], None)
        if self.finished_yields is None:
            for other in self.ubatches:
                if other.num_yields > n:
                    site = self.sites[n]
                    raise self._asym(
                        ub, f"Microbatch {ub.id} returned after {n} yields, but "
                        f"microbatch {other.id} yielded at index {n} (site {site!r}).",
                        site, None)
            self.finished_yields = n
            self.slow = True
            self.finished_by = ub.id
        elif n != self.finished_yields:
            expected = self.sites[n] if n < len(self.sites) else None
            raise self._asym(
                ub, f"Microbatch {ub.id} returned after {n} yields, but microbatch "
                f"{self.finished_by} returned after {self.finished_yields}.", expected,
                None)

    # -- hand-off ----------------------------------------------------------------------

    def next_live(self, after: int) -> _UBatch | None:
        num = self.num
        ubs = self.ubatches
        for step in range(1, num + 1):
            ub = ubs[(after + step) % num]
            if not ub.done:
                return ub
        return None

    def record(self, ub: _UBatch, site: str, kind: str) -> None:
        assert self.trace is not None
        streams = self.streams
        stream = streams.name(streams.current_key()) if streams is not None else "cpu"
        self.trace.append(TraceEntry(ubatch=ub.id, index=ub.num_yields, site=site,
                                     stream=stream, kind=kind,
                                     time_us=(time.perf_counter_ns() - self.t0) / 1e3))

    def start_nvtx(self, ub: _UBatch) -> None:
        if self.nvtx is not None:
            self.nvtx.range_push(f"ub{ub.id}:start")
            ub.nvtx_open = True

    def stop_nvtx(self, ub: _UBatch) -> None:
        if ub.nvtx_open:
            self.nvtx.range_pop()
            ub.nvtx_open = False


def _ubatch_main(ub: _UBatch, fn: Callable[[], Any]) -> None:
    """Body of one microbatch greenlet. Never lets an exception escape the greenlet."""
    step = ub.step
    try:
        step.start_nvtx(ub)
        # A microbatch starts on the compute stream, whatever its predecessor left.
        if step.streams is not None and step.handoff_key != step.streams.compute_key:
            step.streams.set_key(step.streams.compute_key)
            step.handoff_key = step.streams.compute_key
        if step.grad is not None and _is_grad_enabled() != step.grad:
            _set_grad_enabled(step.grad)
        result = fn()
        step.stop_nvtx(ub)
        ub.done = True
        if not step.aborting:
            step.check_return(ub)
            step.results[ub.id] = result
    except greenlet.GreenletExit:
        ub.done = True
        if not step.aborting:  # raised by the microbatch itself, not by our unwinding
            step.failure = (ub.id, sys.exc_info()[1])  # type: ignore[assignment]  # in except
    except BaseException as exc:
        ub.done = True
        if step.failure is None:
            step.failure = (ub.id, exc)
        elif step.failure[1] is not exc:  # raised by cleanup code while unwinding
            first_id, first = step.failure
            if isinstance(first, Exception) and not isinstance(exc, Exception):
                # KeyboardInterrupt / SystemExit during the unwinding must reach the
                # caller: a serving loop that catches Exception per step would swallow it
                # as a note. It takes over, as in a plain ``finally`` that raises.
                exc.add_note(f"coop_dbo: raised while unwinding microbatch {ub.id} after "
                             f"microbatch {first_id} raised {first!r}")
                exc.__context__ = first
                step.failure = (ub.id, exc)
            else:
                first.add_note(f"coop_dbo: while unwinding microbatch {ub.id}, its "
                               f"cleanup raised {exc!r}")
    finally:
        if ub.nvtx_open:
            step.stop_nvtx(ub)
        if step.streams is not None:
            step.handoff_key = step.streams.current_key()


class UBatchScheduler:
    """Runs microbatch callables in greenlets on the calling thread.

    Args:
        num_ubatches: how many microbatches each ``run`` takes, 1 to 8.
        trace: record every yield (microbatch, index, site, stream, time); on CUDA also
            push one NVTX range per stretch between yields. Read ``last_trace`` after a
            run, or render it with ``coop_dbo.print_trace``.

    Example::

        sched = UBatchScheduler(2)
        def mb(i):
            x = attention(xs[i]); dbo_yield("dispatch"); return experts(x)
        out0, out1 = sched.run([lambda: mb(0), lambda: mb(1)])

    Warning:
        Microbatches run on one thread but interleave: a global mutated between two
        yields is seen by the other microbatch. Keep per-microbatch state in locals or in
        ``contextvars`` (each microbatch has its own context).

    Warning:
        torch keeps some modes per thread. The current CUDA stream and the grad mode
        (``torch.no_grad()`` / ``enable_grad``) follow each microbatch across switches,
        and the caller's are current again after ``run``. Autocast and
        ``torch.inference_mode`` are not carried: enter them around ``run()``, not inside
        a microbatch across a yield.
    """

    def __init__(self, num_ubatches: int = 2, *, trace: bool = False) -> None:
        if not isinstance(num_ubatches, int) or isinstance(num_ubatches, bool) or not (
                1 <= num_ubatches <= MAX_UBATCHES):
            raise ValueError(
                f"num_ubatches must be an int from 1 to {MAX_UBATCHES}, got "
                f"{num_ubatches!r}.")
        self.num_ubatches = num_ubatches
        self.trace = bool(trace)
        self.last_trace: list[TraceEntry] = []
        # The yield sequence of the last run as far as it got (site and kind per index,
        # common to all microbatches), and whether it returned normally (then it is the
        # whole sequence every microbatch yielded).
        self.last_sites: Sequence[str] = ()
        self.last_kinds: Sequence[str] = ()
        self.last_complete = False
        # Where each microbatch stood when the last run raised (empty after a good run).
        self.last_positions: list[UBatchPosition] = []
        self._live: _Step | None = None  # the running step (read by positions())
        self._running = False
        self._events: dict[int, list[Any]] = {}  # device index -> one event per ubatch

    def _cuda_streams(self, step: _Step) -> None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        from .streams import DeviceStreams

        global _event_record, _event_wait
        _event_record = torch._C._CudaEventBase.record
        _event_wait = torch._C._CudaEventBase.wait
        step.streams = DeviceStreams()
        step.handoff_key = step.streams.compute_key
        events = self._events.get(step.streams.device_index)
        if events is None:
            events = [torch.cuda.Event() for _ in range(self.num_ubatches)]
            self._events[step.streams.device_index] = events
        for ub, ev in zip(step.ubatches, events, strict=True):
            ub.stream_key = step.streams.compute_key
            ub.event = ev
            ub.streams = step.streams
        if self.trace:
            step.nvtx = torch.cuda.nvtx

    def run(self, fns: Sequence[Callable[[], Any]], *,
            schedule: tuple[Sequence[str], Sequence[str]] | None = None) -> list[Any]:
        """Run ``fns[i]()`` as microbatch ``i``; return their results in microbatch order.

        Args:
            schedule: ``(sites, kinds)``, the yield sequence every microbatch must follow
                (as ``last_sites`` / ``last_kinds`` of an earlier run give it; the runner
                passes the one its ranks agreed on). A yield or a return that leaves it
                raises ``YieldAsymmetryError`` with ``agreed=True`` at once, before the
                microbatch reaches anything its peers would wait for.

        Raises:
            YieldAsymmetryError: the microbatches yielded differently.
            SchedulerStateError: called from inside a running microbatch.
            Any exception a microbatch raised, with a note naming the microbatch.
        """
        if not isinstance(fns, (list, tuple)):
            try:
                fns = list(fns)
            except TypeError:
                raise TypeError(f"run() takes an iterable of callables, got "
                                f"{type(fns).__name__}.") from None
        outer = _CURRENT.get()
        if outer is not None:
            raise SchedulerStateError(
                f"UBatchScheduler.run() was called from inside microbatch {outer.id} of a "
                "running scheduler. Microbatches cannot be nested: call run() once per "
                "step, from outside any microbatch.")
        if self._running:
            raise SchedulerStateError(
                "This UBatchScheduler is already running a step (run() re-entered from a "
                "callback?). Use one scheduler per concurrent step.")
        if len(fns) != self.num_ubatches:
            raise ValueError(
                f"run() got {len(fns)} callables but the scheduler was made for "
                f"{self.num_ubatches} microbatches: pass exactly {self.num_ubatches}.")
        for i, fn in enumerate(fns):
            if not callable(fn):
                raise TypeError(f"fns[{i}] is {type(fn).__name__}, not a callable taking "
                                "no arguments.")

        step = _Step(self.num_ubatches, self.trace, schedule)
        torch = sys.modules.get("torch")
        if torch is not None:
            global _is_grad_enabled, _set_grad_enabled
            _is_grad_enabled = torch._C.is_grad_enabled
            _set_grad_enabled = torch._C._set_grad_enabled
            step.grad = _is_grad_enabled()
        self._cuda_streams(step)
        parent = greenlet.getcurrent()
        for new, fn in zip(step.ubatches, fns, strict=True):
            ctx = contextvars.copy_context()
            ctx.run(_CURRENT.set, new)
            g = greenlet.greenlet(functools.partial(_ubatch_main, new, fn), parent)
            g.gr_context = ctx
            new.glet = g
        self._running = True
        self._live = step
        try:
            ub: _UBatch | None = step.ubatches[0]
            while ub is not None:
                step.current = ub.id
                ub.glet.switch()  # type: ignore[union-attr]  # set above
                # Back here only when a microbatch greenlet ended (returned or raised).
                if step.failure is not None:
                    self._abort(step)
                ub = step.next_live(step.current)
        except BaseException:
            # Also reached when the exception lands in this loop itself (Ctrl-C between
            # two microbatches): unwind the suspended ones now, so their finally blocks
            # run before the caller sees the exception (no-op after _abort).
            self._unwind(step)
            raise
        finally:
            self._running = False
            self._live = None
            sites, kinds = step.sites, step.kinds
            if step.agreed >= 0:  # what the microbatches reached of the agreed schedule
                reached = max(u.num_yields for u in step.ubatches)
                if reached < len(sites):
                    sites, kinds = sites[:reached], kinds[:reached]
            self.last_sites, self.last_kinds = sites, kinds
            self.last_complete = step.failure is None and step.finished_yields is not None
            self.last_positions = [] if self.last_complete else self._positions(step)
            if step.streams is not None:
                step.streams.join_and_restore()
            if step.grad is not None and _is_grad_enabled() != step.grad:
                _set_grad_enabled(step.grad)
            self.last_trace = step.trace if step.trace is not None else []
            for u in step.ubatches:  # break the reference cycles at once
                u.glet = None
                u.succ = u
                u.step = None  # type: ignore[assignment]  # typed for the live hot path
        return step.results

    @staticmethod
    def _unwind(step: _Step) -> None:
        """Throw ``GreenletExit`` into every started, suspended microbatch."""
        step.aborting = step.slow = True
        for ub in step.ubatches:
            g = ub.glet
            if g is not None and not ub.done and bool(g):  # started and suspended
                step.unwound.append(ub.id)
                g.throw(greenlet.GreenletExit)  # _ubatch_main never lets anything escape
            ub.done = True

    def positions(self) -> list[UBatchPosition]:
        """Where each microbatch of the running step stands (``[]`` between steps).

        Safe to call from another thread (a watchdog): it only reads the scheduler's
        fields, so a microbatch may move on while it is read.
        """
        step = self._live
        return [] if step is None else self._positions(step)

    def live_trace(self) -> list[TraceEntry]:
        """The yields of the running step so far (tracing only; ``[]`` between steps)."""
        step = self._live
        return [] if step is None or step.trace is None else list(step.trace)

    @staticmethod
    def _positions(step: _Step) -> list[UBatchPosition]:
        failed = step.failure[0] if step.failure is not None else -1
        streams = step.streams
        out = []
        for ub in list(step.ubatches):
            k = ub.num_yields
            g = ub.glet
            if ub.id == failed:
                state = "raised"
            elif ub.id in step.unwound:
                state = "unwound"
            elif ub.done:
                state = "done"
            elif g is None or (not g and not g.dead):
                state = "not started"
            else:
                state = "running" if step.current == ub.id else "parked"
            key = ub.stream_key
            stream = "cpu" if streams is None or key is None else streams.name(key)
            out.append(UBatchPosition(
                ubatch=ub.id, state=state, index=k,
                site=step.sites[k - 1] if 0 < k <= len(step.sites) else None,
                kind=step.kinds[k - 1] if 0 < k <= len(step.kinds) else None,
                stream=stream))
        return out

    @staticmethod
    def _abort(step: _Step) -> None:
        """Unwind every other started microbatch and raise the failure in the caller."""
        assert step.failure is not None
        UBatchScheduler._unwind(step)
        failed_id, exc = step.failure  # read after unwinding: a KeyboardInterrupt may win
        if not isinstance(exc, YieldAsymmetryError):  # that one carries its trace already
            exc.add_note(f"coop_dbo: raised in microbatch {failed_id} of "
                         f"{step.num}; the other microbatches were unwound.")
        try:
            exc.ubatch_id = failed_id  # type: ignore[attr-defined]  # tag the user exception
        except (AttributeError, TypeError):
            pass
        raise exc


def dbo_yield(site: str = "") -> None:
    """Yield to the next microbatch; a no-op outside a running scheduler.

    ``site`` names the yield point; every microbatch must pass the same sequence of sites.
    """
    ub = _CURRENT.get()
    if ub is not None:
        ub.yield_(site)


def dbo_yield_and_switch(to: Literal["comm", "compute"], site: str = "") -> bool:
    """Record an event on the current stream, yield, then continue on stream ``to``.

    On resume the current stream becomes the comm stream (``to="comm"``) or the compute
    stream of the step (``to="compute"``, the caller's stream when ``run`` started), and
    it waits for the event, so work issued after this call is ordered after the work this
    microbatch issued before it, whichever stream each ran on. Without CUDA (or outside a
    scheduler) this is a plain ``dbo_yield``.

    Returns ``True`` when stream ``to`` now waits for that event, ``False`` when no wait
    was issued (no CUDA streams, outside a scheduler, or the step is being unwound after
    a failure and this microbatch runs only its cleanup).

    Warning:
        A tensor allocated on one stream and used on the other must be protected from
        the caching allocator (``Tensor.record_stream`` or kept alive); the MoE hooks in
        ``coop_dbo.moe_hooks`` do this for every tensor they move across the switch.
    """
    if to != "comm" and to != "compute":
        raise ValueError(f"dbo_yield_and_switch(to=...) must be 'comm' or 'compute', got "
                         f"{to!r}.")
    ub = _CURRENT.get()
    if ub is None:
        return False
    return ub.switch_(to, site) is True  # drivers whose switch_ returns None: no promise


def dbo_current_ubatch_id() -> int | None:
    """The id of the running microbatch, or ``None`` outside a scheduler."""
    ub = _CURRENT.get()
    return None if ub is None else ub.id


def dbo_current_stream_name() -> str:
    """``"compute"``, ``"comm"`` or ``"cpu"``: the stream the running microbatch is on."""
    ub = _CURRENT.get()
    if ub is None or ub.streams is None:
        return "cpu"
    return ub.streams.name(ub.streams.current_key())


def dbo_streams() -> Any:
    """The ``DeviceStreams`` of the running step on CUDA, else ``None``."""
    ub = _CURRENT.get()
    return None if ub is None else ub.streams


def bind_microbatch(ubatch: Any) -> contextvars.Token:
    """Make ``ubatch`` the running microbatch of the current context.

    For alternative drivers only (the thread-based baseline in ``bench/``): ``ubatch``
    must provide ``id`` (int), ``streams`` (a ``streams.DeviceStreams`` or ``None``),
    ``yield_(site)`` and ``switch_(to, site)`` (returning ``True`` only when it made
    stream ``to`` wait, see ``dbo_yield_and_switch``); ``dbo_yield`` and friends then call
    those. Returns the token for ``_CURRENT.reset``.
    """
    return _CURRENT.set(ubatch)
