"""Where the GPU time of the 1-GPU bench's DBO step goes (CUDA only).

Profiles of the reference decoder (``GPU_SHAPE``, bf16, ``SingleProcessBackend``):

1. One microbatch run eagerly without DBO and without simulated comm: GPU time per
   kernel name (top entries), so the stretches between yields can be balanced.
2. The stretches: one microbatch's graph replay with marker kernels around each transfer
   gives the compute between transfers per layer (``a``: before the dispatch, ``e``: the
   experts' stretch), and ``simulate`` replays the DBO schedule's issue order on two
   streams with those lengths, so the DBO graph's time can be predicted from them.
3. One DBO graph replay at comm = compute (ratio 1): per CUDA stream the busy time, the
   time both streams are busy together, the simulated-transfer kernels' time and how
   much of it runs under compute kernels.

    python3 -m bench.profile_layer [--tokens 128] [--layers 6] [--set FIELD=VALUE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    GPU_SHAPE,
    add_config_overrides,
    calibrate_spin,
    capture_step,
    config_overrides,
    decode_inputs,
    make_config,
    make_model,
    median,
    set_backend,
    time_cuda,
)
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.split import split_tensors


def _kernels(prof: Any) -> list[dict[str, Any]]:
    """The kernel and memcpy events of a torch.profiler run (its Chrome trace's)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    return [e for e in events if e.get("cat") == "kernel" or e.get("cat") == "gpu_memcpy"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``intervals`` as sorted disjoint intervals."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: list[tuple[float, float]]) -> float:
    """Total length of disjoint ``intervals``."""
    return sum(b - a for a, b in intervals)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Length of the overlap of two sets of disjoint intervals."""
    total = 0.0
    for a, b in x:
        for c, d in y:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                total += hi - lo
    return total


class _MarkedBackend(SingleProcessBackend):
    """Zero comm time; a one-cycle spin kernel before and after each transfer, so that a
    profile of one microbatch shows where its compute stretches begin and end."""

    def dispatch_transfer(self, packed: Any) -> Any:
        torch.cuda._sleep(1)
        out = super().dispatch_transfer(packed)
        torch.cuda._sleep(1)
        return out

    def combine_transfer(self, packed: Any) -> Any:
        torch.cuda._sleep(1)
        out = super().combine_transfer(packed)
        torch.cuda._sleep(1)
        return out


def _stages(model: MoEDecoder, cfg: MoEConfig, T: int, dev: torch.device
            ) -> tuple[list[float], list[float], float]:
    """GPU time of each stretch between transfers of one microbatch (graph replay), us:
    ``(before each dispatch, experts' stretch per layer, after the last combine)``."""
    backend = model.backend
    set_backend(model, _MarkedBackend(cfg.num_experts, num_max_tokens_per_rank=T))
    g = capture_step(model, lambda n: decode_inputs(cfg, n, seed=1, device=dev), T, 1, dev)
    g.graphs[T].replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.graphs[T].replay()
        torch.cuda.synchronize()
    set_backend(model, backend)
    ks = sorted(_kernels(prof), key=lambda k: k["ts"])
    marks = [k for k in ks if "spin" in k["name"].lower()]
    t0, t1 = ks[0]["ts"], ks[-1]["ts"] + ks[-1]["dur"]
    # Four marks per layer: before / after the dispatch, before / after the combine.
    # Stretch "A" of layer l: from the end of layer l-1's combine (or the start) to its
    # dispatch; stretch "E": from the end of its dispatch to its combine.
    before: list[float] = []
    experts: list[float] = []
    prev_end = t0
    for i in range(0, len(marks) - 3, 4):
        d0, d1, c0, c1 = marks[i:i + 4]
        before.append(d0["ts"] - prev_end)
        experts.append(c0["ts"] - (d1["ts"] + d1["dur"]))
        prev_end = c1["ts"] + c1["dur"]
    tail = t1 - prev_end
    print("one microbatch graph, compute between transfers (us): before each dispatch "
          + " ".join(f"{x:.0f}" for x in before) + "; experts " + " ".join(
              f"{x:.0f}" for x in experts) + f"; after the last combine {tail:.0f}")
    return before, experts, tail


def simulate(before: list[float], experts: list[float], tail: float, comm_us: float,
             num_ubatches: int = 2) -> float:
    """Step time (us) of the DBO schedule if every stretch kept its one-microbatch length
    and every transfer took ``comm_us``: each stream runs its work in issue order, each
    piece starting when its stream is free and its own microbatch's previous piece ended.
    Issue order per layer: compute A0 A1 E0 E1, comm D0 D1 C0 C1."""
    t_compute = t_comm = 0.0
    end = [0.0] * num_ubatches  # end of each microbatch's last piece
    for a, e in zip(before, experts, strict=True):
        for u in range(num_ubatches):
            t_compute = max(t_compute, end[u]) + a
            end[u] = t_compute
        for dur_compute in (None, e):
            for u in range(num_ubatches):  # transfers, then (second pass) experts
                if dur_compute is None:
                    t_comm = max(t_comm, end[u]) + comm_us
                    end[u] = t_comm
                else:
                    t_compute = max(t_compute, end[u]) + dur_compute
                    end[u] = t_compute
        for u in range(num_ubatches):
            t_comm = max(t_comm, end[u]) + comm_us
            end[u] = t_comm
    for u in range(num_ubatches):
        t_compute = max(t_compute, end[u]) + tail
    return t_compute


def main(argv: list[str] | None = None) -> None:
    """``python3 -m bench.profile_layer``: prints both profiles (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--layers", type=int, default=GPU_SHAPE["num_layers"])
    p.add_argument("--top", type=int, default=25)
    add_config_overrides(p)
    a = p.parse_args(argv)
    config = config_overrides(p, a.set)
    dev = torch.device("cuda")
    T, L = a.tokens, a.layers
    cfg = make_config({**GPU_SHAPE, "num_layers": L, **config}, max_batch=2 * T)
    model = make_model(cfg, SingleProcessBackend(cfg.num_experts, num_max_tokens_per_rank=T),
                       config, dtype=torch.bfloat16, device=dev)
    calibrate_spin(dev)
    inputs = decode_inputs(cfg, 2 * T, seed=0, device=dev)
    ub = split_tensors(inputs, 2)[0]
    with torch.no_grad():
        for _ in range(3):
            model(*ub)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*ub)
            torch.cuda.synchronize()
        per_name: dict[str, list[float]] = defaultdict(list)
        for k in _kernels(prof):
            per_name[k["name"][:90]].append(k["dur"])
        total = sum(sum(v) for v in per_name.values())
        print(f"one microbatch of {T} tokens, {L} layers, eager, no comm: kernels "
              f"{total / 1e3:.3f} ms ({total / L:.0f} us per layer)")
        print(f"{'us/layer':>9} {'calls/layer':>11}  kernel")
        for name, durs in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:a.top]:
            print(f"{sum(durs) / L:9.1f} {len(durs) / L:11.1f}  {name}")

        g = capture_step(model, lambda n: decode_inputs(cfg, n, seed=1, device=dev), T, 1, dev)
        c_us = median(time_cuda(g.graphs[T].replay, 20)) * 1e3 / L
        del g
        before, experts, tail = _stages(model, cfg, T, dev)
        d_us = c_us / 2
        set_backend(model, SingleProcessBackend(cfg.num_experts, dispatch_us=d_us,
                                                combine_us=d_us, num_max_tokens_per_rank=T))
        g2 = capture_step(model, lambda n: decode_inputs(cfg, n, seed=1, device=dev), 2 * T,
                          2, dev)
        t_dbo = median(time_cuda(g2.graphs[2 * T].replay, 20))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g2.graphs[2 * T].replay()
            torch.cuda.synchronize()
    ks = _kernels(prof)
    by_stream: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    spin: list[tuple[float, float]] = []
    for k in ks:
        iv = (k["ts"], k["ts"] + k["dur"])
        by_stream[k["args"].get("stream")].append(iv)
        if "spin" in k["name"].lower() or k.get("cat") == "gpu_memcpy":
            spin.append(iv)
    t0 = min(iv[0] for ivs in by_stream.values() for iv in ivs)
    t1 = max(iv[1] for ivs in by_stream.values() for iv in ivs)
    print(f"the DBO schedule with these stretches and {d_us:.0f} us transfers would take "
          f"{simulate(before, experts, tail, d_us) / 1e3:.3f} ms")
    print(f"\nDBO graph, {T} tokens per microbatch, ratio 1 (c = {c_us:.0f} us/layer, "
          f"dispatch = combine = {d_us:.0f} us): {t_dbo:.3f} ms timed, "
          f"{(t1 - t0) / 1e3:.3f} ms first to last kernel in the profile")
    unions = {s: _union(ivs) for s, ivs in by_stream.items()}
    for s, u in unions.items():
        print(f"  stream {s}: busy {_length(u) / 1e3:.3f} ms, {len(by_stream[s])} kernels")
    streams = list(unions)
    if len(streams) >= 2:
        both = _intersect(unions[streams[0]], unions[streams[1]])
        print(f"  both streams busy together: {both / 1e3:.3f} ms")
    spin_u = _union(spin)
    non_spin = _union([(k["ts"], k["ts"] + k["dur"]) for k in ks
                       if "spin" not in k["name"].lower() and k.get("cat") != "gpu_memcpy"])
    print(f"  simulated transfer: {_length(spin_u) / 1e3:.3f} ms, of it under other "
          f"kernels {_intersect(spin_u, non_spin) / 1e3:.3f} ms; other kernels busy "
          f"{_length(non_spin) / 1e3:.3f} ms")
    # The timeline, stage by stage: runs of kernels per stream, merged when gaps < 5 us.
    print("  timeline (stream: start-end us, relative):")
    for s in streams:
        runs = []
        for a_, b_ in _union([(x - 5, y) for x, y in by_stream[s]]):
            runs.append(f"{(a_ + 5 - t0):.0f}-{(b_ - t0):.0f}")
        print(f"   {s}: " + " ".join(runs[:60]))


if __name__ == "__main__":
    main()
