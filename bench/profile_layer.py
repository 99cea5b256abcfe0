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

``--plan`` instead plans the schedule (``coop_dbo.planner``) at each size: it measures
every piece of one microbatch's layers (``profile_decoder``: the stretches of one
microbatch's graph with each movable piece before the dispatch in turn), the transfers
alone at comm = compute (copy-engine transfer), picks the fastest of the 8 placements in
simulation, and prints the predicted and the measured DBO graph time of the planned and
the default placement; then it writes the plan into ``<out>/calibration-<gpu>.json``
(next to a cost model ``gpu_bench`` writes there; ``SchedulePlan.load`` reads it).

    python3 -m bench.profile_layer [--tokens 128] [--layers 6] [--set FIELD=VALUE]
    python3 -m bench.profile_layer --plan --tokens 64 128 256 512 [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    GPU_SHAPE,
    RESULTS_DIR,
    SequentialUbatches,
    add_config_overrides,
    calibrate_spin,
    capture_step,
    config_overrides,
    decode_inputs,
    free_memory,
    gpu_env,
    host_env,
    make_config,
    make_model,
    median,
    set_backend,
    slug,
    step_fn,
    time_cuda,
    time_device,
    transfer_payloads,
)
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.planner import (
    LayerStretches,
    StretchProfile,
    best_placement,
    estimate,
    plan_schedule,
    simulate,
)
from coop_dbo.schedule import Placement, SchedulePolicy
from coop_dbo.split import split_tensors

# The one-microbatch graphs ``profile_decoder`` measures: every movable piece after the
# dispatch, then each piece alone before it.
VARIANTS: dict[str, Placement] = {
    "none": Placement(),
    "keys": Placement(keys_before=True),
    "values": Placement(values_before=True),
    "shared": Placement(shared_before=True),
}
REPLAY_GAP_S = 0.003  # host sleep between profiled replays: splits their kernels apart


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
    profile of one microbatch shows where its compute stretches begin and end. On a CPU
    dry run (eager, every op done when it returns) each mark is a host timestamp instead,
    kept in ``marks`` as a zero-length "spin" event of the profiler's form."""

    def __init__(self, num_experts: int, *, device: torch.device | None = None,
                 **kw: Any) -> None:
        super().__init__(num_experts, **kw)
        self.host_marks = device is not None and device.type != "cuda"
        self.marks: list[dict[str, Any]] = []

    def _mark(self) -> None:
        if self.host_marks:
            self.marks.append({"name": "spin", "ts": time.perf_counter() * 1e6, "dur": 0.0})
        else:
            torch.cuda._sleep(1)

    def dispatch_transfer(self, packed: Any) -> Any:
        self._mark()
        out = super().dispatch_transfer(packed)
        self._mark()
        return out

    def combine_transfer(self, packed: Any) -> Any:
        self._mark()
        out = super().combine_transfer(packed)
        self._mark()
        return out


def _stretches_of(kernels: Sequence[dict[str, Any]], num_layers: int
                  ) -> tuple[list[float], list[float], float]:
    """The stretches of one replay of a ``_MarkedBackend`` graph from its kernels (sorted
    by start, us): ``(before each dispatch, experts' stretch per layer, after the last
    combine)``. Four marks per layer: before / after the dispatch, before / after the
    combine. Stretch "A" of layer l runs from the end of layer l-1's combine (or the first
    kernel) to its dispatch; stretch "E" from the end of its dispatch to its combine."""
    marks = [k for k in kernels if "spin" in k["name"].lower()]
    if len(marks) != 4 * num_layers:
        raise RuntimeError(f"a marked replay of {num_layers} layers has {len(marks)} marker "
                           f"kernels, expected {4 * num_layers}: is the backend the "
                           "_MarkedBackend, and nothing else spinning?")
    t0, t1 = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    before: list[float] = []
    experts: list[float] = []
    prev_end = t0
    for i in range(0, len(marks), 4):
        d0, d1, c0, c1 = marks[i:i + 4]
        before.append(d0["ts"] - prev_end)
        experts.append(c0["ts"] - (d1["ts"] + d1["dur"]))
        prev_end = c1["ts"] + c1["dur"]
    return before, experts, t1 - prev_end


def _split_replays(kernels: Sequence[dict[str, Any]], gap_us: float
                   ) -> list[list[dict[str, Any]]]:
    """Kernels (sorted by start) cut into replays wherever the GPU idled ``gap_us`` or
    more (the host sleeps between profiled replays; a replay's own kernels follow each
    other within microseconds)."""
    runs: list[list[dict[str, Any]]] = []
    end = None
    for k in kernels:
        if end is None or k["ts"] - end >= gap_us:
            runs.append([])
        runs[-1].append(k)
        end = k["ts"] + k["dur"] if end is None else max(end, k["ts"] + k["dur"])
    return runs


def profile_from_variants(tokens: int,
                          variants: dict[str, tuple[list[float], list[float], float]]
                          ) -> StretchProfile:
    """The ``StretchProfile`` of stretches measured with each ``VARIANTS`` placement.

    ``variants[name] = (before, experts, tail)`` per layer (us) of one forward. A piece
    moved before the dispatch lengthens ``before`` and shortens ``experts`` by its time:
    each piece is the mean of the two differences to ``"none"`` (at least 0). A forward's
    last layer gathers nothing, so the last layer's gathers (layer 0's, for a next decode
    step) and layer 0's own gather in a first step (``first_gather_us``, inside layer 0's
    ``before``) are the mean gathers of the other layers: every layer's cache has the same
    shape.
    """
    missing = set(VARIANTS) - set(variants)
    if missing:
        raise ValueError(f"profile_from_variants needs the stretches of {sorted(missing)}.")
    b0, e0, tail = variants["none"]
    num_layers = len(b0)
    if num_layers < 2:
        raise ValueError("profiling the gathers needs a model of 2 layers or more (a "
                         "forward's last layer gathers no next layer's cache).")

    def moved(name: str, layer: int) -> float:
        b, e, _ = variants[name]
        return max(0.0, ((b[layer] - b0[layer]) + (e0[layer] - e[layer])) / 2)

    shared = [moved("shared", i) for i in range(num_layers)]
    keys = [moved("keys", i) for i in range(num_layers - 1)]
    values = [moved("values", i) for i in range(num_layers - 1)]
    keys.append(statistics.fmean(keys))
    values.append(statistics.fmean(values))
    first_gather = keys[-1] + values[-1]
    layers = []
    for i in range(num_layers):
        gathers = keys[i] + values[i] if i < num_layers - 1 else 0.0
        layers.append(LayerStretches(
            before_us=max(0.0, b0[i] - (first_gather if i == 0 else 0.0)),
            shared_us=shared[i], keys_us=keys[i], values_us=values[i],
            experts_us=max(0.0, e0[i] - shared[i] - gathers)))
    return StretchProfile(tokens, tuple(layers), tail_us=max(0.0, tail),
                          first_gather_us=first_gather)


def profile_decoder(model: MoEDecoder, tokens_per_ubatch: int, dev: torch.device, *,
                    repeats: int = 3) -> StretchProfile:
    """GPU time of every piece of one microbatch of ``tokens_per_ubatch`` tokens (CUDA; on
    a CPU device, a dry run: host time of eager steps, the same code path).

    One graph of one microbatch per ``VARIANTS`` placement, with marker kernels around
    each transfer and no transfer time; the variants' replays run ``repeats`` times in
    one profiler session, and each stretch is the median over the repeats. The model's
    backend and schedule are restored afterwards. Transfers are not measured here: add
    them with ``StretchProfile.with_comm``.
    """
    cfg, T = model.cfg, tokens_per_ubatch
    backend, schedule = model.backend, model.schedule
    marked = _MarkedBackend(cfg.num_experts, device=dev, num_max_tokens_per_rank=T)
    set_backend(model, marked)
    graphs = {}
    names = list(VARIANTS)
    try:
        for name, placement in VARIANTS.items():
            model.set_schedule(SchedulePolicy(planned=((1, placement),)))
            graphs[name] = capture_step(
                model, lambda n: decode_inputs(cfg, n, seed=1, device=dev), T, 1, dev)
        for g in graphs.values():
            g.graphs[T].replay()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    for g in graphs.values():
                        g.graphs[T].replay()
                        torch.cuda.synchronize()
                        time.sleep(REPLAY_GAP_S)
            replays = _split_replays(sorted(_kernels(prof), key=lambda k: k["ts"]),
                                     REPLAY_GAP_S * 1e6 / 3)
        else:  # CPU dry run: the marks are host timestamps of eager "replays"
            replays = [_host_marked_replay(graphs[name].graphs[T].replay, marked)
                       for _ in range(repeats) for name in names]
    finally:
        set_backend(model, backend)
        model.set_schedule(schedule)
        del graphs
    if len(replays) != repeats * len(names):
        raise RuntimeError(f"the profile shows {len(replays)} replays, expected "
                           f"{repeats * len(names)}: the GPU idled inside a replay, or the "
                           "profiler dropped kernels. Run again on an idle GPU.")
    per: dict[str, list[tuple[list[float], list[float], float]]] = defaultdict(list)
    for i, kernels in enumerate(replays):
        per[names[i % len(names)]].append(_stretches_of(kernels, cfg.num_layers))
    variants = {}
    for name, runs in per.items():
        variants[name] = ([median([r[0][i] for r in runs]) for i in range(cfg.num_layers)],
                          [median([r[1][i] for r in runs]) for i in range(cfg.num_layers)],
                          median([r[2] for r in runs]))
    return profile_from_variants(T, variants)


def _host_marked_replay(replay: Any, marked: _MarkedBackend) -> list[dict[str, Any]]:
    """One eager "replay" on the CPU as ``_stretches_of`` reads a profiled one: a start
    event, the marks ``marked`` records meanwhile, an end event (us)."""
    marked.marks = []
    t0 = time.perf_counter() * 1e6
    replay()
    t1 = time.perf_counter() * 1e6
    return ([{"name": "start", "ts": t0, "dur": 0.0}] + marked.marks
            + [{"name": "end", "ts": t1, "dur": 0.0}])


def profile_with_comm(model: MoEDecoder, tokens_per_ubatch: int, dev: torch.device, *,
                      repeats: int = 3, ratio: float = 1.0
                      ) -> tuple[StretchProfile, SingleProcessBackend]:
    """``(profile, comm backend)`` of microbatches of ``tokens_per_ubatch`` tokens at
    comm = ``ratio`` x compute: the stretches (``profile_decoder``), a copy-engine
    backend whose dispatch and combine each take ``ratio`` x half a layer's compute, and
    those transfers timed alone (``_transfer_us``) set into the profile."""
    T = tokens_per_ubatch
    prof = profile_decoder(model, T, dev, repeats=repeats)
    c_us = prof.compute_us() / model.cfg.num_layers
    comm = SingleProcessBackend(model.cfg.num_experts, dispatch_us=ratio * c_us / 2,
                                combine_us=ratio * c_us / 2, num_max_tokens_per_rank=T,
                                transfer="copy_engine")
    d_us, cb_us = _transfer_us(comm, model.cfg, T, dev)
    return prof.with_comm(d_us, cb_us), comm


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
    before, experts, tail = _stretches_of(sorted(_kernels(prof), key=lambda k: k["ts"]),
                                          cfg.num_layers)
    print("one microbatch graph, compute between transfers (us): before each dispatch "
          + " ".join(f"{x:.0f}" for x in before) + "; experts " + " ".join(
              f"{x:.0f}" for x in experts) + f"; after the last combine {tail:.0f}")
    return before, experts, tail


def _profile(T: int, L: int, top: int, config: dict[str, Any]) -> None:
    """The three profiles of the module docstring at ``T`` tokens per microbatch."""
    dev = torch.device("cuda")
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
        for name, durs in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
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



def _transfer_us(backend: SingleProcessBackend, cfg: MoEConfig, T: int, dev: torch.device,
                 calls: int = 8) -> tuple[float, float]:
    """``(dispatch, combine)``: GPU us of one whole transfer phase of ``backend`` for a
    microbatch of ``T`` tokens (its receive-buffer copy and the simulated transfer), each
    timed alone, what the comm stream runs per layer."""
    packed, packed_back = transfer_payloads(backend, cfg, T, dev)

    def dispatch() -> None:
        for _ in range(calls):
            backend.dispatch_transfer(packed)

    def combine() -> None:
        for _ in range(calls):
            backend.combine_transfer(packed_back)
    return (median(time_device(dispatch, 10, dev=dev)) * 1e3 / calls,
            median(time_device(combine, 10, dev=dev)) * 1e3 / calls)


def capture_placed(model: MoEDecoder, T: int, placement: Placement, backend: Any,
                   dev: torch.device, num_steps: int = 1, num_ubatches: int = 2,
                   num_parts: int = 2) -> Any:
    """A graph (``capture_step``) of a batch of ``num_parts`` x ``T`` tokens in
    ``num_ubatches`` (= ``num_parts``) microbatches under DBO (1: the ``num_parts``
    microbatches one after the other, no overlap, ``SequentialUbatches``), every
    microbatch at ``placement``, with ``backend``'s transfers, over ``num_steps`` decode
    steps (``step_fn``), inputs ``decode_inputs(seed=1)``. The model's schedule and
    backend are restored; the graph keeps what it was captured with."""
    if num_ubatches not in (1, num_parts):
        raise ValueError(f"num_ubatches must be 1 or num_parts={num_parts}, got "
                         f"{num_ubatches}.")
    backend_before, schedule = model.backend, model.schedule
    model.set_schedule(SchedulePolicy(planned=((1, placement),)))
    set_backend(model, backend)
    try:
        fn = step_fn(model, num_steps)
        return capture_step(fn if num_ubatches != 1 else SequentialUbatches(fn, num_parts),
                            lambda n: decode_inputs(model.cfg, n, seed=1, device=dev,
                                                    num_steps=num_steps),
                            num_parts * T, num_ubatches, dev)
    finally:
        set_backend(model, backend_before)
        model.set_schedule(schedule)


def _dbo_graph(model: MoEDecoder, T: int, placement: Placement,
               backend: SingleProcessBackend, dev: torch.device) -> tuple[float, torch.Tensor]:
    """``(us, logits)``: the median replay of a DBO graph of two microbatches of ``T``
    tokens (``capture_placed``) and its output."""
    g = capture_placed(model, T, placement, backend, dev)
    us = median(time_device(g.graphs[2 * T].replay, 20, dev=dev)) * 1e3
    return us, g.graphs[2 * T].replay().clone()


def plan(tokens: Sequence[int], num_layers: int, config: dict[str, Any], out_dir: Path,
         repeats: int = 3, dev: torch.device | None = None) -> Path:
    """``--plan``: profile, plan and check each size; write the plan (see the module
    docstring). Returns the calibration file's path. ``dev``: the CUDA device (default
    the current one)."""
    if dev is None:
        if not torch.cuda.is_available():
            raise SystemExit("bench.profile_layer --plan measures GPU time: run it on a "
                             "CUDA host (the planner itself, coop_dbo.planner, needs no GPU).")
        dev = torch.device("cuda", torch.cuda.current_device())
    tokens = sorted(set(tokens))
    shape = {**GPU_SHAPE, "num_layers": num_layers, **config}
    cfg = make_config(shape, max_batch=2 * max(tokens))
    model = make_model(cfg, SingleProcessBackend(cfg.num_experts), config,
                       dtype=torch.bfloat16, device=dev)
    calibrate_spin(dev)
    default = model.schedule
    env = {**host_env(), **gpu_env(dev)}
    profiles: dict[int, StretchProfile] = {}
    measured: dict[str, Any] = {}
    print(f"planning the schedule of {num_layers} layers on {env['gpu']}, comm = compute "
          "(copy-engine transfer), one decode step per graph; times: DBO graph of two "
          "microbatches, ms, predicted / measured")
    print(f"{'tokens':>6} {'c us':>6} {'d/c us':>11}  {'default placement':<34} "
          f"{'pred':>6} {'meas':>6}  {'planned placement':<34} {'pred':>6} {'meas':>6} "
          f"{'gain meas':>9} {'share':>5} {'equal':>5} {'s':>4}")
    for T in tokens:
        t_start = time.perf_counter()
        with torch.no_grad():
            prof, comm = profile_with_comm(model, T, dev, repeats=repeats)
            c_us = prof.compute_us() / num_layers
            d_us, cb_us = prof.layers[0].dispatch_us, prof.layers[0].combine_us
            profiles[T] = prof
            fb = default.placement(T)
            best, best_us, times = best_placement(prof, prefer=fb)
            t_fb, out_fb = _dbo_graph(model, T, fb, comm, dev)
            if best == fb:
                t_best, out_best = t_fb, out_fb
            else:
                t_best, out_best = _dbo_graph(model, T, best, comm, dev)
        share = estimate(prof, best).share_hidden
        equal = bool(torch.equal(out_fb, out_best))
        seconds = time.perf_counter() - t_start
        measured[str(T)] = {"fallback_measured_us": t_fb, "planned_measured_us": t_best,
                            "fallback_predicted_us": times[fb], "planned_predicted_us": best_us,
                            "c_us": c_us, "dispatch_us": d_us, "combine_us": cb_us,
                            "logits_equal": equal, "seconds": seconds}
        print(f"{T:>6} {c_us:6.0f} {d_us:5.0f}/{cb_us:<5.0f}  {str(fb):<34} "
              f"{times[fb] / 1e3:6.3f} {t_fb / 1e3:6.3f}  {str(best):<34} {best_us / 1e3:6.3f} "
              f"{t_best / 1e3:6.3f} {t_fb / t_best:8.3f}x "
              f"{'-' if share is None else f'{share:.0%}':>5} {'yes' if equal else 'NO':>5} "
              f"{seconds:4.0f}")
        del out_fb, out_best
        free_memory(dev)
    model_shape = {**{k: v for k, v in shape.items() if k != "max_batch"}, "dtype": "bfloat16"}
    result = plan_schedule(profiles, fallback=dataclasses.replace(default, planned=()),
                           gpu=str(env["gpu"]), comm="sim-ratio-1", model_shape=model_shape,
                           meta={"source": "bench.profile_layer --plan", "date": env["date"],
                                 "command": env["command"], "transfer": "copy_engine",
                                 "measured": measured})
    path = result.save(Path(out_dir) / f"calibration-{slug(str(env['gpu']))}.json")
    print(f"plan written to {path} (comm 'sim-ratio-1'); "
          "MoEDecoder(..., schedule=SchedulePlan.load(path, 'sim-ratio-1').policy())")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python3 -m bench.profile_layer``: prints the profiles, or with ``--plan`` plans
    the schedule (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128],
                   help="tokens per microbatch (several: each in turn)")
    p.add_argument("--layers", type=int, default=GPU_SHAPE["num_layers"])
    p.add_argument("--top", type=int, default=25, help="kernel names listed per profile")
    p.add_argument("--plan", action="store_true",
                   help="plan the schedule at each size and write it to the calibration file")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="--plan: folder of calibration-<gpu>.json (default bench/results)")
    p.add_argument("--repeats", type=int, default=3,
                   help="--plan: profiled replays of each placement (median)")
    add_config_overrides(p)
    a = p.parse_args(argv)
    config = config_overrides(p, a.set)
    if any(t < 1 for t in a.tokens):
        p.error(f"--tokens must be >= 1, got {a.tokens}")
    if a.plan:
        if a.layers < 2:
            p.error("--plan needs --layers 2 or more (the gathers are profiled between "
                    "layers)")
        plan(a.tokens, a.layers, config, a.out, a.repeats)
        return
    for T in a.tokens:
        _profile(T, a.layers, a.top, config)


if __name__ == "__main__":
    main()
