"""The trace record: one yield of one microbatch (a leaf module: imports nothing of coop_dbo)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TraceEntry"]


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
