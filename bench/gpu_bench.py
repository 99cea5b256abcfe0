"""1-GPU stage of ``make bench``: the DBO sweep with simulated communication.

The reference MoE decoder (``bench.common.GPU_SHAPE``, bf16) runs with the
``SingleProcessBackend`` in static mode (``num_max_tokens_per_rank`` = the tokens each
step routes, so the step can be captured). Its dispatch and combine spend a set time on
the comm stream, by default in a pinned host-to-device copy (``--transfer copy_engine``):
a DMA engine moves bytes over PCIe into GPU memory and no SM is held, as when a NIC
writes an RDMA transfer into GPU memory. ``--transfer spin`` spends it in a kernel that
spins on one SM instead; measured on H100 that SM costs the DBO graph about 10 points of
share hidden at comm = compute (bench/RESULTS.md). The time of each transfer phase (its
receive-buffer copies included) is timed alone and corrected to the requested value.

Sweep: tokens per microbatch T in (32, 64, 128, 256, 512) x comm/compute ratio r in
(0.25, 0.5, 1, 2, 4); each step is a batch of 2T tokens (two microbatches of T).

Per T, with zero comm time:
    t_ub        graph of ONE microbatch of T tokens
    c           = t_ub / layers: compute per layer per microbatch
    T_compute   graph of the whole batch (2T), no DBO: total compute of the no-DBO step
Per (T, r): comm per layer per microbatch = r * c, half in dispatch, half in combine:
    DBO backend (microbatch of T):    dispatch_us = combine_us = r * c / 2
    no-DBO backend (batch of 2T):     dispatch_us = combine_us = r * c
    (the step moves the same data either way, so the total comm time is the same:
    T_comm = layers * 2 * r * c, measured by timing the transfer phases alone; the
    requested times are corrected so the measured ones match, see _comm_backends)
    T_ideal = max(T_compute, T_comm): the no-DBO step with its communication fully hidden
    speedup = T_nodbo / T_dbo,  ideal speedup = T_nodbo / T_ideal
    share hidden = (T_nodbo - T_dbo) / (T_nodbo - T_ideal)
Cross-check without the transfers timed alone (the copy engine's speed differs between
contexts by a few percent, and the share moves by about T_comm / T_compute times that):
the no-DBO graph runs its transfers serially (the compute stream waits for each), so the
comm it had is T_nodbo - T_compute, and
    share hidden (graphs) = (T_nodbo - T_dbo) / (T_nodbo - max(T_compute, T_nodbo - T_compute))
Variants: no-DBO graph (DBOGraphRunner num_ubatches=1), greenlet DBO graph
(num_ubatches=2), no-DBO eager, greenlet DBO eager, thread DBO eager (BASELINE). GPU times
are medians of CUDA-event timed calls; the two graphs are timed in alternating blocks,
and the blocks are split in two halves A and B: the cost model is calibrated on A and
checked on B (so "DBO with cost model" is judged on data it was not fitted to).

``--steps K`` (K > 1): each graph runs ``MoEDecoder.decode`` over K greedy decode steps
instead of one forward, so a microbatch starts its next step while the other one still
waits for its last combine, and the pipeline fills and drains once per K steps. Then
``c`` = t_ub / (layers x K), the comm is set per layer pass as above, and every time in
the rows is for the K steps. Graphs only: the eager, thread, host and trace runs are
skipped.

Also: host cost per yield with CUDA stream bookkeeping, host CPU time of an eager step
(unsplit / sequential microbatches / greenlet DBO / thread DBO) at one point, a Chrome
trace of one eager DBO step and one DBO graph replay, a PNG plot, and the calibration
file ``calibration-<gpu>.json`` (one profile per ratio, comm ``sim-ratio-<r>``).

    python3 -m bench.gpu_bench [--quick] [--out DIR] [--layers L] [--steps K]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import yield_cost
from bench.common import (
    COMM_TOLERANCE,
    CPU_SHAPE,
    GPU_SHAPE,
    RESULTS_DIR,
    add_config_overrides,
    alternate,
    calibrate_spin,
    capture_step,
    config_overrides,
    decode_inputs,
    explain,
    fit_cost_models,
    free_memory,
    gpu_env,
    host_env,
    host_times,
    make_config,
    make_model,
    median,
    open_speedup_plot,
    save_speedup_plot,
    set_backend,
    share_from_graphs,
    share_hidden,
    slug,
    stamp,
    step_fn,
    sync,
    time_device,
    trace_dbo_step,
    transfer_step,
    write_json,
)
from bench.thread_baseline import ThreadUBatchRunner
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.split import split_tensors

TOKENS = (32, 64, 128, 256, 512)
RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
QUICK_TOKENS = (32, 128)
QUICK_RATIOS = (0.5, 1.0, 2.0)
COMM_ATTEMPTS = 3  # tries per point while |comm DBO / T_comm - 1| > COMM_TOLERANCE
DRY_TOKENS = (4, 8)  # CPU dry run (no GPU): exercises the code path, measures nothing
HOST_POINT = (128, 1.0)  # (tokens per microbatch, ratio) of the host-time and trace runs

# How the simulated transfer spends its time: "copy_engine" (a pinned host-to-device
# copy, no SM; the default) or "spin" (a one-SM kernel). Set by --transfer.
TRANSFER = "copy_engine"


def _backend(cfg: MoEConfig, max_tokens: int, dispatch_us: float = 0.0,
             combine_us: float = 0.0) -> SingleProcessBackend:
    return SingleProcessBackend(cfg.num_experts, dispatch_us=dispatch_us,
                                combine_us=combine_us, num_max_tokens_per_rank=max_tokens,
                                transfer=TRANSFER)  # type: ignore[arg-type]


def _comm_ms(backend: SingleProcessBackend, cfg: MoEConfig, tokens: int, calls: int,
             iters: int, dev: torch.device) -> float:
    """Median GPU ms of ``_comm_fn``."""
    return median(time_device(transfer_step(backend, cfg, tokens, calls, dev), iters, dev=dev))


def _comm_backends(cfg: MoEConfig, T: int, r: float, c_us: float, L: int, dev: torch.device
                   ) -> tuple[float, SingleProcessBackend, SingleProcessBackend, float, float]:
    """The no-DBO and DBO backends of ratio ``r``: per microbatch and layer, dispatch and
    combine take ``r * c / 2`` each on the comm stream (the no-DBO step, one batch of 2T:
    ``r * c`` each; the same total). The simulated time is set so that the whole transfer
    phase (its receive-buffer copies included) takes that long: the spin is calibrated once
    per process and can drift (clocks), so each backend's transfers are timed alone and its
    ``dispatch_us`` corrected twice. Returns ``(dispatch_us of the DBO backend, b_nodbo,
    b_dbo, T_comm_ms, T_comm_dbo_ms)``."""
    def tuned(tokens: int, per_call_us: float, calls: int
              ) -> tuple[float, SingleProcessBackend, float]:
        us = per_call_us
        for attempt in range(3):
            b = _backend(cfg, tokens, us, us)
            t = _comm_ms(b, cfg, tokens, calls, 5, dev)
            if attempt == 2 or dev.type != "cuda":
                break
            us = max(0.0, us + (calls * 2 * per_call_us / 1e3 - t) * 1e3 / (2 * calls))
        return us, b, t

    d_us, b_dbo, t_comm_dbo = tuned(T, r * c_us / 2, 2 * L)
    _, b_nodbo, t_comm = tuned(2 * T, r * c_us, L)
    return d_us, b_nodbo, b_dbo, t_comm, t_comm_dbo


def _graph(model: MoEDecoder, cfg: MoEConfig, batch: int, num_ubatches: int, seed: int,
           dev: torch.device, num_steps: int = 1) -> Any:
    """``DBOGraphRunner`` of one step (or ``num_steps`` decode steps) of ``batch`` tokens
    (the model's current backend is baked into the graph); the eager stand-in on a CPU
    dry run."""
    return capture_step(step_fn(model, num_steps),
                        lambda size: decode_inputs(cfg, size, seed=seed, device=dev,
                                                   num_steps=num_steps),
                        batch, num_ubatches, dev)


@dataclass
class _Sweep:
    """What every point of one sweep shares: the model, its settings and where to write."""

    model: MoEDecoder
    cfg: MoEConfig
    dev: torch.device
    out_dir: Path
    gpu: str
    num_steps: int  # K: decode steps per graph
    blocks: int
    per_block: int
    eager_iters: int
    host_repeats: int
    graphs_only: bool
    threads: ThreadUBatchRunner
    log: Callable[[str], None]

    @property
    def layer_passes(self) -> int:
        """Layer passes per graph (layers x decode steps)."""
        return self.cfg.num_layers * self.num_steps


def _measure_point(sw: _Sweep, T: int, r: float, c_us: float) -> dict[str, Any]:
    """One attempt at a sweep point: the two backends, their graphs, and the graphs and
    the transfers alone timed in the same alternating blocks."""
    model, cfg, dev, LK, K = sw.model, sw.cfg, sw.dev, sw.layer_passes, sw.num_steps
    d_us, b_nodbo, b_dbo, _, _ = _comm_backends(cfg, T, r, c_us, LK, dev)
    set_backend(model, b_nodbo)
    g1 = _graph(model, cfg, 2 * T, 1, T, dev, K)
    set_backend(model, b_dbo)
    g2 = _graph(model, cfg, 2 * T, 2, T, dev, K)
    per_comm = max(1, sw.per_block // 3)
    graphs = alternate({"nodbo": g1.graphs[2 * T].replay, "dbo": g2.graphs[2 * T].replay,
                        "comm": transfer_step(b_nodbo, cfg, 2 * T, LK, dev),
                        "comm_dbo": transfer_step(b_dbo, cfg, T, 2 * LK, dev)}, sw.blocks,
                       {"nodbo": sw.per_block, "dbo": sw.per_block, "comm": per_comm,
                        "comm_dbo": per_comm}, dev)
    t_comm = median(graphs["comm"]["all"])
    t_comm_dbo = median(graphs["comm_dbo"]["all"])
    return {"d_us": d_us, "b_nodbo": b_nodbo, "b_dbo": b_dbo, "g1": g1, "g2": g2,
            "graphs": graphs, "t_comm": t_comm, "t_comm_dbo": t_comm_dbo,
            "comm_mismatch": abs(t_comm_dbo / t_comm - 1) if t_comm > 0 else 0.0}


def _best_point(sw: _Sweep, T: int, r: float, c_us: float) -> tuple[dict[str, Any], int]:
    """The transfers alone are timed in the same blocks as the graphs: the simulated
    transfer's speed drifts on some hosts (the copy engine's PCIe bandwidth by up to 1.5x
    between two measurements a minute apart), and T_ideal must describe the comm the graphs
    actually had. The two backends must also have had the same comm (the premise of the
    ratio): a point whose two comm times differ by more than COMM_TOLERANCE is tuned and
    measured again, up to COMM_ATTEMPTS. Returns the attempt whose two comm times agree
    best, and the number of attempts made."""
    best: dict[str, Any] | None = None
    attempt = 0
    for attempt in range(1, COMM_ATTEMPTS + 1):
        point = _measure_point(sw, T, r, c_us)
        if best is None or point["comm_mismatch"] < best["comm_mismatch"]:
            best = point
        del point
        free_memory(sw.dev)
        if best["comm_mismatch"] <= COMM_TOLERANCE or sw.dev.type != "cuda":
            break
        sw.log(f"T={T} r={r:g}: the no-DBO and DBO steps' comm differ by "
               f"{best['comm_mismatch']:.1%} in the best attempt so far "
               f"({best['t_comm']:.3f} / {best['t_comm_dbo']:.3f} ms)"
               + ("; measuring the point again" if attempt < COMM_ATTEMPTS else ""))
    assert best is not None
    return best, attempt


def _sweep_row(sw: _Sweep, T: int, r: float, t_ub: float, t_compute: float,
               inputs: tuple[torch.Tensor, ...], chunks: list[tuple[torch.Tensor, ...]],
               host_run: bool) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """Measure one sweep point: ``(row, host overhead or None, trace file or None)``; the
    host-time and trace runs happen only when ``host_run``."""
    model, dev, K = sw.model, sw.dev, sw.num_steps
    c_us = t_ub / sw.layer_passes * 1e3
    best, attempts = _best_point(sw, T, r, c_us)
    b_nodbo, b_dbo, g1, g2 = best["b_nodbo"], best["b_dbo"], best["g1"], best["g2"]
    graphs = best["graphs"]
    t_comm, t_comm_dbo = best["t_comm"], best["t_comm_dbo"]
    # Same kernels graph vs eager: a cheap check that the DBO graph computes the step (bf16
    # with atomic adds in combine: close, not bitwise). With decode steps the outputs are
    # token ids: the share of them that differ.
    out_graph = g2.graphs[2 * T].static_outputs.float().clone()
    out_eager = torch.cat([step_fn(model, K)(*c) for c in chunks]).float()
    check = ({"graph_vs_eager_max_abs_diff": (out_graph - out_eager).abs().max().item(),
              "output_max_abs": out_eager.abs().max().item()} if K == 1 else
             {"graph_vs_eager_token_mismatch": (out_graph != out_eager).float().mean().item()})

    def thread_step() -> torch.Tensor:
        return torch.cat(sw.threads.run([lambda c=c: model(*c) for c in chunks]))

    def nodbo_eager_step() -> Any:
        return g1.step(*inputs)

    def dbo_eager_step() -> Any:
        return g2.step(*inputs)

    nodbo_eager = dbo_eager = thread_eager = float("nan")
    if not sw.graphs_only:
        set_backend(model, b_nodbo)
        nodbo_eager = median(time_device(nodbo_eager_step, sw.eager_iters, dev=dev))
        set_backend(model, b_dbo)
        dbo_eager = median(time_device(dbo_eager_step, sw.eager_iters, dev=dev))
        thread_eager = median(time_device(thread_step, sw.eager_iters, dev=dev))

    host: dict[str, Any] | None = None
    trace_file: str | None = None
    if host_run and not sw.graphs_only:
        host = _host_overhead(model, inputs, chunks, g2, thread_step, b_nodbo, b_dbo,
                              repeats=sw.host_repeats, dev=dev)
        host.update(tokens_per_ubatch=T, ratio=r)
        set_backend(model, b_dbo)
        sync(dev)
        trace_file = trace_dbo_step(g2, inputs, 2 * T, dev,
                                    sw.out_dir / f"dbo-step-1gpu-{slug(sw.gpu)}.trace.json")

    t_nodbo = median(graphs["nodbo"]["all"])
    t_dbo = median(graphs["dbo"]["all"])
    t_ideal = max(t_compute, t_comm)
    row = {
        "tokens_per_ubatch": T, "ratio": r, "batch": 2 * T, "decode_steps": K,
        "comm_mismatch": best["comm_mismatch"], "comm_attempts": attempts,
        "c_layer_us": c_us, "dispatch_us": best["d_us"], "combine_us": best["d_us"],
        "t_ubatch_ms": t_ub, "t_compute_ms": t_compute,
        "t_compute_split_ms": 2 * t_ub, "t_comm_ms": t_comm,
        "t_comm_dbo_ms": t_comm_dbo, "t_ideal_ms": t_ideal,
        "t_ideal_split_ms": max(2 * t_ub, t_comm_dbo),
        "nodbo_graph_ms": t_nodbo, "dbo_graph_ms": t_dbo,
        "nodbo_eager_ms": nodbo_eager, "dbo_eager_greenlet_ms": dbo_eager,
        "dbo_eager_thread_ms": thread_eager,
        "speedup": t_nodbo / t_dbo, "ideal_speedup": t_nodbo / t_ideal,
        "share_hidden": share_hidden(t_nodbo, t_dbo, t_ideal),
        "share_hidden_graphs": share_from_graphs(t_nodbo, t_dbo, t_compute),
        "split_penalty": 2 * t_ub / t_compute - 1,
        "eager_speedup_greenlet": nodbo_eager / dbo_eager,
        "eager_speedup_thread": nodbo_eager / thread_eager,
        "halves": {k: {h: median(v[h]) for h in ("A", "B")} for k, v in graphs.items()},
        **check,
    }
    row["explain"] = explain(row, "pipeline fill/drain, comm kernel's SM")
    share = row["share_hidden"]
    sw.log(f"T={T} r={r:g}: no-DBO graph {t_nodbo:.3f} ms, DBO graph {t_dbo:.3f} ms "
           f"({row['speedup']:.2f}x of ideal {row['ideal_speedup']:.2f}x, hides "
           f"{'-' if share is None else f'{share:.0%}'}; T_compute {t_compute:.3f}, "
           f"split {2 * t_ub:.3f}, T_comm {t_comm:.3f}, comm DBO {t_comm_dbo:.3f} ms), "
           f"eager greenlet {dbo_eager:.3f} / thread {thread_eager:.3f} ms")
    return row, host, trace_file


def run(out_dir: Path = RESULTS_DIR, quick: bool = False, progress: Any = None,
        log: Callable[[str], None] = print, dry_run_cpu: bool = False,
        tokens: tuple[int, ...] | None = None, ratios: tuple[float, ...] | None = None,
        num_layers: int | None = None, graphs_only: bool = False, num_steps: int = 1,
        config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole 1-GPU stage. Returns the result dict (also what goes into the JSON).

    ``dry_run_cpu``: run the same code on the CPU with the tiny CPU model, eager steps in
    place of graphs and no simulated comm time (checks the code path; numbers mean
    nothing). ``tokens`` / ``ratios`` / ``num_layers`` replace the sweep's points and the
    model's depth; ``graphs_only`` skips the eager, thread, host-time and trace runs
    (implied by ``num_steps`` > 1: decode steps per graph, see the module docstring);
    ``config``: ``MoEConfig`` fields to override (e.g. a placement threshold).
    """
    num_threads = torch.get_num_threads()
    if dry_run_cpu:  # as in cpu_bench: per-step baseline threads would start spinning
        torch.set_num_threads(1)  # OpenMP teams that slow every variant down
    try:
        with torch.no_grad():
            return _run(out_dir, quick, progress, log, dry_run_cpu, tokens, ratios,
                        num_layers, graphs_only or num_steps > 1, num_steps, config or {})
    finally:
        torch.set_num_threads(num_threads)


def _run(out_dir: Path, quick: bool, progress: Any, log: Callable[[str], None],
         dry_run_cpu: bool, tokens_arg: tuple[int, ...] | None,
         ratios_arg: tuple[float, ...] | None, num_layers: int | None,
         graphs_only: bool, num_steps: int, config: dict[str, Any]) -> dict[str, Any]:
    dev = torch.device("cpu") if dry_run_cpu else torch.device(
        "cuda", torch.cuda.current_device())
    env = {**host_env(), **gpu_env(dev)}
    gpu = env["gpu"]
    small = quick or dry_run_cpu
    tokens = tokens_arg or (DRY_TOKENS if dry_run_cpu else QUICK_TOKENS if quick else TOKENS)
    ratios = ratios_arg or (QUICK_RATIOS if small else RATIOS)
    blocks, per_block = (4, 5) if small else (6, 10)
    max_t = max(tokens)
    base_shape = {k: v for k, v in (CPU_SHAPE if dry_run_cpu else GPU_SHAPE).items()
                  if k != "max_batch"}
    if num_layers is not None:
        base_shape["num_layers"] = num_layers
    base_shape.update(config)
    cfg = make_config(base_shape, max_batch=2 * max_t)
    K = num_steps
    dtype = torch.float32 if dry_run_cpu else torch.bfloat16
    shape = {**base_shape, "max_batch": cfg.max_batch, "dtype": str(dtype).split(".")[-1],
             "decode_steps_per_graph": K}

    log(f"1-GPU stage on {gpu}: model {shape}")
    model = make_model(cfg, _backend(cfg, 2 * max_t), config, dtype=dtype, device=dev)
    calibrate_spin(dev)

    yc: dict[str, Any] | None = None
    if not graphs_only:
        yc = yield_cost.measure(num_yields=2_000 if small else 20_000,
                                repeats=3 if small else 7, cuda=dev.type == "cuda")
        log(f"yield cost with CUDA streams: greenlet {yc['greenlet_yield_us']:.2f} us, "
            f"greenlet switch {yc['greenlet_switch_yield_us']:.2f} us, thread BASELINE "
            f"{yc['thread_event_yield_us']:.2f} / {yc['thread_event_switch_yield_us']:.2f} "
            "us")

    sw = _Sweep(model=model, cfg=cfg, dev=dev, out_dir=out_dir, gpu=gpu, num_steps=K,
                blocks=blocks, per_block=per_block, eager_iters=5 if small else 15,
                host_repeats=10 if quick else 40, graphs_only=graphs_only,
                threads=ThreadUBatchRunner(2), log=log)
    rows: list[dict[str, Any]] = []
    host: dict[str, Any] | None = None
    trace_file: str | None = None
    host_point = (min(tokens, key=lambda t: abs(t - HOST_POINT[0])),
                  min(ratios, key=lambda r: abs(r - HOST_POINT[1])))
    task = progress.add_task("1-GPU sweep", total=len(tokens) * (len(ratios) + 1)) \
        if progress is not None else None

    for T in tokens:
        inputs = decode_inputs(cfg, 2 * T, seed=T, device=dev, num_steps=K)
        chunks = split_tensors(inputs, 2)

        # Zero comm: compute of one microbatch and of the whole batch.
        set_backend(model, _backend(cfg, T))
        g = _graph(model, cfg, T, 1, T, dev, K)
        t_ub = median(time_device(g.graphs[T].replay, blocks * per_block, dev=dev))
        del g
        set_backend(model, _backend(cfg, 2 * T))
        g = _graph(model, cfg, 2 * T, 1, T, dev, K)
        t_compute = median(time_device(g.graphs[2 * T].replay, blocks * per_block, dev=dev))
        del g
        free_memory(dev)
        log(f"T={T}: one microbatch {t_ub:.3f} ms -> {t_ub / sw.layer_passes * 1e3:.1f} us "
            f"per layer pass; whole batch {t_compute:.3f} ms (two microbatches "
            f"{2 * t_ub:.3f} ms)")
        if progress is not None:
            progress.advance(task)

        for r in ratios:
            row, h, tf = _sweep_row(sw, T, r, t_ub, t_compute, inputs, chunks,
                                    host_run=(T, r) == host_point)
            rows.append(row)
            if h is not None:
                host, trace_file = h, tf
            free_memory(dev)
            if progress is not None:
                progress.advance(task)

    costs = None if graphs_only else fit_cost_models(
        {f"sim-ratio-{r:g}": [x for x in rows if x["ratio"] == r] for r in ratios},
        gpu, shape, out_dir, "bench.gpu_bench")
    result = {"env": env, "shape": shape, "tokens": list(tokens), "ratios": list(ratios),
              "transfer": TRANSFER, "config_overrides": dict(config),
              "formulas": {
                  "c_layer_us": "graph time of one microbatch (zero comm) / layers",
                  "comm": "per layer per microbatch = ratio * c (dispatch = combine = "
                          "ratio * c / 2); no-DBO step: dispatch = combine = ratio * c "
                          "for the 2x batch (same total)",
                  "t_ideal_ms": "max(T_compute, T_comm) of the no-DBO step",
                  "share_hidden": "(T_nodbo - T_dbo) / (T_nodbo - T_ideal); null when "
                                  "T_nodbo - T_ideal < 2% of T_nodbo",
                  "share_hidden_graphs": "the same with T_ideal = max(T_compute, T_nodbo "
                                         "- T_compute): the comm the no-DBO graph had",
                  "cost_model": "calibrated on half A of the graph timings, judged on "
                                "half B"},
              "yield_cost_cuda": yc, "sweep": rows, "host_overhead": host,
              "cost_model": costs, "trace_file": trace_file}
    result["plot_file"] = plot_sweep(rows, out_dir, gpu, shape)
    return result


def _host_overhead(model: MoEDecoder, inputs: tuple[torch.Tensor, ...],
                   chunks: list[tuple[torch.Tensor, ...]], g2: Any,
                   thread_step: Callable[[], Any], b_nodbo: Any, b_dbo: Any,
                   repeats: int, dev: torch.device) -> dict[str, Any]:
    """Host time to issue one eager step (GPU synchronised before and after, not timed)."""
    def unsplit() -> Any:
        set_backend(model, b_nodbo)
        return model(*inputs)

    def sequential() -> Any:
        set_backend(model, b_dbo)
        return torch.cat([model(*c) for c in chunks])

    def greenlet_dbo() -> Any:
        set_backend(model, b_dbo)
        return g2.step(*inputs)

    def thread_dbo() -> Any:
        set_backend(model, b_dbo)
        return thread_step()

    t = host_times({"unsplit": unsplit, "sequential": sequential,
                    "greenlet_dbo": greenlet_dbo, "thread_dbo": thread_dbo},
                   repeats=repeats, warmup=2, sync=lambda: sync(dev))
    set_backend(model, b_dbo)
    med = {k: {m: median(v[m]) for m in ("wall_ms", "cpu_ms")} for k, v in t.items()}
    return {"median": med, "repeats": repeats,
            "greenlet_dbo_vs_sequential_cpu": med["greenlet_dbo"]["cpu_ms"]
            / med["sequential"]["cpu_ms"],
            "greenlet_dbo_vs_sequential_wall": med["greenlet_dbo"]["wall_ms"]
            / med["sequential"]["wall_ms"],
            "greenlet_dbo_vs_unsplit_cpu": med["greenlet_dbo"]["cpu_ms"]
            / med["unsplit"]["cpu_ms"],
            "thread_dbo_vs_sequential_cpu": med["thread_dbo"]["cpu_ms"]
            / med["sequential"]["cpu_ms"]}


def plot_sweep(rows: list[dict[str, Any]], out_dir: Path, gpu: str,
               shape: dict[str, Any]) -> str | None:
    """Speedup of the DBO graph vs tokens per microbatch, one line per ratio, ideal dashed."""
    fig = open_speedup_plot()
    if fig is None:
        return None
    plt, ax = fig[0], fig[2]
    ratios = sorted({r["ratio"] for r in rows})
    colors = plt.cm.viridis([i / max(len(ratios) - 1, 1) for i in range(len(ratios))])
    for color, ratio in zip(colors, ratios, strict=True):
        rr = sorted((x for x in rows if x["ratio"] == ratio),
                    key=lambda x: x["tokens_per_ubatch"])
        xs = [x["tokens_per_ubatch"] for x in rr]
        ax.plot(xs, [x["speedup"] for x in rr], "-o", color=color,
                label=f"comm/compute {ratio:g}")
        ax.plot(xs, [x["ideal_speedup"] for x in rr], "--", color=color, alpha=0.7)
    ticks = sorted({x["tokens_per_ubatch"] for x in rows})
    return save_speedup_plot(fig, ticks, "tokens per microbatch",
                             "speedup of DBO graph over no-DBO graph",
                             f"{gpu}: greenlet DBO, simulated comm (dashed: ideal)", shape,
                             out_dir / f"speedup-1gpu-{slug(gpu)}.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run the code path on the CPU with the tiny model (no GPU numbers)")
    p.add_argument("--transfer", choices=("spin", "copy_engine"), default="copy_engine",
                   help="how the simulated comm spends its time (see SingleProcessBackend)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per microbatch to sweep")
    p.add_argument("--ratios", type=float, nargs="+", help="comm/compute ratios to sweep")
    p.add_argument("--layers", type=int, help="decoder layers (default: GPU_SHAPE's)")
    p.add_argument("--graphs-only", action="store_true",
                   help="time the two graphs only (no eager, thread, host or trace runs)")
    p.add_argument("--steps", type=int, default=1,
                   help="greedy decode steps per graph (MoEDecoder.decode; > 1 implies "
                        "--graphs-only)")
    add_config_overrides(p)
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be at least 1, got {a.steps}")
    config = config_overrides(p, a.set)
    global TRANSFER
    TRANSFER = a.transfer
    r = run(a.out, a.quick, dry_run_cpu=a.dry_run_cpu,
            tokens=tuple(a.tokens) if a.tokens else None,
            ratios=tuple(a.ratios) if a.ratios else None, num_layers=a.layers,
            graphs_only=a.graphs_only, num_steps=a.steps, config=config)
    r["transfer"] = TRANSFER
    path = write_json(a.out / f"bench-1gpu-{stamp()}.json", r)
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main()
