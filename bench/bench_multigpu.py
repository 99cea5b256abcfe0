"""Multi-GPU stage of ``make bench``: DBO with real NCCL all-to-all, one process per GPU.

    torchrun --standalone --nproc_per_node=2 bench/bench_multigpu.py [--quick] [--out DIR]
    python3 -m torch.distributed.run --standalone --nproc_per_node=4 bench/bench_multigpu.py

The reference MoE decoder (``bench.common.GPU_SHAPE``, bf16) with expert parallelism over
all ranks (16 experts: 8 per rank on 2 GPUs, 4 on 4) through ``TorchDistributedBackend``
in static mode (``num_max_tokens_per_rank`` = the tokens each step routes; fixed-size
padded all-to-all buffers, no host sync, so the step can be captured). Every rank runs
a batch of 2T tokens (two microbatches of T) for T in (64, 256, 1024, 2048).

Per T (all times: medians per rank, then the max over ranks, since a step is as slow as
its slowest rank):
    no-DBO graph / DBO graph   the step captured by DBOGraphRunner (num_ubatches 1 / 2),
                               timed in alternating blocks (halves A/B as in gpu_bench)
    no-DBO eager / DBO eager   the same, eagerly (greenlet scheduler)
    T_compute                  no-DBO graph with the all-to-all replaced by a local copy
                               of the same buffers (same kernels, no NCCL)
    t_ub                       the same for ONE microbatch (T tokens); the split compute
                               is 2 * t_ub
    T_comm                     graph of the no-DBO step's NCCL calls alone (per layer:
                               counts, payload and expert ids for dispatch; payload for
                               combine), same buffer sizes; T_comm_dbo: the DBO step's
    T_ideal = max(T_compute, T_comm); ideal speedup = T_nodbo / T_ideal
    share hidden = (T_nodbo - T_dbo) / (T_nodbo - T_ideal)
Losses are split into: the split penalty (2 * t_ub - T_compute: memory-bound matmuls
read their weights once per microbatch), comm too small to hide (T_comm against the
step), and what is left above the split schedule's own ideal max(2 t_ub, T_comm_dbo)
(NCCL kernels holding SMs while the other microbatch computes, pipeline fill and drain).

Rank 0 writes ``bench-multigpu-ep<N>-<stamp>.json``, ``speedup-ep<N>-<gpu>.png``, a
Chrome trace of one eager DBO step and one DBO graph replay, and the calibration
profile ``nccl-ep<N>`` into ``calibration-<gpu>.json``.

``--slow-link``: the same with ``NCCL_P2P_DISABLE=1`` (set for the run if the environment
does not already have it): NCCL moves the data through host memory instead of NVLink,
the closest stand-in for a network between nodes these hosts have. Every output is
labelled "slow link (NCCL_P2P_DISABLE=1)" (otherwise "NVLink"; the label follows the
environment, so exporting the variable alone gives the same) and named ``-slowlink``
(files ``bench-multigpu-ep<N>-slowlink-<stamp>.json`` and so on; calibration profile
``nccl-ep<N>-slowlink``), with the same rows and loss breakdown.

    NCCL_P2P_DISABLE=1 torchrun --standalone --nproc_per_node=2 bench/bench_multigpu.py \
        --slow-link --tokens 256,1024,2048 --quick

``--steps K`` (K > 1): each graph runs ``MoEDecoder.decode`` over K greedy decode steps,
so the pipeline fills and drains once per K steps (as ``gpu_bench --steps``); every time
is for the K steps, the comm graphs hold K steps' calls, and the eager runs, the trace and
the calibration profile are left out. Files are tagged ``-steps<K>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

import argparse
import datetime
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from bench.common import (
    CPU_SHAPE,
    GPU_SHAPE,
    RESULTS_DIR,
    alternate,
    capture_plain,
    capture_step,
    decode_inputs,
    explain,
    fit_cost_models,
    free_memory,
    gpu_env,
    host_env,
    make_config,
    make_console,
    make_model,
    median,
    open_speedup_plot,
    save_speedup_plot,
    set_backend,
    share_hidden,
    slug,
    stamp,
    step_fn,
    sync,
    time_device,
    trace_dbo_step,
    write_json,
)
from bench.report import multigpu_table
from coop_dbo.backends import TorchDistributedBackend

TOKENS = (64, 256, 1024, 2048)
QUICK_TOKENS = (64, 256)
TRACE_TOKENS = 256
DRY_TOKENS = (4, 8)  # --dry-run-cpu (gloo, no GPU): checks the code path only


class LocalCopyBackend(TorchDistributedBackend):
    """``TorchDistributedBackend`` whose all-to-alls are local copies of the same buffers.

    Same kernels and buffer sizes as the real one in static mode, no NCCL: the compute
    of the step alone. (Each rank computes its own routed rows with the experts it holds;
    the row counts are the same as in the real exchange on average.)
    """

    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        return send_counts.clone()

    def _exchange(self, send: torch.Tensor, send_splits: Any, recv_splits: Any) -> torch.Tensor:
        return send.clone()


def comm_only_step(world: int, cap: int, hidden: int, calls: int, dev: torch.device,
                   dtype: torch.dtype) -> Callable[[], None]:
    """The NCCL calls of ``calls`` MoE layers (one microbatch each), static buffer sizes."""
    counts = torch.zeros(world, dtype=torch.int64, device=dev)
    counts_r = torch.empty_like(counts)
    x = torch.zeros(world * cap, hidden, dtype=dtype, device=dev)
    x_r = torch.empty_like(x)
    y_r = torch.empty_like(x)
    le = torch.zeros(world * cap, dtype=torch.int64, device=dev)
    le_r = torch.empty_like(le)

    def step() -> None:
        for _ in range(calls):
            dist.all_to_all_single(counts_r, counts)  # dispatch: counts
            dist.all_to_all_single(x_r, x)  # dispatch: payload
            dist.all_to_all_single(le_r, le)  # dispatch: local expert ids
            dist.all_to_all_single(y_r, x_r)  # combine: payload back
    return step


SLOW_LINK = "slow link (NCCL_P2P_DISABLE=1)"
FAST_LINK = "NVLink"


def link_label(environ: dict[str, str] | None = None) -> tuple[str, str]:
    """``(label, file tag)`` of the link NCCL uses under ``environ`` (default the
    process's): the slow link when ``NCCL_P2P_DISABLE`` is set to anything but 0 or
    empty, else NVLink (the GPUs of the hosts this bench runs on are NVLink-connected)."""
    value = (os.environ if environ is None else environ).get("NCCL_P2P_DISABLE", "")
    if value.strip() not in ("", "0"):
        return SLOW_LINK, "-slowlink"
    return FAST_LINK, ""


def max_over_ranks(values: list[float], dev: torch.device) -> list[float]:
    """Each value's maximum over the ranks (a step is as slow as its slowest rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def sync_all(dev: torch.device) -> None:
    """Every rank idle and at the same point."""
    sync(dev)
    if dev.type == "cuda":
        dist.barrier(device_ids=[dev.index])
    else:
        dist.barrier()
    sync(dev)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer timed replays (4 blocks of 5, 5 eager steps); tokens 64,256 "
                        "unless --tokens is given")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tokens", type=str, default=None,
                   help="comma-separated tokens per microbatch (default 64,256,1024,2048)")
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="gloo on CPU with the tiny model, eager in place of graphs (checks "
                        "the code path; the numbers mean nothing)")
    p.add_argument("--steps", type=int, default=1,
                   help="greedy decode steps per graph (MoEDecoder.decode): the pipeline "
                        "fills and drains once per K steps; graphs only (no eager runs, "
                        "trace or calibration), times for the K steps, files tagged "
                        "-steps<K>")
    p.add_argument("--nccl-high-priority", action="store_true",
                   help="NCCL's streams at high priority (ProcessGroupNCCL.Options."
                        "is_high_priority_stream): its kernels get SMs before the compute's "
                        "blocks; files tagged -hiprio")
    p.add_argument("--slow-link", action="store_true",
                   help="NCCL through host memory (NCCL_P2P_DISABLE=1, set here if not "
                        "exported), outputs labelled and named as the slow link")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps must be at least 1, got {a.steps}")
    K = a.steps
    if a.slow_link:
        if os.environ.get("NCCL_P2P_DISABLE", "1").strip() in ("", "0"):
            p.error("--slow-link with NCCL_P2P_DISABLE="
                    f"{os.environ['NCCL_P2P_DISABLE']!r} exported: unset it or export 1")
        os.environ["NCCL_P2P_DISABLE"] = "1"  # before NCCL starts: every rank sets it
    link, tag = link_label()
    if K > 1:
        tag += f"-steps{K}"
    if a.nccl_high_priority:
        tag += "-hiprio"
        link += ", NCCL streams at high priority"

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(minutes=5)
    if a.dry_run_cpu:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        options = None
        if a.nccl_high_priority:
            options = dist.ProcessGroupNCCL.Options()
            options.is_high_priority_stream = True
        dist.init_process_group("nccl", device_id=dev, timeout=timeout, pg_options=options)
    rank, world = dist.get_rank(), dist.get_world_size()
    is0 = rank == 0
    torch.set_grad_enabled(False)

    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else (
        DRY_TOKENS if a.dry_run_cpu else QUICK_TOKENS if a.quick else TOKENS)
    blocks, per_block = (4, 5) if a.quick or a.dry_run_cpu else (6, 10)
    eager_iters = 5 if a.quick or a.dry_run_cpu else 10
    max_t = max(tokens)
    base_shape = {k: v for k, v in (CPU_SHAPE if a.dry_run_cpu else GPU_SHAPE).items()
                  if k != "max_batch"}
    cfg = make_config(base_shape, max_batch=2 * max_t)
    L = cfg.num_layers
    dtype = torch.float32 if a.dry_run_cpu else torch.bfloat16
    shape = {**base_shape, "max_batch": cfg.max_batch, "dtype": str(dtype).split(".")[-1]}
    env = {**host_env(), **gpu_env(dev), "world_size": world,
           "backend": dist.get_backend(),
           "nccl_p2p_disable": os.environ.get("NCCL_P2P_DISABLE"),
           "nccl_high_priority": a.nccl_high_priority}
    gpu = env["gpu"]

    console = None
    if is0:
        console = make_console()
        console.rule(f"multi-GPU DBO bench: {world} x {gpu}, NCCL {env['nccl']}, "
                     f"torch {env['torch']}, CUDA {env['cuda']}, {link}")
        console.print(f"model {shape}; tokens per microbatch {list(tokens)}")

    def log(msg: str) -> None:
        if console is not None:
            console.log(msg)

    def timed(fn: Callable[[], Any], iters: int) -> float:
        sync_all(dev)
        return median(time_device(fn, iters, warmup=1, dev=dev))

    def graph(batch: int, num_ubatches: int, seed: int) -> Any:
        """DBOGraphRunner of one step, or of K decode steps (the model's current backend
        is baked in)."""
        return capture_step(step_fn(model, K),
                            lambda size: decode_inputs(cfg, size, seed=seed, device=dev,
                                                       num_steps=K),
                            batch, num_ubatches, dev)

    model = make_model(cfg, TorchDistributedBackend(cfg.num_experts,
                                                    num_max_tokens_per_rank=2 * max_t),
                       dtype=dtype, device=dev)
    n_local = cfg.num_experts // world
    rows: list[dict[str, Any]] = []
    trace_file = None

    for T in tokens:
        seed = 1000 * rank + T  # ranks bring different tokens
        inputs = decode_inputs(cfg, 2 * T, seed=seed, device=dev, num_steps=K)

        # Compute alone (local copies instead of all-to-all).
        set_backend(model, LocalCopyBackend(cfg.num_experts, num_max_tokens_per_rank=T))
        g = graph(T, 1, seed)
        t_ub = timed(g.graphs[T].replay, blocks * per_block)
        del g
        set_backend(model, LocalCopyBackend(cfg.num_experts, num_max_tokens_per_rank=2 * T))
        g = graph(2 * T, 1, seed)
        t_compute = timed(g.graphs[2 * T].replay, blocks * per_block)
        del g
        free_memory(dev)

        # Comm alone (graphs of the NCCL calls of the no-DBO and of the DBO step).
        top = min(cfg.top_k, n_local)
        sg = capture_plain(comm_only_step(world, 2 * T * top, cfg.hidden, L * K, dev, dtype),
                           dev)
        t_comm = timed(sg.replay, blocks * per_block)
        sg = capture_plain(comm_only_step(world, T * top, cfg.hidden, 2 * L * K, dev, dtype),
                           dev)
        t_comm_dbo = timed(sg.replay, blocks * per_block)
        del sg
        free_memory(dev)

        # The real thing.
        b_nodbo = TorchDistributedBackend(cfg.num_experts, num_max_tokens_per_rank=2 * T)
        b_dbo = TorchDistributedBackend(cfg.num_experts, num_max_tokens_per_rank=T)
        set_backend(model, b_nodbo)
        g1 = graph(2 * T, 1, seed)
        set_backend(model, b_dbo)
        g2 = graph(2 * T, 2, seed)
        halves = alternate({"nodbo": g1.graphs[2 * T].replay, "dbo": g2.graphs[2 * T].replay},
                           blocks, per_block, dev, before_block=lambda: sync_all(dev))
        nodbo_eager = dbo_eager = float("nan")  # (graphs only with K decode steps)
        if K == 1:
            set_backend(model, b_nodbo)
            nodbo_eager = timed(partial(g1.step, *inputs), eager_iters)
            set_backend(model, b_dbo)
            dbo_eager = timed(partial(g2.step, *inputs), eager_iters)

        if T == TRACE_TOKENS and not a.no_trace and K == 1:
            # Rank 0 profiles; every rank runs the same steps (the collectives must match).
            sync_all(dev)
            path = (a.out / f"dbo-step-ep{world}{tag}-{slug(gpu)}.trace.json" if is0
                    else None)
            trace_file = trace_dbo_step(g2, inputs, 2 * T, dev, path)

        local = [t_ub, t_compute, t_comm, t_comm_dbo, median(halves["nodbo"]["all"]),
                 median(halves["dbo"]["all"]), nodbo_eager, dbo_eager,
                 median(halves["nodbo"]["A"]), median(halves["dbo"]["A"]),
                 median(halves["nodbo"]["B"]), median(halves["dbo"]["B"])]
        (t_ub, t_compute, t_comm, t_comm_dbo, t_nodbo, t_dbo, nodbo_eager, dbo_eager,
         nod_a, dbo_a, nod_b, dbo_b) = max_over_ranks(local, dev)
        t_ideal = max(t_compute, t_comm)
        row: dict[str, Any] = {"tokens_per_ubatch": T, "batch": 2 * T, "world_size": world,
            "decode_steps": K,
            "t_ubatch_ms": t_ub, "t_compute_ms": t_compute, "t_compute_split_ms": 2 * t_ub,
            "t_comm_ms": t_comm, "t_comm_dbo_ms": t_comm_dbo, "t_ideal_ms": t_ideal,
            "t_ideal_split_ms": max(2 * t_ub, t_comm_dbo),
            "nodbo_graph_ms": t_nodbo, "dbo_graph_ms": t_dbo,
            "nodbo_eager_ms": nodbo_eager, "dbo_eager_greenlet_ms": dbo_eager,
            "speedup": t_nodbo / t_dbo, "ideal_speedup": t_nodbo / t_ideal,
            "eager_speedup": nodbo_eager / dbo_eager,
            "share_hidden": share_hidden(t_nodbo, t_dbo, t_ideal),
            "split_penalty": 2 * t_ub / t_compute - 1,
            "comm_share": t_comm / t_nodbo,
            "halves": {"nodbo": {"A": nod_a, "B": nod_b}, "dbo": {"A": dbo_a, "B": dbo_b}}}
        row["explain"] = explain(row, "NCCL kernels' SMs, pipeline fill/drain")
        rows.append(row)
        log(f"T={T}: no-DBO graph {t_nodbo:.3f} ms, DBO graph {t_dbo:.3f} ms "
            f"({row['speedup']:.2f}x, ideal {row['ideal_speedup']:.2f}x); compute "
            f"{t_compute:.3f} (split {2 * t_ub:.3f}), comm {t_comm:.3f} (DBO "
            f"{t_comm_dbo:.3f}) ms; {row['explain']}")
        del g1, g2
        free_memory(dev)

    if console is not None:  # rank 0
        comm = f"nccl-ep{world}{tag}"
        costs: dict[str, Any] = {"comm": comm, "skipped": "times are for K decode steps"}
        if K == 1:  # a cost model is for one step
            costs = {**fit_cost_models({comm: rows}, gpu, shape, a.out,
                                       "bench.bench_multigpu"), "comm": comm}
        result = {"env": env, "shape": shape, "tokens": list(tokens), "link": link,
                  "decode_steps_per_graph": K,
                  "sweep": rows, "cost_model": costs, "trace_file": trace_file,
                  "formulas": {"t_ideal_ms": "max(T_compute, T_comm) of the no-DBO step",
                               "share_hidden": "(T_nodbo - T_dbo) / (T_nodbo - T_ideal)",
                               "times": "median per rank, max over ranks"}}
        result["plot_file"] = plot(rows, a.out, gpu, world, shape, link, tag)
        path = write_json(a.out / f"bench-multigpu-ep{world}{tag}-{stamp()}.json", result)
        console.print(multigpu_table(result))
        console.print(f"wrote {path}")
    sync_all(dev)
    # destroy_process_group after graphs captured NCCL collectives was seen to hang on the
    # H100 hosts (tests/mgpu_worker.py); the results are written, so leave at once.
    sys.stdout.flush()
    os._exit(0)


def plot(rows: list[dict[str, Any]], out_dir: Path, gpu: str, world: int,
         shape: dict[str, Any], link: str = FAST_LINK, tag: str = "") -> str | None:
    """Speedup of the DBO graph (and of eager DBO) vs tokens per microbatch, ideal dashed;
    ``link`` / ``tag``: ``link_label``'s, in the title and the file name."""
    fig = open_speedup_plot()
    if fig is None:
        return None
    ax = fig[2]
    xs = [r["tokens_per_ubatch"] for r in rows]
    ax.plot(xs, [r["speedup"] for r in rows], "-o", color="C0", label="DBO graph (measured)")
    ax.plot(xs, [r["ideal_speedup"] for r in rows], "--", color="C0", label="ideal")
    ax.plot(xs, [r["eager_speedup"] for r in rows], ":s", color="C1",
            label="DBO eager vs no-DBO eager")
    return save_speedup_plot(fig, xs, "tokens per microbatch (per rank)",
                             "speedup over no DBO",
                             f"{world} x {gpu}, NCCL all-to-all over {link}: greenlet DBO",
                             shape, out_dir / f"speedup-ep{world}{tag}-{slug(gpu)}.png")


if __name__ == "__main__":
    main()
