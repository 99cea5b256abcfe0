"""Where does the host time of a replayed transformers decode step go, and does it grow
with depth? (GPU)

    python3 -m bench.probes.hf_replay_host [--layers 4 24] [--batch 256]

The ``hf`` stage's Qwen3-MoE (``bench.hf_bench.build``) at each depth, a decode step of
``--batch`` rows over a static cache, the DBO graph path (``CoopDBORunner(decide="always",
cuda_graph_sizes=[batch])``), with no comm and with a simulated one (pinned host-to-device
copies on the comm stream, 50 us each way per 128 tokens). Median host time (ms, 60 steps,
the device idle before each) to issue: the whole runner call; ``CallGraph.replay`` alone
(input copies and launch); the CUDA graph launch alone; the runner's planning of the call
(``plan`` and ``static_call``, which checks the cache).

``--profile``: also profile 60 runner calls per depth without comm (cProfile) and print
the functions whose own time per call grew the most from the first depth to the last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.hf_bench import Decode, build, set_comm
from coop_dbo import CoopDBORunner


def host_ms(dec: Decode, fn: Callable[[], Any], iters: int = 60) -> float:
    times = []
    for _ in range(iters):
        dec.restore()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 24])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {a.batch}")
    print("| layers | comm us per direction | runner ms | CallGraph.replay ms | "
          "graph launch ms | plan + static_call ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    own_us: dict[int, dict[str, float]] = {}
    for layers in a.layers:
        model = build("qwen3_moe", False, layers)
        for comm_us in (0.0, 50.0):
            row = point(model, a.batch, comm_us)
            print(f"| {layers} | {comm_us:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |",
                  flush=True)
        if a.profile:
            own_us[layers] = profile_calls(model, a.batch)
        del model
        torch.cuda.empty_cache()
    if a.profile:
        first, last = own_us[a.layers[0]], own_us[a.layers[-1]]
        grew = sorted(((us - first.get(name, 0.0), name) for name, us in last.items()),
                      reverse=True)
        print(f"own time per call that grew from {a.layers[0]} to {a.layers[-1]} layers "
              "(cProfile, us):")
        for delta, name in grew[:12]:
            print(f"  {delta:+7.1f}  {name}")


def profile_calls(model: Any, batch: int, calls: int = 60) -> dict[str, float]:
    """cProfile's own time per runner call (us) of every function, no comm."""
    import cProfile
    import pstats

    set_comm(model, 0.0, 128)
    dec = Decode(model, batch)
    runner = CoopDBORunner(model, decide="always", cuda_graph_sizes=[batch])
    prof = cProfile.Profile()
    with torch.no_grad():
        for i in range(3 + calls):
            dec.restore()
            torch.cuda.synchronize()
            if i >= 3:
                prof.enable()
            runner(**dec.kwargs)
            prof.disable()
            torch.cuda.synchronize()
    runner.release_graphs()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return {f"{path.split('/')[-1]}:{line}({name})": v[2] / calls * 1e6
            for (path, line, name), v in stats.items()}


def point(model: Any, batch: int, comm_us: float) -> list[float]:
    """Host ms of the runner call, ``CallGraph.replay``, the launch, the planning."""
    set_comm(model, comm_us, 128)
    dec = Decode(model, batch)
    runner = CoopDBORunner(model, decide="always", cuda_graph_sizes=[batch])
    with torch.no_grad():
        for _ in range(3):
            dec.restore()
            runner(**dec.kwargs)
        assert runner.last_path == f"graph:{batch}", runner.last_path
        call = runner._splitter.plan((), dec.kwargs).static_call()
        assert call is not None
        graph = runner._call_graphs[("dbo", call.key)]
        row = [host_ms(dec, lambda: runner(**dec.kwargs)),
               host_ms(dec, lambda: graph.replay(call)),
               host_ms(dec, graph.graph.graph.replay),
               host_ms(dec, lambda: runner._splitter.plan((), dec.kwargs).static_call())]
    runner.release_graphs()
    return row

if __name__ == "__main__":
    main()
