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

``--phases``: also time each part of 60 runner calls per depth without comm (wrapped
methods); the planning and the runner call with the GPU idle, right after a synchronize
that waited about a decode step, and after that wait and a 2 ms busy spin of the host;
the bare graph launch with the stream idle and behind the call's two input copies; a
small kernel's launch with the stream idle and right after the graph's launch.

``--interleave N``: instead (the other options but ``--layers`` and ``--batch`` unused),
build every depth at once and take N rounds, each timing at every depth in turn (so that
the host's drift between runs falls on all depths alike): the planning, the runner call,
the launch of the DBO graph and of the plain step's graph, each with the GPU idle, right
after a synchronize that waited ``--wait-ms`` (default 20, about a decode step: each part
after the same wait, whatever ran before it); medians and quartiles, us. The plain
step's graph is one stream, the DBO graph forks and joins at every yield.

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
from coop_dbo.cudagraph_capture import CallGraph
from coop_dbo.split import StaticCall


def host_us(dec: Decode, fn: Callable[[], Any], iters: int = 60, *, wait_ms: float = 0.0,
            spin_ms: float = 0.0, before: Callable[[], Any] | None = None) -> list[float]:
    """Host us to issue ``fn``, ``iters`` times: each time the cache put back, the host
    having waited ``wait_ms`` in a synchronize (for a GPU sleep) and then spun
    ``spin_ms``, ``before`` issued; the device idle when ``fn`` starts."""
    times = []
    with torch.no_grad():
        for _ in range(iters):
            dec.restore()
            if wait_ms:
                torch.cuda._sleep(int(wait_ms * 1e-3 * 1.9e9))
            torch.cuda.synchronize()
            t_spin = time.perf_counter() + spin_ms * 1e-3
            while time.perf_counter() < t_spin:
                pass
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
    return times


def host_ms(dec: Decode, fn: Callable[[], Any], iters: int = 60) -> float:
    """Median host ms to issue ``fn`` (``host_us``)."""
    return statistics.median(host_us(dec, fn, iters)) / 1e3


def captured(model: Any, batch: int, comm_us: float = 0.0
             ) -> tuple[Decode, CoopDBORunner, StaticCall, CallGraph]:
    """A decode step of ``batch`` rows over a static cache and a runner on the DBO graph
    path that has captured it (3 calls): ``(decode, runner, call, its DBO graph)``."""
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
    return dec, runner, call, runner._call_graphs[("dbo", call.key)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 24])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--phases", action="store_true")
    p.add_argument("--comm-us", type=float, nargs="+", default=[0.0, 50.0])
    p.add_argument("--interleave", type=int, default=0, metavar="N")
    p.add_argument("--wait-ms", type=float, default=20.0)
    a = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {a.batch}")
    if a.interleave:
        interleaved(a.layers, a.batch, a.interleave, a.wait_ms)
        return
    print("| layers | comm us per direction | runner ms | CallGraph.replay ms | "
          "graph launch ms | plan + static_call ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    own_us: dict[int, dict[str, float]] = {}
    for layers in a.layers:
        model = build("qwen3_moe", False, layers)
        for comm_us in a.comm_us:
            row = point(model, a.batch, comm_us)
            print(f"| {layers} | {comm_us:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |",
                  flush=True)
        if a.profile:
            own_us[layers] = profile_calls(model, a.batch)
        if a.phases:
            for name, us in phases(model, a.batch).items():
                print(f"  {layers} layers, {name}: {us:.1f} us", flush=True)
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

    dec, runner, _, _ = captured(model, batch)
    prof = cProfile.Profile()

    def profiled() -> None:
        prof.enable()
        runner(**dec.kwargs)
        prof.disable()
    host_us(dec, profiled, calls)
    runner.release_graphs()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return {f"{path.split('/')[-1]}:{line}({name})": v[2] / calls * 1e6
            for (path, line, name), v in stats.items()}


def interleaved(depths: list[int], batch: int, rounds: int, wait_ms: float) -> None:
    """Host us of four parts of a replayed step at every depth, the depths taken in turn,
    each right after a synchronize that waited ``wait_ms`` for a GPU sleep."""
    parts: dict[int, dict[str, Callable[[], Any]]] = {}
    decs: dict[int, Decode] = {}
    keep: list[Any] = []
    for layers in depths:
        model = build("qwen3_moe", False, layers)
        dec, runner, call, dbo = captured(model, batch)
        decs[layers] = dec
        with torch.no_grad():
            dec.restore()
            plain = CallGraph(model, call)
        keep += [model, runner, plain]
        kwargs = dec.kwargs
        parts[layers] = {
            "planning (plan, static_call)":
                lambda r=runner, k=kwargs: r._splitter.plan((), k).static_call(),
            "runner call": lambda r=runner, k=kwargs: r(**k),
            "DBO graph launch": dbo.graph.graph.replay,
            "plain graph launch": plain.graph.graph.replay}
    times: dict[tuple[int, str], list[float]] = {(d, n): [] for d in depths for n in parts[d]}
    for i in range(rounds + 5):
        for layers in depths:
            for name, fn in parts[layers].items():
                # (every part after the same wait, whatever ran before it)
                dt = host_us(decs[layers], fn, 1, wait_ms=wait_ms)
                if i >= 5:
                    times[(layers, name)] += dt
    print(f"{rounds} rounds, each part after a {wait_ms:g} ms wait; us: median (quartiles)")
    print("| part | " + " | ".join(f"{d} layers" for d in depths) + " |")
    print("| --- |" + " ---: |" * len(depths))
    for name in parts[depths[0]]:
        cells = []
        for layers in depths:
            q = statistics.quantiles(times[(layers, name)], n=4)
            cells.append(f"{q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def phases(model: Any, batch: int, calls: int = 60) -> dict[str, float]:
    """Median host us per runner call of each wrapped part, no comm; and launch variants."""
    from collections import defaultdict

    import coop_dbo.runner as runner_mod

    dec, runner, call, cg = captured(model, batch)
    sg = cg.graph
    cuda_graph = sg.graph
    acc: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[name].append((time.perf_counter() - t0) * 1e6)
        return wrapper

    saved_map = runner_mod.map_tensors
    runner._splitter.plan = timed("plan", runner._splitter.plan)
    wrapped = ("_local_decision", "_graph_eligible", "_graph_readiness", "_replays_proven",
               "_dbo_step", "_replay_call", "_record")
    for name in wrapped:
        setattr(runner, name, timed(name, getattr(runner, name)))
    cg.replay = timed("CallGraph.replay", cg.replay)
    sg.accepts = timed("StepGraph.accepts", sg.accepts)
    cuda_graph.replay = timed("CUDAGraph.replay (in the call)", cuda_graph.replay)
    runner_mod.map_tensors = timed("map_tensors(clone)", saved_map)
    whole = timed("runner call", runner)
    try:
        host_us(dec, lambda: whole(**dec.kwargs), calls)
    finally:
        runner_mod.map_tensors = saved_map
        for obj, name in [(runner._splitter, "plan"), (cg, "replay"), (sg, "accepts"),
                          (cuda_graph, "replay"), *((runner, n) for n in wrapped)]:
            delattr(obj, name)
    n_calls = len(acc["runner call"])
    out = {f"{name} (x{len(v) / n_calls:g})": statistics.median(v) * len(v) / n_calls
           for name, v in acc.items()}
    small = torch.zeros(1, device="cuda")
    static = sg.static_inputs

    def after(before: Callable[[], Any], fn: Callable[[], Any], wait_ms: float = 0.0,
              spin_ms: float = 0.0) -> float:
        return statistics.median(host_us(dec, fn, calls, wait_ms=wait_ms, spin_ms=spin_ms,
                                         before=before))

    def plan() -> Any:
        return runner._splitter.plan((), dec.kwargs).static_call()

    def nothing() -> None:
        return None

    gpu_ms = 20.0  # about one decode step
    out["plan + static_call, GPU idle"] = after(nothing, plan)
    out[f"plan + static_call, after a {gpu_ms:g} ms sync"] = after(nothing, plan, gpu_ms)
    out[f"plan + static_call, after a {gpu_ms:g} ms sync, then 2 ms spin"] = after(
        nothing, plan, gpu_ms, 2.0)
    out["runner call, GPU idle"] = after(nothing, lambda: runner(**dec.kwargs))
    out[f"runner call, after a {gpu_ms:g} ms sync"] = after(
        nothing, lambda: runner(**dec.kwargs), gpu_ms)
    out[f"runner call, after a {gpu_ms:g} ms sync, then 2 ms spin"] = after(
        nothing, lambda: runner(**dec.kwargs), gpu_ms, 2.0)
    out["launch, stream idle"] = after(nothing, cuda_graph.replay)
    out["launch, behind the two input copies"] = after(
        lambda: [d.copy_(s, non_blocking=True) for d, s in zip(static, call.tensors,
                                                                 strict=True)],
        cuda_graph.replay)

    def launch_then_small() -> None:
        cuda_graph.replay()
        t0 = time.perf_counter()
        small.add_(1)
        acc["small kernel right after the launch"].append((time.perf_counter() - t0) * 1e6)

    acc["small kernel right after the launch"] = []
    after(nothing, launch_then_small)
    out["small kernel right after the launch"] = statistics.median(
        acc["small kernel right after the launch"])
    out["small kernel, stream idle"] = after(nothing, lambda: small.add_(1))
    runner.release_graphs()
    return out


def point(model: Any, batch: int, comm_us: float) -> list[float]:
    """Host ms of the runner call, ``CallGraph.replay``, the launch, the planning."""
    dec, runner, call, graph = captured(model, batch, comm_us)
    row = [host_ms(dec, lambda: runner(**dec.kwargs)),
           host_ms(dec, lambda: graph.replay(call)),
           host_ms(dec, graph.graph.graph.replay),
           host_ms(dec, lambda: runner._splitter.plan((), dec.kwargs).static_call())]
    runner.release_graphs()
    return row

if __name__ == "__main__":
    main()
