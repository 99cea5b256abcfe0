"""Yield traces: what the scheduler records, and a rich printer for it.

``UBatchScheduler(trace=True)`` appends one ``TraceEntry`` per yield, in the order the
yields happened. ``print_trace`` renders them as one lane per microbatch, so the
interleaving reads top to bottom; for a ``YieldAsymmetryError`` it marks the point of
divergence. ``python -m coop_dbo.trace --demo`` prints a real run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TraceEntry", "print_trace", "format_trace"]


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One yield of one microbatch.

    Attributes:
        ubatch: microbatch id.
        index: this yield's count within its microbatch, from 0.
        site: the site name the model passed to the yield.
        stream: ``"compute"``, ``"comm"``, another stream's id, or ``"cpu"`` without CUDA:
            the stream the microbatch was on when it yielded.
        kind: ``"yield"``, ``"switch"`` (stream switch on CPU) or ``"switch->comm"`` /
            ``"switch->compute"``.
        time_us: microseconds since the step started.
    """

    ubatch: int
    index: int
    site: str
    stream: str
    kind: str
    time_us: float


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


def _demo() -> None:
    from ..errors import YieldAsymmetryError
    from ..greenlet_sched import UBatchScheduler, dbo_yield, dbo_yield_and_switch

    def layer_program(ub: int, num_layers: int) -> int:
        total = ub
        for layer in range(num_layers):
            total += layer  # attention + gate
            dbo_yield_and_switch("comm", f"L{layer}.dispatch")
            total *= 2  # dispatch all-to-all
            dbo_yield_and_switch("compute", f"L{layer}.experts")
            total -= 1  # experts
            dbo_yield_and_switch("comm", f"L{layer}.combine")
            dbo_yield_and_switch("compute", f"L{layer}.post")
        return total

    sched = UBatchScheduler(2, trace=True)
    sched.run([lambda: layer_program(0, 2), lambda: layer_program(1, 2)])
    print_trace(sched.last_trace)

    def skips_a_yield(ub: int) -> None:
        dbo_yield("dispatch")
        if ub == 1:  # a routing corner case: no tokens, and the model skips the yield
            return
        dbo_yield("combine")

    try:
        sched.run([lambda: skips_a_yield(0), lambda: skips_a_yield(1)])
    except YieldAsymmetryError as err:
        print_trace(err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coop_dbo.trace",
                                     description="Print coop_dbo yield traces.")
    parser.add_argument("--demo", action="store_true",
                        help="run a two-microbatch demo step and print its trace, then "
                        "an asymmetric step and its error")
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return
    _demo()

