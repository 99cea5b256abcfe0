"""Rich tables of benchmark results, and a summary of the newest results in a folder.

``print_run`` prints the tables of one ``run_bench`` result (the dict it writes as JSON);
every table title states the hardware first. ``targets`` lists the benchmark targets with
the measured value and whether it is met (reported, never asserted).

The summary (the last step of ``bench/gpu_suite.sh``): the newest ``run_bench`` result's
1-GPU sweep as one grid and its targets, the depth stage's shares, the newest shapes
stage's table, the newest multi-GPU result per world size and link, and the other files
there.

    python3 -m bench.report [DIR]              # default: bench/results
    python3 -m bench.report [DIR] --markdown   # the newest shapes table, as markdown
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import COMM_TOLERANCE, RESULTS_DIR, make_console, share_from_graphs


def _hw_cpu(env: dict[str, Any]) -> str:
    return (f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores), Python "
            f"{env.get('python', '?')}, torch {env.get('torch', '?')}, greenlet "
            f"{env.get('greenlet', '?')}, {env.get('date', '?')}")


def _hw_gpu(env: dict[str, Any]) -> str:
    return (f"{env.get('gpu', '?')}, CUDA {env.get('cuda', '?')}, torch {env.get('torch', '?')}, "
            f"Python {env.get('python', '?')}, {env.get('date', '?')}")


def share_graphs_cell(row: dict[str, Any] | None) -> str:
    """The cross-check share (``share_from_graphs``: comm from the no-DBO graph), from the
    row's graph times, so also for files written before ``share_hidden_graphs``."""
    v = None if row is None else share_from_graphs(row["nodbo_graph_ms"],
                                                   row["dbo_graph_ms"], row["t_compute_ms"])
    return "-" if v is None else f"{v:.0%}"


def share_cell(row: dict[str, Any] | None) -> str:
    """A sweep row's share hidden, ``-`` when there is nothing to hide (or no row); marked
    ``?`` when a 1-GPU sweep row's simulated comm still differed between the no-DBO and
    the DBO step by more than ``COMM_TOLERANCE`` (its ``comm_mismatch``; the share then
    misstates the overlap). Multi-GPU rows carry no such field: their no-DBO and DBO
    steps move data differently by design."""
    if row is None or row["share_hidden"] is None:
        return "-"
    doubt = "?" if row.get("comm_mismatch", 0.0) > COMM_TOLERANCE else ""
    return f"{row['share_hidden']:.0%}{doubt}"


def cost_cell(row: dict[str, Any]) -> str:
    """What the cost model chose for a sweep row, and its time relative to no DBO."""
    cm = row.get("cost_model", {})
    return f"{'DBO' if cm.get('overlap') else 'off'} {cm.get('vs_nodbo', 1.0):.2f}x"


# The link of a multi-GPU result written before results named theirs.
DEFAULT_LINK = "NVLink"


def multigpu_table(result: dict[str, Any]) -> Table:
    """The torchrun benchmark (``bench_multigpu``): one row per tokens per microbatch."""
    env = result["env"]
    t = Table(title=f"{env['world_size']} x {env['gpu']} (NCCL {env.get('nccl')}, torch "
              f"{env['torch']}, CUDA {env.get('cuda')}), {env['date']}: DBO with "
              f"{env.get('backend', 'nccl')} all-to-all over "
              f"{result.get('link', DEFAULT_LINK)}"
              + (f", {steps} decode steps per graph" if (steps := result.get(
                  "decode_steps_per_graph", 1)) > 1 else "")
              + "\ntimes in ms: median per rank, max over ranks")
    for col in ("tokens/ub", "no-DBO graph ms", "DBO graph ms", "speedup", "ideal",
                "hidden", "compute ms (split)", "comm ms", "eager no-DBO / DBO ms",
                "cost model (t / t no-DBO)", "why"):
        t.add_column(col, justify="left" if col == "why" else "right")
    for r in result["sweep"]:
        t.add_row(str(r["tokens_per_ubatch"]), f"{r['nodbo_graph_ms']:.3f}",
                  f"{r['dbo_graph_ms']:.3f}", f"{r['speedup']:.2f}x",
                  f"{r['ideal_speedup']:.2f}x", share_cell(r),
                  f"{r['t_compute_ms']:.3f} ({r['t_compute_split_ms']:.3f})",
                  f"{r['t_comm_ms']:.3f}",
                  f"{r['nodbo_eager_ms']:.2f} / {r['dbo_eager_greenlet_ms']:.2f}",
                  cost_cell(r), r.get("explain", ""))
    return t


SHAPES_COLUMNS = ("shape", "plan s", "tok/ub", "steps", "planned (fallback) before dispatch",
                  "no-DBO ms", "DBO ms", "DBO fallback ms", "compute ms", "comm ms",
                  "speedup (ideal)", "hidden (fallback)", "predicted ms (error)",
                  "vs no-DBO (replay spread)")


def _shapes_cells(result: dict[str, Any]) -> list[list[str]]:
    """One list of cells (``SHAPES_COLUMNS``) per row of a ``bench.shapes`` result."""
    def share(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    def places(names: list[str]) -> str:
        return "+".join(names) or "none"

    def diff(r: dict[str, Any], v: float) -> str:
        return f"{v:.1e}" if r["outputs"] == "logits" else f"{v:.0%} tok"

    cells = []
    for r in result["rows"]:
        planned = places(r["planned_placement"])
        fallback = "same" if r["same_placement"] else places(r["fallback_placement"])
        cells.append([
            r["shape"], f"{result['shapes'][r['shape']]['planning_seconds']:.1f}",
            str(r["tokens_per_ubatch"]), str(r["decode_steps"]), f"{planned} ({fallback})",
            f"{r['nodbo_graph_ms']:.3f}", f"{r['dbo_graph_ms']:.3f}",
            f"{r['dbo_fallback_graph_ms']:.3f}", f"{r['t_compute_ms']:.3f}",
            f"{r['t_comm_ms']:.3f}", f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x)",
            f"{share(r['share_hidden'])} ({share(r['share_hidden_fallback'])})",
            f"{r['predicted_dbo_ms']:.3f} ({r['prediction_error']:+.1%})",
            f"{diff(r, r['diff_vs_nodbo'])} ({diff(r, r['replay_spread'])})"])
    return cells


def _shapes_title(result: dict[str, Any]) -> str:
    env = result["env"]
    return (f"1 x {env.get('gpu')} (torch {env.get('torch')}, CUDA {env.get('cuda')}), "
            f"{env.get('date')}: model shapes, DBO graph at comm = compute "
            f"({result.get('transfer', '?')} transfer), schedule planned at start-up")


def shapes_table(result: dict[str, Any]) -> Table:
    """The shapes stage (``bench.shapes``): one row per shape, size and decode steps per
    graph; planned placement against the threshold fallback, measured and predicted."""
    t = Table(title=_shapes_title(result) + "\nno-DBO: the two microbatches one after the "
              "other; times: medians of CUDA events; predicted: the planner's simulation")
    for col in SHAPES_COLUMNS:
        t.add_column(col, justify="left" if col in ("shape", SHAPES_COLUMNS[4]) else "right")
    for cells in _shapes_cells(result):
        t.add_row(*cells)
    return t


def shapes_markdown(result: dict[str, Any]) -> str:
    """``shapes_table`` as a markdown table under a one-line heading (for RESULTS.md)."""
    lines = [f"**{_shapes_title(result)}**", "",
             "| " + " | ".join(SHAPES_COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in SHAPES_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _shapes_cells(result)]
    return "\n".join(lines)


def yield_table(y: dict[str, float], hw: str) -> Table:
    """Host cost per yield: greenlet and the thread BASELINE, each kind against its own."""
    t = Table(title=f"Host cost of one hand-off (median us per yield) - {hw}"
              + (" - CUDA streams on" if y.get("cuda") else " - no CUDA"))
    t.add_column("hand-off")
    t.add_column("us / yield", justify="right")
    t.add_column("vs thread BASELINE (same kind)", justify="right")
    t.add_column("target", justify="right")
    rows = [("greenlet dbo_yield", "greenlet_yield_us", "thread_event_yield_us", "<= 0.10x"),
            ("greenlet dbo_yield_and_switch", "greenlet_switch_yield_us",
             "thread_event_switch_yield_us", "<= 0.25x"),
            ("BASELINE threads + Event: dbo_yield", "thread_event_yield_us",
             "thread_event_yield_us", ""),
            ("BASELINE threads + Event: dbo_yield_and_switch", "thread_event_switch_yield_us",
             "thread_event_switch_yield_us", "")]
    for name, key, base, target in rows:
        t.add_row(name, f"{y[key]:.2f}", f"{y[key] / y[base]:.3f}x", target)
    return t


def step_table(m: dict[str, Any], hw: str) -> Table:
    """The CPU stage's eager step of the reference model, per variant."""
    shape = m["shape"]
    t = Table(title=f"Eager step of the reference model on CPU (median of {m['repeats']}) - "
              f"{hw}\n{shape['num_layers']} layers, hidden {shape['hidden']}, "
              f"{shape['num_experts']} experts top-{shape['top_k']}, fp32, batch "
              f"{m['batch']} = 2 microbatches, {m['yields_per_ubatch']} yields each, "
              f"{m.get('intra_op_threads', '?')} intra-op thread")
    _variant_rows(t, m["median"], {"unsplit": "unsplit batch (no DBO)",
                                   "sequential": "2 microbatches one after the other",
                                   "greenlet_dbo": "greenlet DBO",
                                   "thread_dbo": "BASELINE thread DBO"}, vs_unsplit=True)
    return t


def _variant_rows(t: Table, med: dict[str, dict[str, float]], labels: dict[str, str],
                  vs_unsplit: bool) -> None:
    """Columns and one row per step variant: wall ms, CPU ms, CPU vs the sequential
    microbatches (and vs the unsplit batch)."""
    t.add_column("variant")
    t.add_column("wall ms", justify="right")
    t.add_column("CPU ms", justify="right")
    t.add_column("CPU vs sequential", justify="right")
    if vs_unsplit:
        t.add_column("CPU vs unsplit", justify="right")
    for k, label in labels.items():
        cpu = med[k]["cpu_ms"]
        cells = [label, f"{med[k]['wall_ms']:.3f}", f"{cpu:.3f}",
                 f"{cpu / med['sequential']['cpu_ms']:.3f}x"]
        if vs_unsplit:
            cells.append(f"{cpu / med['unsplit']['cpu_ms']:.3f}x")
        t.add_row(*cells)


def sweep_table(g: dict[str, Any]) -> Table:
    """The 1-GPU sweep (``gpu_bench``), one row per point."""
    shape = g["shape"]
    t = Table(title=f"1 GPU, simulated comm - {_hw_gpu(g['env'])}\n"
              f"{shape['num_layers']} layers, hidden {shape['hidden']}, "
              f"{shape['num_experts']} experts top-{shape['top_k']}, bf16; batch = 2 "
              "microbatches; times are medians (ms) of CUDA events")
    for col in ("tok/ub", "comm/comp", "c us", "no-DBO graph", "DBO graph", "speedup",
                "ideal", "hidden", "eager greenlet", "eager thread", "cost model", "why"):
        t.add_column(col, justify="left" if col == "why" else "right")
    for r in g["sweep"]:
        t.add_row(str(r["tokens_per_ubatch"]), f"{r['ratio']:g}", f"{r['c_layer_us']:.0f}",
                  f"{r['nodbo_graph_ms']:.3f}", f"{r['dbo_graph_ms']:.3f}",
                  f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", share_cell(r),
                  f"{r['dbo_eager_greenlet_ms']:.2f}", f"{r['dbo_eager_thread_ms']:.2f}",
                  cost_cell(r), r.get("explain", ""))
    return t


def host_table(h: dict[str, Any], env: dict[str, Any]) -> Table:
    """Host time to issue one eager step on the GPU host, per variant."""
    t = Table(title=f"Host time to issue one eager step (median of {h['repeats']}) - "
              f"{env.get('gpu')} host, {env.get('cpu')}, Python {env.get('python')}\n"
              f"{h['tokens_per_ubatch']} tokens per microbatch, comm/compute "
              f"{h['ratio']:g}")
    _variant_rows(t, h["median"], {"unsplit": "unsplit batch",
                                   "sequential": "sequential microbatches",
                                   "greenlet_dbo": "greenlet DBO",
                                   "thread_dbo": "BASELINE thread DBO"}, vs_unsplit=False)
    return t


def targets(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(target, measured, verdict)`` for each benchmark target this result covers."""
    out = []

    def add(name: str, value: float | None, limit: float, fmt: str, ge: bool = False) -> None:
        if value is None:
            out.append((name, "n/a", "not measured"))
            return
        ok = value >= limit if ge else value <= limit
        out.append((name, fmt.format(value), "met" if ok else "MISSED"))

    cpu = result.get("cpu")
    if cpu:
        y = cpu["yield_cost"]
        add("CPU: greenlet yield <= 1/10 of thread hand-off", y["plain_vs_thread"], 0.10,
            "{:.3f}x")
        add("CPU: greenlet switching yield <= 1/4 of thread hand-off", y["switch_vs_thread"],
            0.25, "{:.3f}x")
        add("CPU: eager DBO step CPU time <= 1.05x sequential microbatches",
            cpu["model_step"]["ratios"]["cpu_ms"]["greenlet_dbo_vs_sequential"], 1.05,
            "{:.3f}x")
    gpu = result.get("gpu")
    if gpu:
        y = gpu["yield_cost_cuda"]
        add("GPU host: greenlet yield <= 1/10 of thread hand-off", y["plain_vs_thread"], 0.10,
            "{:.3f}x")
        add("GPU host: greenlet switching yield <= 1/4 of thread hand-off",
            y["switch_vs_thread"], 0.25, "{:.3f}x")
        h = gpu.get("host_overhead")
        add("GPU host: eager DBO step CPU time <= 1.05x sequential microbatches",
            h["greenlet_dbo_vs_sequential_cpu"] if h else None, 1.05, "{:.3f}x")
        ones = [r for r in gpu["sweep"] if r["ratio"] == 1.0 and r["share_hidden"] is not None]
        worst = min((r["share_hidden"] for r in ones), default=None)
        add(f"1 GPU, comm = compute: DBO graph hides >= 90% of the hideable time (worst T, "
            f"{gpu['shape']['num_layers']} layers, transfer {gpu.get('transfer', 'spin')})",
            worst, 0.90, "{:.0%}", ge=True)
        cm = gpu.get("cost_model", {}).get("worst_vs_nodbo")
        add("DBO with cost model never measurably slower than no DBO (worst t/t_noDBO, "
            "held-out half)", cm, 1.03, "{:.3f}x")
    return out


def targets_table(result: dict[str, Any]) -> Table:
    """``targets`` as a table."""
    t = Table(title="Benchmark targets (reported, not asserted)")
    t.add_column("target")
    t.add_column("measured", justify="right")
    t.add_column("verdict")
    for name, value, verdict in targets(result):
        t.add_row(name, value, verdict)
    return t


def print_run(console: Console, result: dict[str, Any]) -> None:
    """All tables of one ``run_bench`` result."""
    cpu = result.get("cpu")
    if cpu:
        hw = _hw_cpu(result["env"])
        console.print(yield_table(cpu["yield_cost"], hw))
        console.print(step_table(cpu["model_step"], hw))
    gpu = result.get("gpu")
    if gpu:
        console.print(yield_table(gpu["yield_cost_cuda"], _hw_gpu(gpu["env"])))
        console.print(sweep_table(gpu))
        if gpu.get("host_overhead"):
            console.print(host_table(gpu["host_overhead"], gpu["env"]))
        for k in ("trace_file", "plot_file"):
            if gpu.get(k):
                console.print(f"{k}: {gpu[k]}")
        console.print(f"calibration file: {gpu['cost_model']['file']}")
    console.print(targets_table(result))


# -- summary of a results folder ---------------------------------------------------------

def newest(out_dir: Path, pattern: str) -> Path | None:
    """The most recently modified file in ``out_dir`` matching ``pattern``, if any."""
    files = sorted(out_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def newest_per_link(out_dir: Path, world: int) -> list[Path]:
    """The newest multi-GPU result of ``world`` ranks per link (``NVLink``, slow link),
    oldest link first."""
    found: dict[str, Path] = {}
    files = sorted(out_dir.glob(f"bench-multigpu-ep{world}-*.json"),
                   key=lambda p: p.stat().st_mtime)
    for f in files:
        found[json.loads(f.read_text()).get("link", DEFAULT_LINK)] = f
    return sorted(found.values(), key=lambda p: p.stat().st_mtime)


def one_gpu_table(gpu: dict[str, Any]) -> Table:
    """Speedup (ideal) per tokens per microbatch x ratio: the sweep in one grid."""
    env = gpu["env"]
    # "\\[" keeps rich from reading "[share hidden]" as markup (it dropped the words).
    t = Table(title=f"1 x {env['gpu']}: DBO graph speedup (ideal) \\[share hidden], "
              "simulated comm")
    ratios = gpu["ratios"]
    t.add_column("tok/ub", justify="right")
    for r in ratios:
        t.add_column(f"comm/comp {r:g}", justify="right")
    for tok in gpu["tokens"]:
        cells = []
        for r in ratios:
            row = next((x for x in gpu["sweep"] if x["tokens_per_ubatch"] == tok
                        and x["ratio"] == r), None)
            if row is None:
                cells.append("-")
                continue
            cells.append(f"{row['speedup']:.2f} ({row['ideal_speedup']:.2f}) "
                         f"[{share_cell(row)}]")
        t.add_row(str(tok), *cells)
    return t


def depth_table(files: list[Path]) -> Table | None:
    """Share hidden at comm = compute by depth and decode steps per graph (the JSON of
    ``gpu_suite.sh``'s ``depth`` stage); ``None`` without such rows."""
    rows = []
    for f in files:
        res = json.loads(f.read_text())
        for r in res.get("sweep", []):
            if r["ratio"] == 1.0:
                overrides = " ".join(f"{k}={v}" for k, v in
                                     res.get("config_overrides", {}).items())
                rows.append(((res["shape"]["num_layers"],
                              res["shape"].get("decode_steps_per_graph", 1),
                              res.get("transfer", "?") + (f" {overrides}" if overrides
                                                          else "")),
                             r["tokens_per_ubatch"], r))
    if not rows:
        return None
    t = Table(title="DBO graph at comm = compute by depth: share hidden, transfers timed "
              "alone / from the graphs (DBO / no-DBO ms)")
    t.add_column("layers", justify="right")
    t.add_column("steps / graph", justify="right")
    t.add_column("transfer, config")
    tokens = sorted({tok for _, tok, _ in rows})
    for tok in tokens:
        t.add_column(f"{tok} tok/ub", justify="right")
    for key in sorted({k for k, _, _ in rows}):
        cells = []
        for tok in tokens:
            r = next((r for k, tk, r in rows if k == key and tk == tok), None)
            cells.append("-" if r is None else f"{share_cell(r)} / {share_graphs_cell(r)} "
                         f"({r['dbo_graph_ms']:.2f} / {r['nodbo_graph_ms']:.2f})")
        t.add_row(str(key[0]), str(key[1]), key[2], *cells)
    return t


def print_summary(console: Console, out_dir: Path) -> None:
    """The summary of the newest results in ``out_dir`` (see the module docstring)."""
    console.rule(f"coop-dbo bench summary: {out_dir}")
    main_file = newest(out_dir, "bench-2*.json")
    if main_file is not None:
        res = json.loads(main_file.read_text())
        console.print(f"[bold]{main_file.name}[/bold]")
        if res.get("gpu"):
            console.print(one_gpu_table(res["gpu"]))
        console.print(targets_table(res))
    else:
        console.print("no bench-<stamp>.json (python3 -m bench.run_bench) here")
    depth = depth_table(sorted((out_dir / "depth").glob("bench-1gpu-*.json")))
    if depth is not None:
        console.print(depth)
    shapes = newest(out_dir, "bench-shapes-*.json")
    if shapes is not None:
        console.print(f"[bold]{shapes.name}[/bold]")
        console.print(shapes_table(json.loads(shapes.read_text())))
    for world in (2, 4, 8):
        for f in newest_per_link(out_dir, world):
            console.print(f"[bold]{f.name}[/bold]")
            console.print(multigpu_table(json.loads(f.read_text())))
    others = sorted(p.name for p in out_dir.glob("*") if p.suffix in (".png", ".log")
                    or p.name.endswith(".trace.json") or p.name.startswith("calibration-"))
    if others:
        console.print("files: " + ", ".join(others))


def main(argv: list[str] | None = None) -> None:
    """``python3 -m bench.report [DIR] [--markdown]``: the summary of DIR (default
    bench/results); with ``--markdown``, the newest shapes result there as markdown."""
    argv = list(sys.argv[1:] if argv is None else argv)
    markdown = "--markdown" in argv
    dirs = [a for a in argv if a != "--markdown"]
    out_dir = Path(dirs[0]) if dirs else RESULTS_DIR
    if not markdown:
        print_summary(make_console(), out_dir)
        return
    f = newest(out_dir, "bench-shapes-*.json")
    if f is None:
        raise SystemExit(f"no bench-shapes-<stamp>.json in {out_dir}: run python3 -m "
                         "bench.shapes first.")
    print(shapes_markdown(json.loads(f.read_text())))


if __name__ == "__main__":
    main()
