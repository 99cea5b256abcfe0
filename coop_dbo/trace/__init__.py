"""Yield traces: what the scheduler records, and a rich printer for it.

``UBatchScheduler(trace=True)`` appends one ``TraceEntry`` (``record``) per yield, in the
order the yields happened. ``print_trace`` (``render``) renders them as one lane per
microbatch, so the interleaving reads top to bottom; for a ``YieldAsymmetryError`` it
marks the point of divergence. ``python -m coop_dbo.trace --demo`` prints a real run.
"""

from .record import TraceEntry
from .render import format_trace, print_trace

__all__ = ["TraceEntry", "print_trace", "format_trace"]
