"""BASELINE, not coop_dbo: thread-based microbatch hand-off, the established way.

One OS thread per microbatch and a ``threading.Event`` per thread: a yield sets the next
microbatch's event and waits on its own (as vLLM's DBO does). Used only by the benchmarks
to compare the host cost of a hand-off with greenlet switching.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

_local = threading.local()


class ThreadUBatchRunner:
    """Runs ``fns[i]()`` in thread i; ``thread_yield()`` passes to the next microbatch."""

    def __init__(self, num_ubatches: int = 2) -> None:
        self.num_ubatches = num_ubatches

    def run(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        n = len(fns)
        events = [threading.Event() for _ in range(n)]
        done = [False] * n
        results: list[Any] = [None] * n
        errors: list[BaseException] = []

        def body(i: int) -> None:
            _local.ctx = (i, events, done)
            events[i].wait()
            events[i].clear()
            try:
                results[i] = fns[i]()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                done[i] = True
                _local.ctx = None
                _pass_on(i, events, done)

        threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        events[0].set()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _pass_on(i: int, events: list[threading.Event], done: list[bool]) -> None:
    n = len(events)
    for step in range(1, n + 1):
        j = (i + step) % n
        if not done[j]:
            events[j].set()
            return


def thread_yield() -> None:
    """Hand the CPU to the next live microbatch thread and wait for this one's turn."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        return
    i, events, done = ctx
    if sum(1 for d in done if not d) <= 1:
        return
    _pass_on(i, events, done)
    events[i].wait()
    events[i].clear()
