"""Host cost of one microbatch hand-off: greenlet scheduler vs the thread BASELINE.

Two microbatches that do nothing but yield; the cost per yield is the step time divided by
the number of yields of both microbatches. Both drivers go through the same public calls
(``dbo_yield`` / ``dbo_yield_and_switch``), so the numbers are what a model pays per yield
point. With ``cuda=True`` CUDA is initialised first, so the greenlet scheduler also saves
and restores the current CUDA stream on every yield and a stream-switching yield records
and waits a CUDA event (the thread baseline does the same through the public torch API).

    python3 -m bench.yield_cost            # CPU
    python3 -m bench.yield_cost --cuda     # with CUDA stream bookkeeping (GPU host)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from bench.common import median
from bench.thread_baseline import ThreadUBatchRunner, thread_yield
from coop_dbo import UBatchScheduler, dbo_yield, dbo_yield_and_switch


def _per_yield_us(run_step: Callable[[], object], num_yields: int, repeats: int) -> float:
    """Median over ``repeats`` of step time / (2 microbatches x ``num_yields``), in us."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_step()
        samples.append((time.perf_counter() - t0) / (2 * num_yields) * 1e6)
    return median(samples)


def _plain(n: int) -> Callable[[], None]:
    def fn() -> None:
        for _ in range(n):
            dbo_yield("s")
    return fn


def _switching(n: int) -> Callable[[], None]:
    def fn() -> None:
        for _ in range(n // 2):
            dbo_yield_and_switch("comm", "dispatch")
            dbo_yield_and_switch("compute", "experts")
    return fn


def measure(num_yields: int = 20_000, repeats: int = 7, cuda: bool = False) -> dict[str, float]:
    """Median microseconds per yield (two microbatches) for each hand-off kind.

    Keys: ``loop_only_us`` (the empty loop), ``greenlet_yield_us``,
    ``greenlet_switch_yield_us``, ``thread_event_yield_us`` (BASELINE, ``dbo_yield``
    through ``ThreadUBatchRunner``), ``thread_event_switch_yield_us`` (BASELINE,
    ``dbo_yield_and_switch``), ``thread_yield_direct_us`` (BASELINE, ``thread_yield()``).
    """
    if cuda:
        import torch

        torch.cuda.init()
        torch.cuda.synchronize()
    num_yields -= num_yields % 2
    sched = UBatchScheduler(2)

    def noop() -> None:
        for _ in range(num_yields):
            pass

    threads = ThreadUBatchRunner(2)
    t_yields = max(num_yields // 10, 1000)  # threads are slow; fewer yields keep it short
    t_yields -= t_yields % 2

    def t_direct() -> None:
        for _ in range(t_yields):
            thread_yield("s")

    g_plain, g_switch = _plain(num_yields), _switching(num_yields)
    t_plain, t_switch = _plain(t_yields), _switching(t_yields)
    out = {
        "loop_only_us": _per_yield_us(lambda: sched.run([noop, noop]), num_yields, repeats),
        "greenlet_yield_us": _per_yield_us(lambda: sched.run([g_plain, g_plain]),
                                           num_yields, repeats),
        "greenlet_switch_yield_us": _per_yield_us(lambda: sched.run([g_switch, g_switch]),
                                                  num_yields, repeats),
        "thread_event_yield_us": _per_yield_us(lambda: threads.run([t_plain, t_plain]),
                                               t_yields, repeats),
        "thread_event_switch_yield_us": _per_yield_us(
            lambda: threads.run([t_switch, t_switch]), t_yields, repeats),
        "thread_yield_direct_us": _per_yield_us(lambda: threads.run([t_direct, t_direct]),
                                                t_yields, repeats),
    }
    if cuda:
        import torch

        torch.cuda.synchronize()
    out["cuda"] = bool(cuda)
    out["num_yields_greenlet"] = num_yields
    out["num_yields_thread"] = t_yields
    out["repeats"] = repeats
    # The targets (reported, not asserted): plain <= 1/10, switching <= 1/4.
    out["plain_vs_thread"] = out["greenlet_yield_us"] / out["thread_event_yield_us"]
    out["switch_vs_thread"] = (out["greenlet_switch_yield_us"]
                               / out["thread_event_switch_yield_us"])
    return out


def main(argv: list[str] | None = None) -> None:
    """``python3 -m bench.yield_cost [--cuda]``: the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--num-yields", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.num_yields, a.repeats, a.cuda), indent=2))


if __name__ == "__main__":
    main()
