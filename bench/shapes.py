"""Shapes stage of the 1-GPU bench: plan the schedule at start-up for several model shapes,
then measure the planned and the fallback DBO graph against the step without overlap.

The reference decoder (``coop_dbo.models.MoEDecoder``, bf16) with the
``SingleProcessBackend`` (copy-engine transfer: a pinned host-to-device copy, no SM held)
at comm = compute, for the named shapes of ``bench.common.MODEL_SHAPES``:

``bench``
    ``GPU_SHAPE`` as the other stages run it (6 layers, hidden 2048, 16 experts top-2).
``deepseek-v3-like``
    DeepSeek-V3's widths (hidden 7168, 56 heads x 128, expert and shared-expert MLP 2048,
    top-8) with 32 routed experts instead of 256 and 4 layers instead of 61: the weights
    then take about 13 GB of one 141 GB GPU and the stage stays quick. Fewer experts
    with the same top-k route more rows to each expert (the expert matmuls are less
    memory bound than in the real model); its attention is plain multi-head attention
    (the real model's is MLA), vocabulary 8192.
``qwen3-moe-like``
    Qwen3-MoE's widths (hidden 2048, 32 heads x 128, 64 experts top-8, expert MLP 768),
    6 layers. Qwen3-MoE has no shared expert; the decoder always has one and a width of
    0 fails when its weights are made (a scale of width ** -0.5), so it has the smallest
    that works, 1 (a few tiny kernels).
``held-out``
    Hidden 2560, 20 heads x 128, 48 experts top-6, expert MLP 896, shared expert 1792,
    6 layers. Fixed before any tuning, and never to be tuned for: no default, threshold
    or heuristic of the library may be chosen by looking at this shape's results. It
    checks that the planner works on a shape nobody fitted it to.

Every shape has vocabulary 8192 and a KV cache of 32 positions (a decode step's cost is
in the layers; the LM head and attention span are not what DBO overlaps).

Per shape, at start-up (timed: ``planning_seconds``, target under 30 s on one GPU): for
each size T (tokens per microbatch) the stretches of one microbatch
(``bench.profile_layer.profile_with_comm``: one graph per movable-piece variant,
profiled; the transfers of comm = compute timed alone), then the planner's search
(``coop_dbo.planner.best_placement``) for one and for K decode steps per graph. Then per
(T, K), CUDA graphs of a batch of 2T tokens (two microbatches of T), timed in
alternating blocks (medians):

    no-DBO graph     the two microbatches one after the other, with their transfers
                     (each waits for its own): the same microbatches, no overlap
    DBO graph        the planned placement;  DBO fallback: the threshold placement
                     (``SchedulePolicy()``), measured once more when it differs
    T_compute        the no-DBO graph without transfer time
    T_comm           the DBO step's transfers alone (2 x layers x K of each)
    T_ideal = max(T_compute, T_comm); speedup = T_noDBO / T_DBO; ideal = T_noDBO / T_ideal
    share hidden = (T_noDBO - T_DBO) / (T_noDBO - T_ideal)   (``bench.common.share_hidden``)
    predicted        the planner's simulated DBO step; error = predicted / measured - 1

The no-DBO step here is the split batch without overlap, so the split penalty (the
weights read once per microbatch) is in both times and the share measures the overlap
alone; ``bench.gpu_bench`` compares against the unsplit batch. ``diff_vs_nodbo``: how
far the planned DBO graph's output is from the no-DBO graph's (the largest absolute
logit difference for K = 1, the share of decoded tokens that differ for K > 1), next to
``replay_spread``, the same between two replays of the same DBO graph: with top-k > 2
the experts' outputs are summed per token by atomic adds, whose order varies from replay
to replay on a GPU, so bf16 outputs are not bit-stable even without DBO (the CPU tests
check that every placement gives bit-identical logits).

    python3 -m bench.shapes [--shapes NAME ...] [--tokens T ...] [--steps K ...]
                            [--quick] [--out DIR] [--dry-run-cpu]

Writes ``bench-shapes-<stamp>.json`` into ``--out`` and prints the table last
(``bench.report.shapes_table``; ``python3 -m bench.report DIR --markdown`` prints it as
markdown). ``--dry-run-cpu`` runs the whole code path on the CPU with tiny stand-ins of
each shape (eager steps in place of graphs, host time; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    CPU_SHAPE,
    MODEL_SHAPES,
    RESULTS_DIR,
    alternate,
    calibrate_spin,
    free_memory,
    gpu_env,
    host_env,
    make_config,
    make_console,
    make_model,
    median,
    share_hidden,
    stamp,
    transfer_step,
    write_json,
)
from bench.profile_layer import capture_placed, profile_with_comm
from bench.report import shapes_table
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.models import MoEDecoder
from coop_dbo.planner import StretchProfile, best_placement, estimate
from coop_dbo.schedule import Placement

TOKENS = (32, 64, 128, 256, 512)
STEPS = (1, 4)
QUICK_TOKENS = (64, 256)
DRY_TOKENS = (4, 8)  # --dry-run-cpu
DRY_STEPS = (1, 2)
TIMING = (2, 8)  # (blocks, calls per block) of each graph: 16 samples, median
QUICK_TIMING = (2, 5)
PROFILE_REPEATS = 3  # profiled replays of each movable-piece variant (median)
PLANNING_TARGET_S = 30.0  # start-up planning of one shape on one GPU, all sizes


def dry_shape(shape: dict[str, int]) -> dict[str, int]:
    """A tiny CPU stand-in of ``shape`` for ``--dry-run-cpu``: ``CPU_SHAPE``'s widths and
    2 layers, with the shape's top-k and a quarter of its experts (at least top-k)."""
    return {**{k: v for k, v in CPU_SHAPE.items() if k != "max_batch"}, "num_layers": 2,
            "top_k": shape["top_k"],
            "num_experts": max(shape["top_k"], shape["num_experts"] // 4)}


def placement_label(p: Placement) -> str:
    """The pieces ``p`` runs before the dispatch, e.g. ``"values+shared"``, or ``"none"``."""
    return "+".join(p.before()) or "none"


@dataclass
class SizePlan:
    """What start-up planning found for microbatches of ``profile.tokens_per_ubatch``
    tokens: the profile (comm included), the comm backend it was measured with, and per
    decode steps per graph ``(planned, its predicted us, fallback, its predicted us)``."""

    profile: StretchProfile
    comm: SingleProcessBackend
    placements: dict[int, tuple[Placement, float, Placement, float]]


def plan_sizes(model: MoEDecoder, tokens: Sequence[int], steps: Sequence[int],
               dev: torch.device, repeats: int = PROFILE_REPEATS) -> dict[int, SizePlan]:
    """Profile each size and search the placements for each decode-step count (the
    fallback: the model's threshold policy)."""
    plans = {}
    for T in tokens:
        prof, comm = profile_with_comm(model, T, dev, repeats=repeats)
        fb = model.schedule.fallback_placement(T)
        placements = {}
        for K in steps:
            best, best_us, times = best_placement(prof, num_steps=K, prefer=fb)
            placements[K] = (best, best_us, fb, times[fb])
        plans[T] = SizePlan(prof, comm, placements)
    return plans


def output_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far two outputs of the same microbatches are apart: the largest absolute
    difference of logits, or the share of decoded tokens that differ."""
    if a.is_floating_point():
        return float((a.float() - b.float()).abs().max())
    return float((a != b).float().mean())


def measure(model: MoEDecoder, plan: SizePlan, num_steps: int, dev: torch.device,
            timing: tuple[int, int]) -> dict[str, Any]:
    """The graphs of one (size, decode steps) point, timed in alternating blocks; one row
    of the table (times in ms)."""
    cfg, prof, K = model.cfg, plan.profile, num_steps
    T = prof.tokens_per_ubatch
    best, best_us, fb, fb_us = plan.placements[K]
    zero = SingleProcessBackend(cfg.num_experts, num_max_tokens_per_rank=T)
    graphs = {"compute": capture_placed(model, T, fb, zero, dev, K, num_ubatches=1),
              "nodbo": capture_placed(model, T, fb, plan.comm, dev, K, num_ubatches=1),
              "dbo_fallback": capture_placed(model, T, fb, plan.comm, dev, K)}
    graphs["dbo"] = graphs["dbo_fallback"] if best == fb else capture_placed(
        model, T, best, plan.comm, dev, K)
    fns: dict[str, Callable[[], Any]] = {
        name: g.graphs[2 * T].replay for name, g in graphs.items()
        if name != "dbo" or best != fb}
    fns["comm"] = transfer_step(plan.comm, cfg, T, 2 * cfg.num_layers * K, dev)
    samples = alternate(fns, timing[0], timing[1], dev)
    ms = {name: median(v["all"]) for name, v in samples.items()}
    ms.setdefault("dbo", ms["dbo_fallback"])
    outs = {name: graphs[name].graphs[2 * T].replay().clone()
            for name in ("nodbo", "dbo_fallback", "dbo")}
    again = graphs["dbo"].graphs[2 * T].replay().clone()
    diffs = {"diff_vs_nodbo": output_diff(outs["dbo"], outs["nodbo"]),
             "diff_fallback_vs_nodbo": output_diff(outs["dbo_fallback"], outs["nodbo"]),
             "replay_spread": output_diff(again, outs["dbo"])}
    del graphs, fns, outs, again
    est = estimate(prof, best, num_steps=K)
    t_ideal = max(ms["compute"], ms["comm"])
    return {
        "tokens_per_ubatch": T, "decode_steps": K, "batch": 2 * T,
        "planned_placement": list(best.before()), "fallback_placement": list(fb.before()),
        "same_placement": best == fb,
        "c_layer_us": prof.compute_us() / cfg.num_layers,
        "dispatch_us": prof.layers[0].dispatch_us, "combine_us": prof.layers[0].combine_us,
        "nodbo_graph_ms": ms["nodbo"], "dbo_graph_ms": ms["dbo"],
        "dbo_fallback_graph_ms": ms["dbo_fallback"], "t_compute_ms": ms["compute"],
        "t_comm_ms": ms["comm"], "t_ideal_ms": t_ideal,
        "speedup": ms["nodbo"] / ms["dbo"], "ideal_speedup": ms["nodbo"] / t_ideal,
        "speedup_fallback": ms["nodbo"] / ms["dbo_fallback"],
        "planned_vs_fallback": ms["dbo_fallback"] / ms["dbo"],
        "share_hidden": share_hidden(ms["nodbo"], ms["dbo"], t_ideal),
        "share_hidden_fallback": share_hidden(ms["nodbo"], ms["dbo_fallback"], t_ideal),
        "predicted_dbo_ms": best_us / 1e3, "predicted_fallback_ms": fb_us / 1e3,
        "predicted_nodbo_ms": est.serial_us / 1e3, "predicted_ideal_ms": est.ideal_us / 1e3,
        "prediction_error": best_us / 1e3 / ms["dbo"] - 1,
        "fallback_prediction_error": fb_us / 1e3 / ms["dbo_fallback"] - 1,
        "outputs": "logits" if K == 1 else "tokens", **diffs}


def run_shape(name: str, shape: dict[str, int], tokens: Sequence[int], steps: Sequence[int],
              dev: torch.device, timing: tuple[int, int],
              log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the shape's model, plan, measure every point, free the GPU's memory.
    Returns ``(the shape's summary, its rows)``."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    cfg = make_config(shape, max_batch=2 * max(tokens))
    model = make_model(cfg, SingleProcessBackend(cfg.num_experts), dtype=dtype, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    plans = plan_sizes(model, tokens, steps, dev)
    t2 = time.perf_counter()
    log(f"{name}: model built in {t1 - t0:.1f} s, planned {len(tokens)} sizes x "
        f"{len(steps)} decode-step counts in {t2 - t1:.1f} s (target: under "
        f"{PLANNING_TARGET_S:.0f} s)")
    rows = []
    for T in tokens:
        for K in steps:
            row = {"shape": name, **measure(model, plans[T], K, dev, timing)}
            rows.append(row)
            log(f"{name} T={T} K={K}: planned {placement_label(plans[T].placements[K][0])}"
                f" {row['dbo_graph_ms']:.3f} ms (predicted {row['predicted_dbo_ms']:.3f}), "
                f"fallback {row['dbo_fallback_graph_ms']:.3f} ms, no-DBO "
                f"{row['nodbo_graph_ms']:.3f} ms, vs no-DBO {row['diff_vs_nodbo']:.2g} (same "
                f"graph twice {row['replay_spread']:.2g})")
        free_memory(dev)
    t3 = time.perf_counter()
    summary = {"shape": {**shape, "max_batch": cfg.max_batch,
                         "dtype": str(dtype).split(".")[-1]},
               "build_seconds": t1 - t0, "planning_seconds": t2 - t1,
               "measure_seconds": t3 - t2}
    del model, plans
    free_memory(dev)
    return summary, rows


def run(out_dir: Path = RESULTS_DIR, shapes: Sequence[str] | None = None,
        tokens: Sequence[int] | None = None, steps: Sequence[int] | None = None,
        quick: bool = False, dry_run_cpu: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole stage; returns the result (what the JSON holds). Defaults: every shape,
    ``TOKENS`` (``QUICK_TOKENS`` with ``quick``, ``DRY_TOKENS`` on a dry run), ``STEPS``
    (``DRY_STEPS``)."""
    names = list(shapes or MODEL_SHAPES)
    unknown = [n for n in names if n not in MODEL_SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}: the shapes are {list(MODEL_SHAPES)}.")
    if not dry_run_cpu and not torch.cuda.is_available():
        raise RuntimeError("bench.shapes measures GPU time: run it on a CUDA host, or "
                           "--dry-run-cpu to check the code path on the CPU.")
    tokens = sorted(set(tokens or (DRY_TOKENS if dry_run_cpu else QUICK_TOKENS if quick
                                   else TOKENS)))
    steps = sorted(set(steps or (DRY_STEPS if dry_run_cpu else STEPS)))
    if min(tokens) < 1 or min(steps) < 1:
        raise ValueError(f"tokens and steps must be >= 1, got {tokens} and {steps}.")
    timing = QUICK_TIMING if quick or dry_run_cpu else TIMING
    dev = torch.device("cpu") if dry_run_cpu else torch.device(
        "cuda", torch.cuda.current_device())
    env = {**host_env(), **gpu_env(dev)}
    log(f"shapes stage on {env['gpu']}: {names}, tokens per microbatch {tokens}, decode "
        f"steps per graph {steps}")
    calibrate_spin(dev)
    summaries: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name in names:
            shape = dry_shape(MODEL_SHAPES[name]) if dry_run_cpu else dict(MODEL_SHAPES[name])
            summaries[name], shape_rows = run_shape(name, shape, tokens, steps, dev, timing,
                                                    log)
            rows += shape_rows
    return {"env": env, "tokens": tokens, "steps": steps, "transfer": "copy_engine",
            "ratio": 1.0, "timing": {"blocks": timing[0], "per_block": timing[1]},
            "shapes": summaries, "rows": rows,
            "formulas": {
                "nodbo_graph_ms": "the two microbatches one after the other, with comm",
                "t_ideal_ms": "max(T_compute, T_comm)",
                "share_hidden": "(T_nodbo - T_dbo) / (T_nodbo - T_ideal); null when "
                                "T_nodbo - T_ideal < 2% of T_nodbo",
                "prediction_error": "predicted DBO step / measured - 1"}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python3 -m bench.shapes``: run the stage, write the JSON, print the table last."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(MODEL_SHAPES), metavar="NAME",
                   help=f"shapes to run (default: all of {list(MODEL_SHAPES)})")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per microbatch")
    p.add_argument("--steps", type=int, nargs="+", help="decode steps per graph")
    p.add_argument("--quick", action="store_true",
                   help=f"tokens {list(QUICK_TOKENS)} and fewer timed replays")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="the code path on the CPU with tiny shapes (no GPU numbers)")
    a = p.parse_args(argv)
    for opt, values in (("--tokens", a.tokens), ("--steps", a.steps)):
        if values and min(values) < 1:
            p.error(f"{opt} must be >= 1, got {values}")
    console = make_console()
    result = run(a.out, a.shapes, a.tokens, a.steps, a.quick, a.dry_run_cpu,
                 log=console.log)
    path = write_json(a.out / f"bench-shapes-{stamp()}.json", result)
    result["path"] = str(path)
    console.print(f"wrote {path}")
    console.print(shapes_table(result))
    return result


if __name__ == "__main__":
    main()
