"""Short summary of the newest benchmark results in a directory (last step of gpu_suite.sh).

    python3 -m bench.summary [DIR]        # default: bench/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from bench import report
from bench.common import RESULTS_DIR, make_console


def newest(out_dir: Path, pattern: str) -> Path | None:
    files = sorted(out_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def one_gpu_table(gpu: dict[str, Any]) -> Table:
    """Speedup (ideal) per tokens per microbatch x ratio: the sweep in one grid."""
    env = gpu["env"]
    t = Table(title=f"1 x {env['gpu']}: DBO graph speedup (ideal) [share hidden], "
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
                         f"[{report.share_cell(row)}]")
        t.add_row(str(tok), *cells)
    return t


def depth_table(files: list[Path]) -> Table | None:
    """Share hidden at comm = compute by depth and decode steps per graph (the gpu_suite
    ``depth`` stage's JSON)."""
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
            cells.append("-" if r is None else f"{report.share_cell(r)} / "
                         f"{report.share_graphs_cell(r)} "
                         f"({r['dbo_graph_ms']:.2f} / {r['nodbo_graph_ms']:.2f})")
        t.add_row(str(key[0]), str(key[1]), key[2], *cells)
    return t


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else RESULTS_DIR
    console = make_console()
    console.rule(f"coop-dbo bench summary: {out_dir}")
    main_file = newest(out_dir, "bench-2*.json")
    if main_file is not None:
        res = json.loads(main_file.read_text())
        console.print(f"[bold]{main_file.name}[/bold]")
        if res.get("gpu"):
            console.print(one_gpu_table(res["gpu"]))
        console.print(report.targets_table(res))
    else:
        console.print("no bench-<stamp>.json (python3 -m bench.run_bench) here")
    depth = depth_table(sorted((out_dir / "depth").glob("bench-1gpu-*.json")))
    if depth is not None:
        console.print(depth)
    for world in (2, 4, 8):
        f = newest(out_dir, f"bench-multigpu-ep{world}-*.json")
        if f is not None:
            console.print(f"[bold]{f.name}[/bold]")
            console.print(report.multigpu_table(json.loads(f.read_text())))
    others = sorted(p.name for p in out_dir.glob("*") if p.suffix in (".png", ".log")
                    or p.name.endswith(".trace.json") or p.name.startswith("calibration-"))
    if others:
        console.print("files: " + ", ".join(others))


if __name__ == "__main__":
    main()
