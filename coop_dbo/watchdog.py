"""The step watchdog: where every microbatch stands when a step runs too long.

Three parts, all cheap while nothing goes wrong:

* ``StepMonitor``: per microbatch, the backend operation in flight and when it last
  yielded or resumed. ``moe_exchange`` writes it through a ``BackendProbe`` (a thin
  wrapper around the backend, made only while a monitor is set), one clock read and two
  list stores per backend call. Yields happen right around backend calls inside an
  exchange (a pack, send or transfer is followed by a yield; a transfer, unpack or
  receive follows one), so their times are the yield times.
* ``Watchdog``: one daemon thread per process, shared by every armed watch. A watch is
  armed for the duration of one runner step with a deadline; the thread looks at the
  deadlines every ``interval_s`` and, when one passes, calls the watch's ``on_fire``
  (the runner's forensics: dump, tell the peers, break the process group). Breaking the
  group ends a step stuck in one of its collectives; a step still running after a
  grace period (half the limit, at most 1 s) gets ``StepTimeoutError`` raised in its
  thread (an asynchronous exception: it lands at the next Python bytecode that thread
  runs, so also in a Python loop that polls a transfer; a C call that never returns,
  and that breaking the group does not end, is not interrupted). Disarming waits for
  a firing that already began, so the exception never lands after the step.
* ``build_record`` / ``render_record``: the dump, a JSON-ready dict (the per-rank file
  format of ``coop_dbo.trace.merge``) and a rich table.

The thread only reads scheduler and monitor fields (it cannot switch greenlets); what
it reads may move on while it reads, which a dump tolerates.
"""

from __future__ import annotations

import contextvars
import ctypes
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .errors import StepTimeoutError
from .greenlet_sched import dbo_current_ubatch_id
from .trace.merge import RECORD_FORMAT
from .trace.record import TraceEntry, UBatchPosition

__all__ = [
    "StepMonitor",
    "BackendProbe",
    "current_monitor",
    "monitoring",
    "Watch",
    "build_record",
    "render_record",
    "RECORD_FORMAT",
]


# Backend calls a yield follows as soon as they return, and calls that run right after
# a yield (see moe_exchange): their ends and starts are the yield times.
_BEFORE_YIELD = frozenset({"dispatch_pack", "dispatch_transfer", "combine_pack",
                           "combine_transfer", "dispatch_send", "combine_send"})
_AFTER_YIELD = frozenset({"dispatch_transfer", "dispatch_unpack", "combine_transfer",
                          "combine_unpack", "dispatch_recv", "combine_recv"})


class StepMonitor:
    """What each microbatch of the watched step does in its MoE exchanges.

    Written by ``BackendProbe`` on the step's thread, read by the watchdog thread.
    """

    __slots__ = ("op", "op_ns", "yield_ns")

    def __init__(self, num_ubatches: int) -> None:
        # op[i]: the backend method microbatch i is in, or None between calls.
        self.op: list[str | None] = [None] * num_ubatches
        # op_ns[i]: time.perf_counter_ns() when op[i] started (meaningful while set).
        self.op_ns = [0] * num_ubatches
        # yield_ns[i]: perf_counter_ns of its last yield or resume in an exchange; 0: none.
        self.yield_ns = [0] * num_ubatches

    def reset(self) -> None:
        n = len(self.op)
        self.op[:] = [None] * n
        self.op_ns[:] = [0] * n
        self.yield_ns[:] = [0] * n

    def probe(self, backend: Any) -> Any:
        """``backend`` wrapped so that its calls are recorded for the running microbatch
        (the backend itself outside a microbatch)."""
        ub = dbo_current_ubatch_id()
        if ub is None or ub >= len(self.op):
            return backend
        return BackendProbe(backend, self, ub)


class BackendProbe:
    """A ``MoEBackend`` seen through a ``StepMonitor``: every phase method records its
    name and start time for one microbatch; other attributes pass through."""

    __slots__ = ("_backend", "_mon", "_ub")

    def __init__(self, backend: Any, monitor: StepMonitor, ubatch: int) -> None:
        self._backend = backend
        self._mon = monitor
        self._ub = ubatch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _call(self, op: str, *args: Any) -> Any:
        mon, ub = self._mon, self._ub
        now = time.perf_counter_ns()
        if op in _AFTER_YIELD:
            mon.yield_ns[ub] = now
        mon.op[ub] = op
        mon.op_ns[ub] = now
        out = getattr(self._backend, op)(*args)  # on an exception op stays: it failed there
        mon.op[ub] = None
        if op in _BEFORE_YIELD:
            mon.yield_ns[ub] = time.perf_counter_ns()
        return out

    def dispatch_pack(self, *args: Any) -> Any:
        return self._call("dispatch_pack", *args)

    def dispatch_transfer(self, *args: Any) -> Any:
        return self._call("dispatch_transfer", *args)

    def dispatch_unpack(self, *args: Any) -> Any:
        return self._call("dispatch_unpack", *args)

    def combine_pack(self, *args: Any) -> Any:
        return self._call("combine_pack", *args)

    def combine_transfer(self, *args: Any) -> Any:
        return self._call("combine_transfer", *args)

    def combine_unpack(self, *args: Any) -> Any:
        return self._call("combine_unpack", *args)

    def dispatch_send(self, *args: Any) -> Any:
        return self._call("dispatch_send", *args)

    def dispatch_recv(self, *args: Any) -> Any:
        return self._call("dispatch_recv", *args)

    def combine_send(self, *args: Any) -> Any:
        return self._call("combine_send", *args)

    def combine_recv(self, *args: Any) -> Any:
        return self._call("combine_recv", *args)


_MONITOR: contextvars.ContextVar[StepMonitor | None] = contextvars.ContextVar(
    "coop_dbo_step_monitor", default=None)


def current_monitor() -> StepMonitor | None:
    """The monitor of the running step (set by the runner while its watchdog is on)."""
    return _MONITOR.get()


def monitoring(monitor: StepMonitor | None) -> contextvars.Token:
    """Make ``monitor`` current in this context (microbatches inherit it); returns the
    token for ``_MONITOR.reset``."""
    return _MONITOR.set(monitor)


def reset_monitoring(token: contextvars.Token) -> None:
    _MONITOR.reset(token)


# -- the watchdog thread ----------------------------------------------------------------

def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in thread ``thread_id`` at its next bytecode (``None``: take
    back one not delivered yet)."""
    obj = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), obj)


class Watch:
    """One runner's step deadline.

    Args:
        limit_s: seconds a step may run.
        on_fire: ``fn(step)``, called on the watchdog thread when step ``step`` passes
            its deadline, before the step's thread gets ``StepTimeoutError``.
    """

    def __init__(self, limit_s: float, on_fire: Callable[[int], None]) -> None:
        if isinstance(limit_s, bool) or not isinstance(limit_s, (int, float)) or not (
                limit_s > 0):
            raise ValueError(f"watchdog_s must be a number of seconds > 0, got {limit_s!r}.")
        self.limit_s = float(limit_s)
        self.on_fire = on_fire
        self._lock = threading.Lock()
        # Guarded by _lock:
        self._deadline: float | None = None  # time.monotonic() limit while armed
        self._step = -1  # the armed step
        self._fired = -2  # the last step whose deadline passed (-2: none)
        self._thread_id = 0  # the thread running the armed step
        self._done = threading.Event()  # set when a firing finished (set when idle)
        self._done.set()
        self.started_at = 0.0  # time.monotonic() when the armed step started
        _Watchdog.get().add(self)

    def arm(self, step: int) -> None:
        """Start the clock for ``step`` in the calling thread."""
        now = time.monotonic()
        with self._lock:
            self._step = step
            self._thread_id = threading.get_ident()
            self.started_at = now
            self._deadline = now + self.limit_s

    def disarm(self) -> bool:
        """Stop the clock; ``True`` when the step passed its deadline (a firing that
        already began is waited for, and its exception taken back if not delivered)."""
        try:
            with self._lock:
                self._deadline = None
                fired = self._fired == self._step
            if fired:
                self._done.wait(60.0)
                _set_async_exc(self._thread_id, None)
            return fired
        except StepTimeoutError:  # the firing's exception arrived while disarming
            self._done.wait(60.0)
            return True

    def poll(self, now: float) -> None:
        """Called by the watchdog thread: fire if the armed step is past its deadline."""
        with self._lock:
            if self._deadline is None or now < self._deadline or self._fired == self._step:
                return
            self._fired = step = self._step
            thread_id = self._thread_id
            self._done.clear()
        try:
            self.on_fire(step)
        finally:
            # Breaking the process group usually ends the step by itself (its collective
            # fails); the asynchronous exception, which may land in cleanup code, is
            # only for a step still running after a grace period (a Python-level wait).
            grace = time.monotonic() + min(1.0, self.limit_s / 2)
            while True:
                with self._lock:
                    armed = self._deadline is not None and self._step == step
                if not armed or time.monotonic() >= grace:
                    break
                time.sleep(0.005)
            if armed:
                _set_async_exc(thread_id, StepTimeoutError)
            self._done.set()


class _Watchdog:
    """The one daemon thread that polls every live ``Watch``."""

    _instance: _Watchdog | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def get(cls) -> _Watchdog:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = _Watchdog()
            return cls._instance

    def add(self, watch: Watch) -> None:
        with self._lock:
            self._watches.add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="coop_dbo-watchdog",
                                                daemon=True)
                self._thread.start()

    def _interval(self) -> float:
        """Seconds between looks: a twentieth of the shortest limit, 10 ms to 250 ms."""
        with self._lock:
            limits = [w.limit_s for w in self._watches]
        return min(0.25, max(0.01, min(limits, default=5.0) / 20))

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval())
            now = time.monotonic()
            with self._lock:
                watches = list(self._watches)
            for w in watches:
                try:
                    w.poll(now)
                except Exception:  # a failing dump must not stop the watchdog
                    import logging

                    logging.getLogger("coop_dbo.watchdog").exception(
                        "coop_dbo: the watchdog's dump failed")


# -- the dump -----------------------------------------------------------------------------

def build_record(*, event: str, rank: int, world: int, step: int,
                 positions: Sequence[UBatchPosition], monitor: StepMonitor | None,
                 elapsed_s: float, limit_s: float | None, phase: str,
                 schedule: tuple[Sequence[str], Sequence[str]] | None,
                 trace: Sequence[TraceEntry], error: str | None = None,
                 now_ns: int | None = None) -> dict[str, Any]:
    """One rank's record of a step, JSON-ready (``RECORD_FORMAT``).

    Args:
        event: ``"watchdog"`` (the step ran past its limit), ``"failure"`` (it raised)
            or ``"trace"`` (a step written for ``python -m coop_dbo.trace merge``).
        positions: ``UBatchScheduler.positions()`` (or ``last_positions``).
        monitor: the step's ``StepMonitor`` (backend call in flight, yield times).
        elapsed_s: seconds since the step started.
        phase: ``"plan"`` (before the ranks agreed) or ``"run"``.
        schedule: the agreed ``(sites, kinds)`` of the step, if any.
        trace: the yields so far (empty without tracing).
        error: ``"Type: message"`` of the error that ended the step.
    """
    now = time.perf_counter_ns() if now_ns is None else now_ns
    ubatches = []
    for p in positions:
        op = op_s = since = None
        if monitor is not None and p.ubatch < len(monitor.op):
            op = monitor.op[p.ubatch]
            if op is not None:
                op_s = (now - monitor.op_ns[p.ubatch]) / 1e9
            if monitor.yield_ns[p.ubatch]:
                since = (now - monitor.yield_ns[p.ubatch]) / 1e9
        ubatches.append({"ubatch": p.ubatch, "state": p.state, "index": p.index,
                         "site": p.site, "kind": p.kind, "stream": p.stream, "op": op,
                         "op_s": op_s, "since_yield_s": since})
    return {
        "format": RECORD_FORMAT, "event": event, "rank": rank, "world": world,
        "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phase": phase,
        "elapsed_s": elapsed_s, "limit_s": limit_s, "error": error,
        "ubatches": ubatches,
        "schedule": None if schedule is None else {"sites": list(schedule[0]),
                                                   "kinds": list(schedule[1])},
        "trace": [{"ubatch": e.ubatch, "index": e.index, "site": e.site,
                   "stream": e.stream, "kind": e.kind, "time_us": e.time_us}
                  for e in trace],
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def record_title(record: dict[str, Any]) -> str:
    what = {"watchdog": f"ran past the watchdog limit of {record.get('limit_s')} s",
            "failure": "failed", "trace": "traced"}.get(record["event"], record["event"])
    return (f"coop_dbo rank {record['rank']} of {record['world']}, step {record['step']}: "
            f"{what} after {record['elapsed_s']:.3f} s ({record['phase']} phase)")


def render_record(record: dict[str, Any], console: Any = None) -> None:
    """Print where each microbatch stood as a rich table, then the error (to
    ``console``, default stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=record_title(record), header_style="bold")
    for name, justify in (("ub", "right"), ("state", "left"), ("yield", "right"),
                          ("site", "left"), ("stream", "left"), ("backend call", "left"),
                          ("in it (s)", "right"), ("since yield (s)", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for u in record["ubatches"]:
        style = "bold red" if u["state"] in ("raised", "running") and (
            record["event"] != "trace") else None
        table.add_row(str(u["ubatch"]), u["state"], str(u["index"]), str(u["site"] or "-"),
                      u["stream"], u["op"] or "-", _seconds(u["op_s"]),
                      _seconds(u["since_yield_s"]), style=style)
    if console is None:
        console = Console(stderr=True)
        console.width = max(console.width, 120)  # not a terminal: rich assumes 80
    console.print(table)
    if record.get("error"):
        console.print(record["error"], markup=False, highlight=False)
