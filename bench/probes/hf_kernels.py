"""What do the kernels of a transformers decode step cost, without DBO and under it? (GPU)

    python3 -m bench.probes.hf_kernels [--layers 4] [--batches 256 1024]

The ``hf`` stage's Qwen3-MoE (``bench.hf_bench.build``), no comm, one decode step over a
static cache: the plain step captured as a ``CallGraph`` and the runner's DBO graph,
profiled with ``torch.profiler`` over 5 replays each. Prints the kernel time per step
(the sum over kernels, so overlap between streams is not subtracted) and the kernels
that take the most, per step.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.hf_bench import Decode, build, set_comm
from coop_dbo import CoopDBORunner
from coop_dbo.cudagraph_capture import CallGraph
from coop_dbo.split import DefaultSplitter

REPLAYS = 5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.layers} layers")
    model = build("qwen3_moe", False, a.layers)
    set_comm(model, 0.0, 128)
    for batch in a.batches:
        dec = Decode(model, batch)
        call = DefaultSplitter().plan((), dec.kwargs).static_call()
        assert call is not None
        with torch.no_grad():
            plain = CallGraph(model, call)
            runner = CoopDBORunner(model, decide="always", cuda_graph_sizes=[batch])
            dec.restore()
            runner(**dec.kwargs)
        report(f"batch {batch}, plain graph", dec, functools.partial(plain.replay, call),
               a.top)
        report(f"batch {batch}, DBO graph", dec, functools.partial(runner, **dec.kwargs),
               a.top)
        runner.release_graphs()
        dec.restore()


def report(name: str, dec: Decode, step: Callable[[], Any], top: int) -> None:
    """Profile ``REPLAYS`` steps (2 warm-up), print the kernel time and the top kernels."""
    with torch.no_grad():
        for _ in range(2):
            dec.restore()
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPLAYS):
                dec.restore()
                step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in kernels) / REPLAYS / 1e3
    print(f"== {name}: kernel time per step {total:.3f} ms")
    for e in kernels[:top]:
        print(f"  {e.device_time_total / REPLAYS / 1e3:7.3f} ms  x{e.count // REPLAYS:4d}  "
              f"{e.key[:100]}")


if __name__ == "__main__":
    main()
