"""The microbatch scheduler: one greenlet per microbatch, on the caller's thread.

``UBatchScheduler.run(fns)`` starts microbatch 0; every ``dbo_yield`` hands the thread to
the next live microbatch in round-robin order by switching greenlets directly (no trip
through a scheduler loop). When a microbatch returns, control comes back to ``run``, which
resumes the next live one. So for symmetric microbatches the order is always::

    ub0 to its yield 0, ub1 to its yield 0, ..., ub0 to its yield 1, ub1 to its yield 1, ...

What follows a microbatch across every switch (greenlets share one thread):

* its id and its own ``contextvars`` context (``greenlet.gr_context``, set before the
  microbatch starts, a copy of the caller's context);
* torch's current CUDA stream, saved on yield and restored on resume (only when CUDA is
  initialised; this module imports torch lazily and works without it);
* torch's other per-thread modes: grad mode, inference mode, autocast, the torch function
  and dispatch mode stacks (``coop_dbo.torch_modes`` says which exactly, and how); the
  caller's are current again when ``run`` returns or raises;
* its Python recursion depth: each microbatch greenlet counts its own frames, from the
  depth of ``run``'s caller when the scheduler made that greenlet.

The greenlets are the scheduler's own and live as long as it does: one per microbatch
slot, made at the first ``run`` in a thread (again when ``run`` moves to another thread),
each running its slot's microbatch in every step and parked in between. A new greenlet
per step costs more than its creation: it starts on fresh memory for its Python frames,
which slows the model code it runs by a few percent (``bench/RESULTS.md``).

A microbatch hands the thread over only by ``dbo_yield`` / ``dbo_yield_and_switch`` in its
own greenlet. A yield from a greenlet the microbatch started, or from another thread that
runs a copy of its context, raises ``SchedulerStateError`` (the scheduler could not resume
either), as does a microbatch that switches to ``run``'s greenlet without finishing. A
step left behind by a microbatch that switched to some other greenlet and never came back
is unwound at the scheduler's next ``run``, which raises saying so.

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
import inspect
import sys
import threading
import time
from collections.abc import Callable, Sequence, Set
from typing import Any, Literal, NoReturn

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
# Set on first use with torch loaded: coop_dbo.torch_modes' fingerprint / capture /
# restore of torch's per-thread modes.
_fingerprint: Any = None
_capture: Any = None
_restore: Any = None
# ... and the reads fingerprint() makes when no autocast and no mode is on, which the
# hot path inlines.
_modes_fast: Any = None
_grad: Any = None
_inference: Any = None
_any_autocast: Any = None
_fn_depth: Any = None
_dispatch_depth: Any = None

_getcurrent = greenlet.getcurrent

# How every note this module puts on a microbatch's exception begins (dropped before a
# reused exception object gets the notes of another step).
_NOTE = "coop_dbo: "

# The microbatch running in the current context, or None outside a scheduler. Every
# microbatch greenlet runs in its own copy of the caller's context with this set, so a
# lookup here is all a yield needs to find its scheduler, also with several threads each
# running their own scheduler.
_CURRENT: contextvars.ContextVar[_UBatch | None] = contextvars.ContextVar(
    "coop_dbo_current_ubatch", default=None)


def _describe(kind: str) -> str:
    return "a plain yield" if kind == "yield" else f"a stream switch to {kind[8:]}"


class _UBatch:
    """One microbatch of one ``run``."""

    __slots__ = ("id", "step", "succ", "glet", "num_yields", "done", "stream_key", "event",
                 "nvtx_open", "streams", "fn", "started", "modes")

    def __init__(self, ubatch_id: int, step: _Step) -> None:
        self.id = ubatch_id
        self.step = step
        self.succ: _UBatch = self  # the next microbatch in round-robin order (set by _Step)
        self.glet: greenlet.greenlet | None = None  # the worker greenlet running it
        self.fn: Callable[[], Any] | None = None  # its function, until it starts
        self.started = False  # its greenlet entered _ubatch_main for it
        self.num_yields = 0  # yields made so far; equals the index of the next yield
        self.done = False  # its function returned or raised
        # torch's per-thread modes at its last yield (torch_modes.TorchModes), or None
        # when they were the step's base modes (the caller's).
        self.modes: Any = None
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
        finished, same site as the others) costs one flag test, one list lookup, one
        string comparison and one greenlet lookup before the greenlet switch; with torch
        loaded one fingerprint of torch's per-thread modes (``torch_modes``), and on CUDA
        one read of the current stream, each set back only when it differs on resume.

        Args:
            resume_key: the stream to be on when resumed (default: the current one).
            cur_key: the current stream's key if the caller already read it.
        """
        step = self.step
        k = self.num_yields
        sites = step.sites
        if (step.slow or k >= len(sites) or sites[k] != site or step.kinds[k] is not kind
                or _getcurrent() is not self.glet):
            if (k == len(sites) and not step.slow and step.agreed < 0
                    and _getcurrent() is self.glet):
                # The first microbatch at index k fixes its site: check_yield's append,
                # without the call (half of all yields come here).
                sites.append(site)
                step.kinds.append(kind)
            elif step.aborting:
                return
            else:
                if _getcurrent() is not self.glet:
                    raise step.foreign_yield(self, site)
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
            fp = None  # torch's per-thread modes (fingerprint) as this microbatch left them
            if step.base_fp is not None:
                # torch_modes.fingerprint(), inlined (this runs at every switch)
                fp = (_modes_fast[_grad()][_inference()]
                      if not (_any_autocast() or _fn_depth() or _dispatch_depth())
                      else _fingerprint())
                step.handoff_fp = fp
                self.modes = None if fp == step.base_fp else _capture()
            step.current = nxt.id
            try:
                nxt.glet.switch()  # type: ignore[union-attr]  # set for all before run starts
            except BaseException:  # unwound here: its cleanup runs in its own modes
                if fp is not None and step.handoff_fp != fp:
                    step.resume_modes(self, fp)
                raise
            if fp is not None and step.handoff_fp != fp:
                step.resume_modes(self, fp)
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
            # The same kind as on CUDA: a switch to "comm" and one to "compute" at one
            # index are asymmetric on every device.
            self.yield_(site, _SWITCH_KIND[to])
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
                 "handoff_key", "nvtx", "t0", "slow", "agreed", "unwound", "thread", "owner",
                 "abandoned", "base_fp", "base_modes", "handoff_fp")

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
        self.thread = threading.get_ident()  # the thread running the step
        self.owner: greenlet.greenlet | None = None  # the greenlet that called run()
        self.abandoned = False  # a later run() found this step stuck and unwound it
        # True when a yield must take the slow path: tracing, a microbatch finished, or
        # aborting. Kept equal to (trace is not None or finished_yields is not None or
        # aborting) by every write of those fields.
        self.slow = trace
        # torch's per-thread modes of the caller (torch_modes: a fingerprint and the
        # modes; None without torch). Each microbatch starts with them and keeps its own
        # across switches; the caller gets them back after the step. handoff_fp: the
        # fingerprint of the modes current on the thread as the next greenlet runs.
        self.base_fp: Any = None
        self.base_modes: Any = None
        self.handoff_fp: Any = None

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

    def resume_modes(self, ub: _UBatch, fp: Any) -> None:
        """Make ``ub``'s torch modes current again; ``fp``: their fingerprint."""
        _restore(ub.modes if ub.modes is not None else self.base_modes)
        self.handoff_fp = fp

    def foreign_yield(self, ub: _UBatch, site: str) -> SchedulerStateError:
        """The error of a yield of ``ub`` made outside its own greenlet (it fails the step
        also when the model swallows it)."""
        if threading.get_ident() != self.thread:
            message = (
                f"dbo_yield (site {site!r}) was called in thread "
                f"{threading.current_thread().name!r}, but microbatch {ub.id} runs in "
                "another thread: the microbatch's context was carried into this one "
                "(asyncio.to_thread, run_in_executor or a copied context run here). A yield "
                "can only hand over the thread the scheduler runs on: call dbo_yield / "
                "dbo_yield_and_switch in the microbatch itself, not in work it sends to "
                "other threads.")
        else:
            message = (
                f"dbo_yield (site {site!r}) was called from a greenlet that microbatch "
                f"{ub.id} started (or that runs a copy of its context), not from the "
                "microbatch's own greenlet: the scheduler could not resume that greenlet, "
                "which would be abandoned mid-function. Call dbo_yield / "
                "dbo_yield_and_switch in the microbatch's own code, not inside greenlets "
                "it runs.")
        err = SchedulerStateError(message)
        if self.failure is None:
            self.failure = (ub.id, err)
        self.aborting = self.slow = True
        return err

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


def _drop_notes(exc: BaseException) -> None:
    """Remove the notes this module put on ``exc`` in an earlier step (a model may raise
    one exception object again and again)."""
    notes = getattr(exc, "__notes__", None)
    if notes and any(isinstance(n, str) and n.startswith(_NOTE) for n in notes):
        exc.__notes__ = [n for n in notes if not (isinstance(n, str) and n.startswith(_NOTE))]


def _ubatch_main(ub: _UBatch) -> None:
    """One microbatch, in its worker greenlet. Never lets an exception escape."""
    step = ub.step
    fn, ub.fn = ub.fn, None
    ub.started = True
    try:
        step.start_nvtx(ub)
        # A microbatch starts on the compute stream, whatever its predecessor left.
        if step.streams is not None and step.handoff_key != step.streams.compute_key:
            step.streams.set_key(step.streams.compute_key)
            step.handoff_key = step.streams.compute_key
        # ... and with the caller's torch modes.
        if step.base_fp is not None and step.handoff_fp != step.base_fp:
            _restore(step.base_modes)
            step.handoff_fp = step.base_fp
        result = fn()  # type: ignore[misc]  # set by run() before the step starts
        if inspect.iscoroutine(result):
            result.close()
            raise TypeError(
                f"microbatch {ub.id}'s function returned a coroutine "
                f"({result.__qualname__}): it is an async function, and a microbatch cannot "
                "await (microbatches are greenlets on one thread, not asyncio tasks). Pass "
                "a plain function that runs the model; await asyncio code outside run().")
        step.stop_nvtx(ub)
        ub.done = True
        if not step.aborting:
            step.check_return(ub)
            step.results[ub.id] = result
    except greenlet.GreenletExit:
        ub.done = True
        if not step.aborting:  # raised by the microbatch itself, not by our unwinding
            _drop_notes(sys.exc_info()[1])  # type: ignore[arg-type]  # in except
            step.failure = (ub.id, sys.exc_info()[1])  # type: ignore[assignment]  # in except
    except BaseException as exc:
        ub.done = True
        if step.failure is None:
            _drop_notes(exc)
            step.failure = (ub.id, exc)
        elif step.failure[1] is not exc:  # raised by cleanup code while unwinding
            first_id, first = step.failure
            if isinstance(first, Exception) and not isinstance(exc, Exception):
                # KeyboardInterrupt / SystemExit during the unwinding must reach the
                # caller: a serving loop that catches Exception per step would swallow it
                # as a note. It takes over, as in a plain ``finally`` that raises.
                exc.add_note(f"{_NOTE}raised while unwinding microbatch {ub.id} after "
                             f"microbatch {first_id} raised {first!r}")
                exc.__context__ = first
                step.failure = (ub.id, exc)
            else:
                first.add_note(f"{_NOTE}while unwinding microbatch {ub.id}, its "
                               f"cleanup raised {exc!r}")
    finally:
        if ub.nvtx_open:
            step.stop_nvtx(ub)
        if step.streams is not None:
            step.handoff_key = step.streams.current_key()


class _Worker(greenlet.greenlet):
    """A scheduler's greenlet for one microbatch slot: it runs that slot's microbatch in
    every step and waits, parked, between steps.

    Invariants: ``ub`` is the microbatch to run when next switched to (``None`` once it
    started, and between steps); ``parked`` is ``True`` exactly while it waits for a step
    in ``run`` below, holding no frame of any microbatch.
    """

    def __init__(self, parent: greenlet.greenlet) -> None:
        super().__init__(_worker_main, parent)
        self.ub: _UBatch | None = None
        self.parked = False


def _worker_main() -> None:
    """The body of every ``_Worker``. While parked it holds no reference to its own
    greenlet (nor to a finished step), so a worker nobody references is freed at once
    (greenlet then kills it), not kept by a cycle through its own frame."""
    while True:
        w: Any = _getcurrent()
        ub = w.ub
        if ub is not None:
            w.ub = None
            _ubatch_main(ub)
        w.parked = True
        parent = w.parent  # run()'s greenlet, set by run() every step
        del w, ub
        parent.switch()
        _getcurrent().parked = False  # a _Worker runs this


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
        torch keeps some modes per thread. The current CUDA stream, grad mode, inference
        mode, autocast and the torch function / dispatch mode stacks follow each
        microbatch across switches, and the caller's are current again after ``run``.
        What else torch keeps per thread is shared by the microbatches (see
        ``coop_dbo.torch_modes``): keep it unchanged across a yield.

    A scheduler runs one step at a time; use one scheduler per thread that runs steps.
    """

    def __init__(self, num_ubatches: int = 2, *, trace: bool = False) -> None:
        if not isinstance(num_ubatches, int) or isinstance(num_ubatches, bool) or not (
                1 <= num_ubatches <= MAX_UBATCHES):
            raise ValueError(
                f"num_ubatches must be an int from 1 to {MAX_UBATCHES}, got "
                f"{num_ubatches!r}.")
        if not isinstance(trace, bool):
            raise TypeError(f"UBatchScheduler: trace must be True or False, got "
                            f"{type(trace).__name__} {trace!r}.")
        self.num_ubatches = num_ubatches
        self.trace = trace
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
        # Held from run()'s start to its end: taken without waiting, so that two threads
        # cannot both start a step.
        self._lock = threading.Lock()
        # The worker greenlets of the thread _workers_thread, one per slot.
        self._workers: list[_Worker | None] = [None] * num_ubatches
        self._workers_thread = -1
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
        if isinstance(fns, (Set, dict)):
            raise TypeError(f"run() takes the microbatches in order, a list or tuple of "
                            f"callables; got a {type(fns).__name__}, whose order is not "
                            "the microbatch order.")
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
        if len(fns) != self.num_ubatches:
            raise ValueError(
                f"run() got {len(fns)} callables but the scheduler was made for "
                f"{self.num_ubatches} microbatches: pass exactly {self.num_ubatches}.")
        for i, fn in enumerate(fns):
            if not callable(fn):
                raise TypeError(f"fns[{i}] is {type(fn).__name__}, not a callable taking "
                                "no arguments.")
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                raise TypeError(
                    f"fns[{i}] is an async function ({getattr(fn, '__qualname__', fn)!r}): a "
                    "microbatch cannot await (microbatches are greenlets on one thread, not "
                    "asyncio tasks). Pass a plain function that runs the model; await "
                    "asyncio code outside run().")
        if not self._lock.acquire(blocking=False):
            self._refuse()
        step: _Step | None = None
        try:
            step = _Step(self.num_ubatches, self.trace, schedule)
            step.owner = _getcurrent()
            self._live = step
            return self._run_locked(step, fns)
        finally:
            if step is None or self._live is step:  # else a later run() abandoned it
                self._live = None
                self._lock.release()

    def _run_locked(self, step: _Step, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        parent = step.owner
        assert parent is not None
        if "torch" in sys.modules:
            global _fingerprint, _capture, _restore, _modes_fast, _grad, _inference
            global _any_autocast, _fn_depth, _dispatch_depth
            if _fingerprint is None:
                from . import torch_modes as tm

                _fingerprint, _capture, _restore = tm.fingerprint, tm.capture, tm.restore
                _modes_fast, _grad, _inference = tm._FAST, tm._grad, tm._inference
                _any_autocast, _fn_depth = tm._any_autocast, tm._fn_depth
                _dispatch_depth = tm._dispatch_depth
            step.base_fp = step.handoff_fp = _fingerprint()
            step.base_modes = _capture()
        self._cuda_streams(step)
        workers = self._workers_for(parent)
        for new, fn, w in zip(step.ubatches, fns, workers, strict=True):
            ctx = contextvars.copy_context()
            ctx.run(_CURRENT.set, new)
            w.gr_context = ctx
            w.ub = new
            new.glet = w
            new.fn = fn
        try:
            ub: _UBatch | None = step.ubatches[0]
            while ub is not None:
                step.current = ub.id
                if step.base_fp is not None:
                    step.handoff_fp = _fingerprint()
                ub.glet.switch()  # type: ignore[union-attr]  # set above
                # Back here when a microbatch returned or raised, or switched here itself.
                if step.abandoned:
                    raise SchedulerStateError(
                        "This step was abandoned: a later run() of this scheduler found it "
                        "stuck (a microbatch had switched to another greenlet) and unwound "
                        "its microbatches. It has no result.")
                if not step.ubatches[step.current].done and step.failure is None:
                    step.failure = (step.current, SchedulerStateError(
                        f"Microbatch {step.current} switched to the greenlet that called "
                        "run() (a greenlet switch, not dbo_yield) before it finished, so "
                        "the scheduler cannot resume it. Inside a microbatch hand the "
                        "thread over only with dbo_yield / dbo_yield_and_switch."))
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
            if step.base_fp is not None and _fingerprint() != step.base_fp:
                _restore(step.base_modes)
            self.last_trace = step.trace if step.trace is not None else []
            for u in step.ubatches:  # break the reference cycles at once
                u.glet = None
                u.succ = u
                u.fn = u.modes = None
                u.step = None  # type: ignore[assignment]  # typed for the live hot path
            for w in workers:
                w.ub = None
                w.gr_context = None  # drop the step's context (the caller's values)
        return step.results

    @property
    def _running(self) -> bool:
        """Whether a step is in progress."""
        return self._live is not None

    def _workers_for(self, parent: greenlet.greenlet) -> list[_Worker]:
        """This thread's worker greenlets, parked, with ``parent`` (run()'s greenlet) as
        the greenlet they return to; new ones are started here, so they count their
        recursion depth from run()'s."""
        if self._workers_thread != threading.get_ident():
            self._workers = [None] * self.num_ubatches  # another thread's cannot run here
            self._workers_thread = threading.get_ident()
        workers = self._workers
        for i, w in enumerate(workers):
            if w is not None and w.parked and not w.dead:
                if w.parent is parent:
                    continue
                try:
                    w.parent = parent
                    continue
                except ValueError:  # run() from a greenlet that descends from this one
                    pass
            w = _Worker(parent)
            w.switch()  # runs to its first park, at this depth
            workers[i] = w
        return workers  # type: ignore[return-value]  # every slot filled above

    def _refuse(self) -> NoReturn:
        """Raise why run() cannot start now (the lock is held); a step found stuck is
        unwound first, so that the scheduler is usable again."""
        step = self._live
        here = threading.current_thread().name
        if step is None or step.thread != threading.get_ident():
            raise SchedulerStateError(
                f"This UBatchScheduler is running a step in another thread, and run() was "
                f"called in thread {here!r} meanwhile. A scheduler runs one step at a time, "
                "on one thread: make one scheduler per thread that runs steps.")
        me = _getcurrent()
        if me is step.owner:
            raise SchedulerStateError(
                "This UBatchScheduler is already running a step, and run() was called again "
                "from the same greenlet before that step returned (from a signal handler, a "
                "__del__ or another callback that ran during the step). Call run() once "
                "per step, after the previous call returned.")
        g: greenlet.greenlet | None = me
        while g is not None:
            for ub in step.ubatches:
                if g is ub.glet:
                    where = "inside" if g is me else "from a greenlet started inside"
                    raise SchedulerStateError(
                        f"This UBatchScheduler is already running a step, and run() was "
                        f"called {where} microbatch {ub.id} of it. Microbatches cannot be "
                        "nested: call run() once per step, from outside any microbatch.")
            g = g.parent
        # Same thread, another greenlet: the step's owner waits in run() for a microbatch
        # that switched away and has not come back. Unwind it here.
        stuck = step.current
        step.abandoned = True
        for ub in step.ubatches:
            if ub.started and not ub.done and ub.glet is not None:
                ub.glet.parent = me  # its unwinding must end here, not in the owner
        try:
            self._unwind(step)
        finally:
            if step.streams is not None:
                step.streams.join_and_restore()
            if step.base_modes is not None:
                _restore(step.base_modes)
            self._live = None
            self._lock.release()
        raise SchedulerStateError(
            f"This UBatchScheduler's previous step never finished: microbatch {stuck} "
            "switched to another greenlet (a greenlet switch other than dbo_yield, e.g. "
            "gevent I/O) and control never came back to the greenlet that called run(). "
            "That step is abandoned: its microbatches were unwound now (their finally "
            "blocks ran) and it returns nothing. Inside a microbatch hand the thread over "
            "only with dbo_yield / dbo_yield_and_switch. This call did not run a step; call "
            "run() again.")

    @staticmethod
    def _unwind(step: _Step) -> None:
        """Throw ``GreenletExit`` into every started, suspended microbatch."""
        step.aborting = step.slow = True
        for ub in step.ubatches:
            g = ub.glet
            if g is not None and ub.started and not ub.done:  # started and suspended
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
            elif g is None or not ub.started:
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
            exc.add_note(f"{_NOTE}raised in microbatch {failed_id} of "
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
