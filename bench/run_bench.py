"""`make bench`: what greenlet DBO buys, and where.

Stage 1 (any machine): host cost of one microbatch hand-off, greenlet scheduler against
the thread baseline. Later stages (GPU sweeps) are added by the GPU benchmarks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import yield_cost

RESULTS_DIR = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    args = parser.parse_args(argv)
    console = Console()
    import torch

    env = {"host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    y = yield_cost.measure(num_yields=2_000 if args.quick else 20_000,
                           repeats=3 if args.quick else 7)
    table = Table(title=f"Host cost of one hand-off (median us) - {env['gpu'] or 'CPU'}, "
                  f"Python {env['python']}, torch {env['torch']}")
    table.add_column("hand-off")
    table.add_column("us / yield", justify="right")
    table.add_column("vs thread baseline", justify="right")
    base = y["thread_event_yield_us"]
    for name, key in [("greenlet dbo_yield", "greenlet_yield_us"),
                      ("greenlet dbo_yield_and_switch", "greenlet_switch_yield_us"),
                      ("BASELINE threads + Event", "thread_event_yield_us")]:
        table.add_row(name, f"{y[key]:.2f}", f"{y[key] / base:.3f}x")
    console.print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"env": env, "yield_cost": y}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
