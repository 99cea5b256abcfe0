"""Host cost of one microbatch hand-off: greenlet scheduler vs the thread baseline."""

from __future__ import annotations

import statistics
import time

from coop_dbo import UBatchScheduler, dbo_yield, dbo_yield_and_switch
from bench.thread_baseline import ThreadUBatchRunner, thread_yield


def _per_yield_us(run_step, num_yields: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_step()
        samples.append((time.perf_counter() - t0) / (2 * num_yields) * 1e6)
    return statistics.median(samples)


def measure(num_yields: int = 20_000, repeats: int = 7, cuda: bool = False) -> dict:
    """Median microseconds per yield (two microbatches) for each hand-off kind."""
    sched = UBatchScheduler(2)

    def g_plain():
        for _ in range(num_yields):
            dbo_yield("s")

    def g_switch():
        for k in range(num_yields // 2):
            dbo_yield_and_switch("comm", "dispatch")
            dbo_yield_and_switch("compute", "experts")

    def noop():
        for _ in range(num_yields):
            pass

    threads = ThreadUBatchRunner(2)
    t_yields = max(num_yields // 10, 1000)  # threads are slow; fewer yields keep it short

    def t_plain():
        for _ in range(t_yields):
            thread_yield()

    out = {
        "loop_only_us": _per_yield_us(lambda: sched.run([noop, noop]), num_yields, repeats),
        "greenlet_yield_us": _per_yield_us(lambda: sched.run([g_plain, g_plain]),
                                           num_yields, repeats),
        "greenlet_switch_yield_us": _per_yield_us(lambda: sched.run([g_switch, g_switch]),
                                                  num_yields, repeats),
        "thread_event_yield_us": _per_yield_us(lambda: threads.run([t_plain, t_plain]),
                                               t_yields, repeats),
    }
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(measure(), indent=2))
