"""Host cost of the cross-rank schedule fingerprint per runner step (``coop_dbo.forensics``).

What a step with a ``process_group`` pays for the fingerprint, against the same runner
with ``check_schedule=False``:

1. ``bookkeeping``: the Python work of one step's checks, timed alone in a loop: the
   guard around the step (step count, call signature), the fields added to the
   agreement, their check, the agreed schedule handed to the scheduler (which copies
   it: a list per step as long as the schedule) and the after-step hook. Measured for
   the CPU model's schedule and for one of 61 layers x 4 yields (the depth of the
   H100 host-time figure in DESIGN.md).
2. ``all_reduce``: the per-step ``all_reduce`` of 4 int64s (without) against 10 (with),
   on a one-rank gloo group.
3. ``step``: whole eager DBO steps of the CPU model (``CPU_SHAPE``) through a runner on
   a one-rank gloo group, with and without the check, interleaved round-robin; medians.
   The difference is the end-to-end cost; it is a few microseconds, below the noise of
   a shared machine, so the bookkeeping figure is the precise one.
4. ``probe``: what the watchdog (off by default) adds per MoE exchange and microbatch:
   the backend probe's six recorded phase calls against six direct ones.

    python3 -m bench.forensics_cost [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from bench.common import CPU_SHAPE, decode_inputs, host_times, make_config, make_model, median
from coop_dbo import CoopDBORunner, UBatchScheduler
from coop_dbo.forensics import Schedule, StepForensics, call_signature
from coop_dbo.moe_hooks import layer_sites
from coop_dbo.watchdog import StepMonitor

#: Host time of one eager DBO step, 61 layers, 1x H100 host (DESIGN.md section 4), ms.
H100_EAGER_STEP_MS = 6.25


def _loop_us(fn: Any, n: int) -> float:
    """Median over 5 rounds of ``fn()``'s time, microseconds per call."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return median(rounds)


def bookkeeping_us(num_layers: int, args: tuple, n: int) -> float:
    """One step's fingerprint work (see the module doc) with a schedule of
    ``num_layers`` MoE layers, microseconds."""
    sites = layer_sites("switch", num_layers)
    kinds = ["switch->comm", "switch->compute"] * (len(sites) // 2)
    sched = UBatchScheduler(2)
    group = dist.group.WORLD
    fx = StepForensics(sched, lambda: group, num_ubatches=2)
    fx.schedules[call_signature(args, {})] = Schedule.of(sites, kinds)
    sched.last_sites, sched.last_kinds, sched.last_complete = sites, kinds, True

    def body(*_: Any) -> None:  # what the runner's step does besides its own work
        fields = fx.agreement_fields(False, 2, [])
        values = [0, 0, 0, 0, *fields][4:]  # the runner's flags, all_reduced on one rank
        fx.agreed_on(values, microbatched=True)
        schedule = fx.schedule_for_run()
        assert schedule is not None
        list(schedule[0]), list(schedule[1])  # the scheduler's copy (_Step)
        fx.ran()

    return _loop_us(lambda: fx.guard(body, args, {}), n)


class _NoOpBackend:
    """Six phase methods that do nothing: the probe's cost is all that is timed."""

    schedule = "switch"

    def dispatch_pack(self, *a: Any) -> None: ...
    def dispatch_transfer(self, *a: Any) -> None: ...
    def dispatch_unpack(self, *a: Any) -> None: ...
    def combine_pack(self, *a: Any) -> None: ...
    def combine_transfer(self, *a: Any) -> None: ...
    def combine_unpack(self, *a: Any) -> None: ...


def probe_us(n: int) -> float:
    """Extra microseconds per exchange and microbatch with the watchdog's probe."""
    backend = _NoOpBackend()
    monitor = StepMonitor(2)
    names = ("dispatch_pack", "dispatch_transfer", "dispatch_unpack", "combine_pack",
             "combine_transfer", "combine_unpack")

    def phases(b: Any) -> None:
        for name in names:
            getattr(b, name)(None)

    def in_a_microbatch(fn: Any) -> float:
        return UBatchScheduler(1).run([lambda: _loop_us(fn, n)])[0]

    direct = in_a_microbatch(lambda: phases(backend))
    probed = in_a_microbatch(lambda: phases(monitor.probe(backend)))
    return probed - direct


def all_reduce_us(n: int) -> dict[str, float]:
    out = {}
    for size in (4, 10):
        t = torch.zeros(size, dtype=torch.int64)
        out[f"{size}_int64"] = _loop_us(lambda t=t: (dist.all_reduce(t, op=dist.ReduceOp.MAX),
                                                     t.tolist()), n)
    return out


def step_ms(repeats: int, batch: int = 32) -> dict[str, float]:
    cfg = make_config(CPU_SHAPE)
    model = make_model(cfg)
    inputs = decode_inputs(cfg, batch, seed=1)
    group = dist.group.WORLD
    with_fp = CoopDBORunner(model, process_group=group, decide="always")
    without = CoopDBORunner(model, process_group=group, decide="always", check_schedule=False)
    times = host_times({"with": lambda: with_fp(*inputs), "without": lambda: without(*inputs)},
                       repeats, warmup=3)
    assert with_fp.last_path == without.last_path == "eager-dbo"
    out = {k: median(v["wall_ms"]) for k, v in times.items()}
    # the spread of the difference: quartiles of the per-round differences
    diffs = sorted(a - b for a, b in zip(times["with"]["wall_ms"], times["without"]["wall_ms"],
                                         strict=True))
    out["diff_q1"], out["diff_q3"] = diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4]
    return out


def measure(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="coop_dbo_bench_"), "group")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0,
                            world_size=1)
    try:
        n = 2_000 if quick else 20_000
        args = decode_inputs(make_config(CPU_SHAPE), 32, seed=1)
        steps = step_ms(20 if quick else 200)
        cpu_layers = CPU_SHAPE["num_layers"]
        book_cpu = bookkeeping_us(cpu_layers, args, n)
        book_61 = bookkeeping_us(61, args, n)
        ar = all_reduce_us(n // 4)
        probe = probe_us(n)
    finally:
        dist.destroy_process_group()
    return {
        "bookkeeping_us": {f"{cpu_layers}_layers": book_cpu, "61_layers": book_61},
        "all_reduce_us": ar,
        "step_ms": steps,
        # the longer all_reduce payload counts only if it measured slower
        "share_of_cpu_step": (book_cpu + max(0.0, ar["10_int64"] - ar["4_int64"])) / (
            steps["without"] * 1e3),
        "share_of_h100_61_layer_step": book_61 / (H100_EAGER_STEP_MS * 1e3),
        "watchdog_probe_us_per_exchange": probe,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    r = measure(args.quick)
    b, ar, s = r["bookkeeping_us"], r["all_reduce_us"], r["step_ms"]
    print(f"fingerprint bookkeeping per step: {b[next(iter(b))]:.2f} us "
          f"({next(iter(b)).replace('_', ' ')}), {b['61_layers']:.2f} us (61 layers)")
    print(f"agreement all_reduce, 1-rank gloo: {ar['4_int64']:.2f} us (4 int64) -> "
          f"{ar['10_int64']:.2f} us (10 int64)")
    print(f"eager DBO step, CPU model: {s['without']:.3f} ms without, {s['with']:.3f} ms "
          f"with the fingerprint (medians; per-round difference quartiles "
          f"{s['diff_q1']:+.3f} / {s['diff_q3']:+.3f} ms)")
    print(f"share of the CPU step: {100 * r['share_of_cpu_step']:.3f}%; of the 61-layer "
          f"H100 host step ({H100_EAGER_STEP_MS} ms): "
          f"{100 * r['share_of_h100_61_layer_step']:.3f}%")
    print(f"watchdog probe (when on): {r['watchdog_probe_us_per_exchange']:.2f} us per MoE "
          "exchange and microbatch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
