"""``python -m coop_dbo.trace --demo``: print the trace of a real demo step."""

from __future__ import annotations

import argparse

from ..errors import YieldAsymmetryError
from ..greenlet_sched import UBatchScheduler, dbo_yield, dbo_yield_and_switch
from .render import print_trace


def _demo() -> None:
    def layer_program(ub: int, num_layers: int) -> int:
        total = ub
        for layer in range(num_layers):
            total += layer  # attention + gate
            dbo_yield_and_switch("comm", f"L{layer}.dispatch")
            total *= 2  # dispatch all-to-all
            dbo_yield_and_switch("compute", f"L{layer}.experts")
            total -= 1  # experts
            dbo_yield_and_switch("comm", f"L{layer}.combine")
            dbo_yield_and_switch("compute", f"L{layer}.post")
        return total

    sched = UBatchScheduler(2, trace=True)
    sched.run([lambda: layer_program(0, 2), lambda: layer_program(1, 2)])
    print_trace(sched.last_trace)

    def skips_a_yield(ub: int) -> None:
        dbo_yield("dispatch")
        if ub == 1:  # a routing corner case: no tokens, and the model skips the yield
            return
        dbo_yield("combine")

    try:
        sched.run([lambda: skips_a_yield(0), lambda: skips_a_yield(1)])
    except YieldAsymmetryError as err:
        print_trace(err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coop_dbo.trace",
                                     description="Print coop_dbo yield traces.")
    parser.add_argument("--demo", action="store_true",
                        help="run a two-microbatch demo step and print its trace, then "
                        "an asymmetric step and its error")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return
    _demo()


if __name__ == "__main__":
    main()
