"""`make bench`: what greenlet DBO buys, and where.

    python3 -m bench.run_bench [--quick] [--out DIR] [--cpu-only] [--no-hf] [--no-shapes]

CPU stage (always, before CUDA is initialised): host cost of one hand-off (greenlet vs the
thread BASELINE) and the eager step of the reference model (``bench/cpu_bench.py``).
1-GPU stages (when CUDA is available): the sweep of ``bench/gpu_bench.py`` (the
calibration file, a plot and a Chrome trace), the model shapes of ``bench/shapes.py``
(schedule planned at start-up, planned vs fallback placement; its own
``bench-shapes-<stamp>.json`` too), then the transformers models of
``bench/hf_bench.py`` (decode graphs and prefill: plain, DBO and the default runner's
pick). The multi-GPU stage runs separately under
torchrun (``bench/bench_multigpu.py``; ``bench/gpu_suite.sh`` runs everything).

Writes ``bench-<stamp>.json`` (everything measured) into ``--out`` (default
bench/results) and prints the tables, hardware first, and the targets (reported, never
asserted).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench import cpu_bench, report
from bench.common import RESULTS_DIR, git_rev, host_env, make_console, stamp, write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU stages")
    parser.add_argument("--no-hf", action="store_true",
                        help="skip the transformers stage (bench/hf_bench.py) on a GPU")
    parser.add_argument("--no-shapes", action="store_true",
                        help="skip the model-shapes stage (bench/shapes.py) on a GPU")
    args = parser.parse_args(argv)
    console = make_console()
    env = host_env()  # does not initialise CUDA
    env["git"] = git_rev()
    env["quick"] = args.quick
    use_gpu = torch.cuda.is_available() and not args.cpu_only
    console.rule(f"coop-dbo bench: {env['cpu']} ({env['cpu_count']} cores), Python "
                 f"{env['python']}, torch {env['torch']}, CUDA "
                 f"{'yes' if use_gpu else 'no'}{', quick' if args.quick else ''}")
    result: dict[str, Any] = {"env": env, "cpu": None, "gpu": None}

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("CPU stage", total=2)
        y = cpu_bench.hand_off(args.quick)
        progress.advance(task)
        step = cpu_bench.model_step(args.quick)
        progress.advance(task)
        result["cpu"] = {"yield_cost": y, "model_step": step}
        progress.console.log(
            f"CPU: greenlet yield {y['greenlet_yield_us']:.2f} us vs thread BASELINE "
            f"{y['thread_event_yield_us']:.2f} us; eager DBO / sequential CPU time "
            f"{step['ratios']['cpu_ms']['greenlet_dbo_vs_sequential']:.3f}x")
        if use_gpu:
            from bench import gpu_bench

            try:
                result["gpu"] = gpu_bench.run(args.out, args.quick, progress,
                                              log=progress.console.log)
            except Exception:  # keep the CPU figures; the JSON has the traceback
                result["gpu_error"] = traceback.format_exc()
                console.print_exception()
            if not args.no_shapes:
                from bench import shapes

                try:  # quick: 2 sizes, fewer replays
                    result["shapes"] = shapes.run(args.out, quick=args.quick,
                                                  log=progress.console.log)
                    write_json(args.out / f"bench-shapes-{stamp()}.json", result["shapes"])
                except Exception:
                    result["gpu_error"] = traceback.format_exc()
                    console.print_exception()
            if not args.no_hf:
                from bench import hf_bench

                try:  # quick: 4 layers, batches 64 and 256
                    result["hf"] = hf_bench.run(
                        args.out, ["qwen3_moe", "deepseek_v3"],
                        [64, 256] if args.quick else [64, 256, 1024], [0.0, 1.0, 2.0],
                        args.quick, log=progress.console.log)
                except Exception:
                    result["gpu_error"] = traceback.format_exc()
                    console.print_exception()

    report.print_run(console, result)
    if result.get("shapes"):
        console.print(report.shapes_table(result["shapes"]))
    if result.get("hf"):
        from bench import hf_bench

        hf_bench.print_tables(console, result["hf"])
    path = write_json(args.out / f"bench-{stamp()}.json", result)
    console.print(f"wrote {path}")
    result["path"] = str(path)
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("gpu_error") else 0)
