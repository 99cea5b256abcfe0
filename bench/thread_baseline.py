"""BASELINE, not coop_dbo: thread-based DBO, the established way (as vLLM does it).

One OS thread per microbatch, **new threads every step**, and one ``threading.Event``
per microbatch: a yield sets the next live microbatch's event and waits on its own
(ping-pong). Only the thread holding the "token" runs Python; the others block in
``Event.wait``.

It drives the *same* model code as the greenlet scheduler: each thread binds a
``ThreadUBatch`` with ``coop_dbo.greenlet_sched.bind_microbatch``, so ``dbo_yield`` and
``dbo_yield_and_switch`` inside the model (e.g. in ``moe_hooks.moe_exchange``) call this
driver's ``yield_`` / ``switch_``.

On CUDA, torch's current stream is per OS thread, so each thread keeps its own current
stream and nothing has to be saved or restored on a hand-off. ``switch_(to)`` records
the microbatch's event on its current stream, hands off, then makes the comm or compute
stream current (``torch.cuda.set_stream``, the public API, as the established
implementation does) and waits for the event there. Grad mode and the current device are
per thread too: each worker copies the caller's.

Used only by the benchmarks (host cost of a hand-off, eager step time). It does no yield
symmetry checks (an asymmetric model makes yields return at once once the other
microbatch has finished) and cannot be captured in a CUDA graph (capture across threads
needs relaxed capture modes).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from coop_dbo.greenlet_sched import _CURRENT, bind_microbatch

__all__ = ["ThreadUBatch", "ThreadUBatchRunner", "thread_yield"]

WAIT_TIMEOUT_S = 300.0


class _ThreadStep:
    """Shared state of one ``ThreadUBatchRunner.run`` call."""

    def __init__(self, n: int) -> None:
        self.events = [threading.Event() for _ in range(n)]
        self.done = [False] * n

    def pass_on(self, i: int) -> bool:
        """Wake the next live microbatch after ``i``; False when none is left."""
        n = len(self.events)
        for step in range(1, n + 1):
            j = (i + step) % n
            if j != i and not self.done[j]:
                self.events[j].set()
                return True
        return False

    def wait_turn(self, i: int) -> None:
        ev = self.events[i]
        if not ev.wait(WAIT_TIMEOUT_S):  # never expected; a hung benchmark costs GPU time
            raise RuntimeError(f"bench.thread_baseline: microbatch {i} waited more than "
                               f"{WAIT_TIMEOUT_S} s for its turn.")
        ev.clear()


class ThreadUBatch:
    """The microbatch object one worker thread binds (the protocol of ``bind_microbatch``).

    Attributes:
        id: microbatch index.
        streams: the step's ``coop_dbo.streams.DeviceStreams`` on CUDA, else ``None``
            (``moe_hooks`` reads ``.comm`` / ``.compute`` from it).
        num_yields: yields made so far.
    """

    def __init__(self, ubatch_id: int, step: _ThreadStep, streams: Any, event: Any) -> None:
        self.id = ubatch_id
        self.step = step
        self.streams = streams
        self.event = event
        self.num_yields = 0

    def yield_(self, site: str = "", kind: str = "yield") -> None:
        """Set the next live microbatch's Event, then wait for this one's."""
        self.num_yields += 1
        if self.step.pass_on(self.id):
            self.step.wait_turn(self.id)

    def switch_(self, to: str, site: str = "") -> bool:
        """Record an event on this thread's stream, hand off, resume on ``to`` after it.
        ``True`` when stream ``to`` now waits for the event (as ``dbo_yield_and_switch``)."""
        streams = self.streams
        if streams is None:
            self.yield_(site, "switch")
            return False
        import torch

        self.event.record(torch.cuda.current_stream())
        self.yield_(site, "switch->" + to)
        if to == "comm":
            stream = streams.comm
            streams.comm_used = True
        else:
            stream = streams.compute
        torch.cuda.set_stream(stream)
        stream.wait_event(self.event)
        return True


class ThreadUBatchRunner:
    """BASELINE: runs ``fns[i]()`` in a new OS thread i per call; yields ping-pong Events.

    ``run`` starts one thread per microbatch, wakes microbatch 0 and joins them all, so
    every step pays thread creation, as vLLM's DBO does. On CUDA (when CUDA is already
    initialised) the caller's current stream is the compute stream and a process-wide
    comm stream is the other; after the threads end, the caller's stream waits for the
    comm stream, as ``UBatchScheduler.run`` does.
    """

    def __init__(self, num_ubatches: int = 2) -> None:
        if num_ubatches < 1:
            raise ValueError(f"num_ubatches must be >= 1, got {num_ubatches}.")
        self.num_ubatches = num_ubatches
        self._events: dict[int, list[Any]] = {}  # device index -> one CUDA event per ubatch
        self.last_yield_counts: list[int] = []

    def _cuda(self) -> tuple[Any, list[Any] | None]:
        """The step's ``DeviceStreams`` and per-microbatch events, or ``(None, None)``."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return None, None
        from coop_dbo.streams import DeviceStreams

        streams = DeviceStreams()
        events = self._events.get(streams.device_index)
        if events is None:
            events = [torch.cuda.Event() for _ in range(self.num_ubatches)]
            self._events[streams.device_index] = events
        return streams, events

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        n = len(fns)
        if n != self.num_ubatches:
            raise ValueError(f"run() got {n} callables for {self.num_ubatches} microbatches.")
        streams, events = self._cuda()
        torch = sys.modules.get("torch")
        grad = torch.is_grad_enabled() if torch is not None else True  # per thread in torch
        step = _ThreadStep(n)
        ubs = [ThreadUBatch(i, step, streams, events[i] if events else None) for i in range(n)]
        results: list[Any] = [None] * n
        errors: list[tuple[int, BaseException]] = []

        def body(i: int) -> None:
            ub = ubs[i]
            token = bind_microbatch(ub)
            try:
                step.wait_turn(i)
                if torch is not None:
                    torch.set_grad_enabled(grad)
                if streams is not None:  # device and current stream are per thread
                    assert torch is not None  # streams exist only with CUDA initialised
                    torch.cuda.set_device(streams.device_index)
                    torch.cuda.set_stream(streams.compute)
                results[i] = fns[i]()
            except BaseException as e:  # re-raised in the caller
                errors.append((i, e))
            finally:
                step.done[i] = True
                _CURRENT.reset(token)
                step.pass_on(i)

        threads = [threading.Thread(target=body, args=(i,), daemon=True,
                                    name=f"dbo-baseline-ub{i}") for i in range(n)]
        for t in threads:
            t.start()
        step.events[0].set()
        for t in threads:
            t.join()
        self.last_yield_counts = [ub.num_yields for ub in ubs]
        if streams is not None:
            streams.join_and_restore()
        if errors:
            i, e = errors[0]
            e.add_note(f"bench.thread_baseline: raised in microbatch thread {i}.")
            raise e
        return results


def thread_yield(site: str = "") -> None:
    """Hand the CPU to the next live microbatch thread (no-op outside a runner thread)."""
    ub = _CURRENT.get()
    if isinstance(ub, ThreadUBatch):
        ub.yield_(site)
