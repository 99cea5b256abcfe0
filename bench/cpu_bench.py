"""CPU stage of ``make bench``: host cost of a hand-off and the eager step of the model.

Runs anywhere (no GPU needed; on a GPU host it runs before CUDA is initialised, so the
greenlet scheduler does no stream bookkeeping here).

1. Host cost per yield: greenlet ``dbo_yield``, greenlet ``dbo_yield_and_switch``, and the
   thread BASELINE's Event ping-pong (``bench/thread_baseline.py``).
2. Eager step of the reference MoE decoder (``CPU_SHAPE``: 4 layers, tiny widths, so the
   host work dominates) on a batch split in two microbatches:
   ``unsplit`` (the whole batch, every op once), ``sequential`` (the two microbatches one
   after the other, no scheduler: yields are no-ops), ``greenlet_dbo`` (UBatchScheduler),
   ``thread_dbo`` (BASELINE). Wall and process CPU time per step, medians, variants
   interleaved round-robin, one intra-op thread (``torch.set_num_threads(1)``).

    python3 -m bench.cpu_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from bench import yield_cost
from bench.common import (
    CPU_SHAPE,
    decode_inputs,
    host_env,
    host_times,
    make_config,
    make_model,
    median,
)
from bench.thread_baseline import ThreadUBatchRunner
from coop_dbo import UBatchScheduler
from coop_dbo.split import split_tensors

VARIANTS = ("unsplit", "sequential", "greenlet_dbo", "thread_dbo")


def model_step(quick: bool = False, batch: int = 32) -> dict[str, Any]:
    """Eager step times of the CPU model, per variant (ms), and the ratios that matter."""
    cfg = make_config(CPU_SHAPE)
    model = make_model(cfg)
    inputs = decode_inputs(cfg, batch, seed=1)
    chunks = split_tensors(inputs, 2)
    sched = UBatchScheduler(2)
    threads = ThreadUBatchRunner(2)

    def unsplit() -> torch.Tensor:
        return model(*inputs)

    def sequential() -> torch.Tensor:
        return torch.cat([model(*c) for c in chunks])

    def greenlet_dbo() -> torch.Tensor:
        return torch.cat(sched.run([lambda c=c: model(*c) for c in chunks]))

    def thread_dbo() -> torch.Tensor:
        return torch.cat(threads.run([lambda c=c: model(*c) for c in chunks]))

    fns = {"unsplit": unsplit, "sequential": sequential, "greenlet_dbo": greenlet_dbo,
           "thread_dbo": thread_dbo}
    # One intra-op thread: this measures host overhead, and with several, the OpenMP
    # teams that each new baseline thread starts keep spinning and slow every variant.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            ref = sequential()
            same = {k: bool(torch.equal(fns[k](), ref)) for k in ("greenlet_dbo", "thread_dbo")}
            times = host_times(fns, repeats=20 if quick else 200, warmup=3)
    finally:
        torch.set_num_threads(num_threads)
    med = {k: {m: median(v[m]) for m in ("wall_ms", "cpu_ms")} for k, v in times.items()}
    yields = cfg.num_layers * 4  # the switch schedule: 4 yields per MoE layer
    ratios = {}
    for m in ("wall_ms", "cpu_ms"):
        ratios[m] = {
            "greenlet_dbo_vs_sequential": med["greenlet_dbo"][m] / med["sequential"][m],
            "greenlet_dbo_vs_unsplit": med["greenlet_dbo"][m] / med["unsplit"][m],
            "thread_dbo_vs_sequential": med["thread_dbo"][m] / med["sequential"][m],
            "sequential_vs_unsplit": med["sequential"][m] / med["unsplit"][m],
        }
    return {"shape": dict(CPU_SHAPE), "dtype": "float32", "batch": batch, "num_ubatches": 2,
            "intra_op_threads": 1,
            "yields_per_ubatch": yields, "repeats": len(times["unsplit"]["wall_ms"]),
            "median": med, "ratios": ratios, "outputs_equal_sequential": same,
            "samples": times}


def hand_off(quick: bool = False) -> dict[str, Any]:
    """Host cost per yield (``yield_cost.measure``), at the CPU stage's sizes."""
    return yield_cost.measure(num_yields=2_000 if quick else 20_000, repeats=3 if quick else 7)


def run(quick: bool = False) -> dict[str, Any]:
    """The whole CPU stage: ``{"yield_cost": ..., "model_step": ...}``."""
    return {"yield_cost": hand_off(quick), "model_step": model_step(quick)}


def main(argv: list[str] | None = None) -> None:
    """``python3 -m bench.cpu_bench [--quick]``: the CPU stage's figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    r = run(a.quick)
    r["model_step"].pop("samples")
    print(json.dumps({"env": host_env(), **r}, indent=2))


if __name__ == "__main__":
    main()
