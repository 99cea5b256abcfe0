"""The trace record: one yield of one microbatch (a leaf module: imports nothing of coop_dbo)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TraceEntry", "UBatchPosition"]


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One yield of one microbatch.

    Attributes:
        ubatch: microbatch id.
        index: this yield's count within its microbatch, from 0.
        site: the site name the model passed to the yield.
        stream: ``"compute"``, ``"comm"``, another stream's id, or ``"cpu"`` without CUDA:
            the stream the microbatch was on when it yielded.
        kind: ``"yield"``, or ``"switch->comm"`` / ``"switch->compute"`` for a stream
            switch (also on the CPU, where it does not change streams).
        time_us: microseconds since the step started.
    """

    ubatch: int
    index: int
    site: str
    stream: str
    kind: str
    time_us: float


@dataclass(frozen=True, slots=True)
class UBatchPosition:
    """Where one microbatch of a running (or failed) step stands.

    Attributes:
        ubatch: microbatch id.
        state: ``"running"`` (it has the thread), ``"parked"`` (suspended at a yield),
            ``"done"`` (returned), ``"raised"`` (its exception ended the step),
            ``"unwound"`` (parked when the step failed, then unwound) or
            ``"not started"``.
        index: yields it made so far (the index of its next yield).
        site / kind: site and kind of its last yield (``None`` before the first).
        stream: the stream it was on at its last yield (``"cpu"`` without CUDA).
    """

    ubatch: int
    state: str
    index: int
    site: str | None
    kind: str | None
    stream: str
