"""One view of several ranks: their yield traces side by side, and one Chrome trace.

The input is one JSON record per rank (``format`` ``coop_dbo.rank/1``): the dumps a
runner's watchdog or a failed step writes (``coop_dbo-step<N>-rank<R>.json``, see
``coop_dbo.forensics``), or ``write_rank_trace`` of a good step. Every rank runs the
same interleaving, so the ``k``-th yield of each rank's trace should be the same
(microbatch, index, site, kind); the first row where they are not, or where one trace
ends before the others, is the **first divergence**. It is highlighted in the table and
marked in the Chrome trace (``chrome://tracing`` or https://ui.perfetto.dev: one process
per rank, one thread per microbatch, one slice per stretch a microbatch ran between two
yields; each rank's clock starts at its step's start).

``python -m coop_dbo.trace merge rank0.json rank1.json [-o merged.json]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .record import TraceEntry

__all__ = [
    "RECORD_FORMAT",
    "load_rank_file",
    "write_rank_trace",
    "first_divergence",
    "format_merged",
    "print_merged",
    "chrome_trace",
]

RECORD_FORMAT = "coop_dbo.rank/1"


def load_rank_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one rank's record; ``ValueError`` naming the file if it is not one."""
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)} is not JSON ({exc}); pass the files a "
                             "coop_dbo dump or write_rank_trace wrote.") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a coop_dbo rank record (its format "
                         f"field is {record.get('format') if isinstance(record, dict) else None!r}"
                         f", expected {RECORD_FORMAT!r}).")
    return record


def write_rank_trace(path: str | os.PathLike[str], trace: Sequence[TraceEntry], *,
                     rank: int, world: int, step: int = 0) -> None:
    """Write a good step's trace (``runner.last_trace``) as this rank's record."""
    record = {"format": RECORD_FORMAT, "event": "trace", "rank": rank, "world": world,
              "step": step, "phase": "run", "elapsed_s": 0.0, "limit_s": None,
              "error": None, "ubatches": [], "schedule": None,
              "trace": [{"ubatch": e.ubatch, "index": e.index, "site": e.site,
                         "stream": e.stream, "kind": e.kind, "time_us": e.time_us}
                        for e in trace]}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def _key(entry: dict[str, Any]) -> tuple:
    return entry["ubatch"], entry["index"], entry["site"], entry["kind"]


def first_divergence(records: Sequence[dict[str, Any]]) -> int | None:
    """The first row (yield order) where the ranks' traces differ, or where some
    trace has ended and another has not; ``None`` when they agree throughout."""
    traces = [r["trace"] for r in records]
    longest = max((len(t) for t in traces), default=0)
    for row in range(longest):
        keys = {_key(t[row]) if row < len(t) else None for t in traces}
        if len(keys) > 1:
            return row
    return None


def _cell(entry: dict[str, Any]) -> str:
    arrow = "" if entry["kind"] in ("yield", "switch") else " " + entry["kind"].replace(
        "switch", "")
    return f"ub{entry['ubatch']} {entry['index']}: {entry['site'] or '-'}{arrow}"


def _position(u: dict[str, Any]) -> str:
    op = f" in {u['op']}" if u.get("op") else ""
    since = (f", {u['since_yield_s']:.2f} s since yield"
             if u.get("since_yield_s") is not None else "")
    return f"ub{u['ubatch']} {u['state']} @{u['index']} {u['site'] or '-'}{op}{since}"


def _table(records: Sequence[dict[str, Any]]) -> Any:
    from rich.table import Table
    from rich.text import Text

    records = sorted(records, key=lambda r: r["rank"])
    row_div = first_divergence(records)
    steps = sorted({r["step"] for r in records})
    table = Table(title=f"coop_dbo: {len(records)} ranks, step {', '.join(map(str, steps))}",
                  header_style="bold")
    table.add_column("#", justify="right", style="dim")
    for r in records:
        table.add_column(f"rank {r['rank']} ({r['event']})")
    longest = max((len(r["trace"]) for r in records), default=0)
    for row in range(longest):
        cells = [Text(_cell(r["trace"][row])) if row < len(r["trace"]) else Text("(end)")
                 for r in records]
        if row == row_div:
            table.add_row(Text(f"{row} X"), *cells, style="bold white on red")
        else:
            table.add_row(str(row), *cells)
    if any(r["ubatches"] for r in records):
        table.add_section()
        width = max(len(r["ubatches"]) for r in records)
        for i in range(width):
            cells = [Text(_position(r["ubatches"][i])) if i < len(r["ubatches"]) else Text("")
                     for r in records]
            table.add_row("stood", *cells, style="yellow")
    return table, row_div, records


def _where(u: dict[str, Any]) -> tuple:
    return u["ubatch"], u["index"], u["site"]


def _summary(records: Sequence[dict[str, Any]], row: int | None) -> str:
    if row is None:
        stood = [[_where(u) for u in r["ubatches"]] for r in records if r["ubatches"]]
        if len({tuple(s) for s in stood}) > 1:
            first = next(i for i in range(max(len(s) for s in stood))
                         if len({s[i] if i < len(s) else None for s in stood}) > 1)
            return ("The ranks' traces agree at every yield, but their microbatches stood "
                    "at different points: " + "; ".join(
                        f"rank {r['rank']}: " + (_position(r["ubatches"][first])
                                                 if first < len(r["ubatches"]) else "-")
                        for r in records if r["ubatches"]) + ".")
        return "The ranks' traces agree at every yield."
    parts = []
    for r in records:
        t = r["trace"]
        parts.append(f"rank {r['rank']}: " + (_cell(t[row]) if row < len(t) else "(end)"))
    return f"First divergence at yield {row} of the step: " + "; ".join(parts) + "."


def print_merged(records: Sequence[dict[str, Any]], console: Any = None) -> int | None:
    """Print the ranks side by side with rich; returns the first divergence's row."""
    from rich.console import Console

    if console is None:
        console = Console()
        console.width = max(console.width, 120)  # not a terminal: rich assumes 80
    table, row, ordered = _table(records)
    console.print(table)
    for r in ordered:
        if r.get("error"):
            console.print(f"rank {r['rank']}: {r['error']}", markup=False, highlight=False)
    console.print(_summary(ordered, row), style="bold red" if row is not None else None,
                  markup=False, highlight=False)
    return row


def format_merged(records: Sequence[dict[str, Any]], width: int = 160) -> str:
    """``print_merged`` into a plain string (no colours)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    print_merged(records, Console(file=buf, width=width, color_system=None))
    return buf.getvalue()


def chrome_trace(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ranks as one Chrome trace (the JSON object format of ``chrome://tracing``).

    Per rank (``pid``) and microbatch (``tid``): a complete event ("X") per stretch the
    microbatch ran before each yield, named by the site it yielded at; an instant event
    per microbatch position of a dump; and a global instant event at the first
    divergence (on the lowest rank whose trace has that row, or that ends there).
    """
    events: list[dict[str, Any]] = []
    ordered = sorted(records, key=lambda r: r["rank"])
    row_div = first_divergence(ordered)
    for r in ordered:
        pid = r["rank"]
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"rank {pid} ({r['event']}, step {r['step']})"}})
        trace = r["trace"]
        for ub in sorted({e["ubatch"] for e in trace} | {u["ubatch"] for u in r["ubatches"]}):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": ub,
                           "args": {"name": f"ub{ub}"}})
        start = 0.0  # a stretch starts at the previous yield of any microbatch
        for row, e in enumerate(trace):
            events.append({"name": e["site"] or "-", "cat": "yield", "ph": "X",
                           "ts": start, "dur": max(e["time_us"] - start, 0.0), "pid": pid,
                           "tid": e["ubatch"],
                           "args": {"row": row, "index": e["index"], "kind": e["kind"],
                                    "stream": e["stream"]}})
            start = e["time_us"]
        end_us = max(start, r.get("elapsed_s", 0.0) * 1e6)
        for u in r["ubatches"]:
            events.append({"name": f"{u['state']} at {u['site'] or '-'}"
                           + (f" in {u['op']}" if u.get("op") else ""),
                           "cat": "position", "ph": "i", "s": "t", "ts": end_us, "pid": pid,
                           "tid": u["ubatch"], "args": dict(u)})
    if row_div is not None:
        for r in ordered:
            t = r["trace"]
            if row_div < len(t) or t:
                at = t[row_div] if row_div < len(t) else t[-1]
                events.append({"name": f"first divergence (yield {row_div})", "ph": "i",
                               "s": "g", "ts": at["time_us"], "pid": r["rank"],
                               "tid": at["ubatch"], "cat": "divergence",
                               "args": {"summary": _summary(ordered, row_div)}})
                break
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"coop_dbo_first_divergence": row_div}}
