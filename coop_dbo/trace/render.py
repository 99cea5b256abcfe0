"""Render yield traces with rich: one row per yield, one lane per microbatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .record import TraceEntry

__all__ = ["print_trace", "format_trace"]


_LANE_STYLES = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
                "bright_magenta"]


def _build_table(trace: Sequence[TraceEntry], error: BaseException | None) -> Any:
    from rich.table import Table
    from rich.text import Text

    num_lanes = max([e.ubatch for e in trace] + [getattr(error, "ubatch", -1), 0]) + 1
    table = Table(title="coop_dbo yield trace", show_lines=False, header_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column("t (us)", justify="right", style="dim")
    for lane in range(num_lanes):
        table.add_column(f"ub{lane}", style=_LANE_STYLES[lane % len(_LANE_STYLES)])
    for order, entry in enumerate(trace):
        cells: list[Any] = [""] * num_lanes
        arrow = "" if entry.kind in ("yield", "switch") else " " + entry.kind.replace(
            "switch", "")
        cells[entry.ubatch] = Text(f"{entry.index}: {entry.site or '-'} [{entry.stream}]{arrow}")
        table.add_row(str(order), f"{entry.time_us:.1f}", *cells)
    ubatch = getattr(error, "ubatch", None)
    if ubatch is not None:
        cells = [""] * num_lanes
        actual = getattr(error, "actual_site", None)
        expected = getattr(error, "expected_site", None)
        got = "returned" if actual is None else f"yield at {actual!r}"
        want = "return" if expected is None else f"yield at {expected!r}"
        cells[ubatch] = Text(f"X {getattr(error, 'index', '?')}: {got}, expected {want}")
        table.add_row("X", "", *cells, style="bold white on red")
    return table


def print_trace(trace: Sequence[TraceEntry] | BaseException, *,
                error: BaseException | None = None, console: Any = None) -> None:
    """Render a trace with rich: one row per yield, one lane (column) per microbatch.

    Args:
        trace: ``scheduler.last_trace``, or a ``YieldAsymmetryError`` (its own trace is
            printed with the divergence marked).
        error: a ``YieldAsymmetryError`` whose point of divergence to mark.
        console: a ``rich.console.Console`` to print to (default: a new one on stdout).
    """
    from rich.console import Console
    from rich.text import Text

    if isinstance(trace, BaseException):
        error = trace
        trace = getattr(trace, "trace", None) or []
    console = console or Console()
    console.print(_build_table(list(trace), error))
    if error is not None:
        console.print(Text.assemble((f"{type(error).__name__}: ", "bold red"), str(error)))


def format_trace(trace: Sequence[TraceEntry] | BaseException, *,
                 error: BaseException | None = None, width: int = 120) -> str:
    """``print_trace`` into a plain string (no colours)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    print_trace(trace, error=error,
                console=Console(file=buf, width=width, color_system=None))
    return buf.getvalue()
