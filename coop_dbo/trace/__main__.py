"""``python -m coop_dbo.trace --demo``: print the trace of a real demo step.

``python -m coop_dbo.trace merge rank0.json rank1.json ...``: per-rank records side by
side with the first divergence marked, and one Chrome trace (``coop_dbo.trace.merge``).
"""

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


def _merge(argv: list[str]) -> int:
    import json

    from .merge import chrome_trace, load_rank_file, print_merged

    parser = argparse.ArgumentParser(
        prog="python -m coop_dbo.trace merge",
        description="Lay per-rank records (watchdog or failure dumps, write_rank_trace "
        "files) side by side, mark the first divergence, and write one Chrome trace.")
    parser.add_argument("files", nargs="+", help="one JSON record per rank")
    parser.add_argument("-o", "--chrome", default="coop_dbo-merged-trace.json",
                        help="where to write the Chrome trace (chrome://tracing, Perfetto); "
                        "default %(default)s")
    args = parser.parse_args(argv)
    try:
        records = [load_rank_file(f) for f in args.files]
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    ranks = [r["rank"] for r in records]
    if len(set(ranks)) != len(ranks):
        parser.error(f"two files are of the same rank (ranks {sorted(ranks)}): pass one file "
                     "per rank, of one step.")
    print_merged(records)
    with open(args.chrome, "w") as f:
        json.dump(chrome_trace(records), f)
    print(f"Chrome trace: {args.chrome}")
    return 0


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        _merge(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m coop_dbo.trace",
                                     description="Print coop_dbo yield traces; "
                                     "'merge FILE...' lays per-rank records side by side.")
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
