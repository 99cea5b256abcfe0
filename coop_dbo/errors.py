"""All exceptions raised by coop_dbo, in one place."""

from __future__ import annotations

__all__ = [
    "CoopDBOError",
    "YieldAsymmetryError",
    "SchedulerStateError",
    "CaptureError",
    "UnsupportedModelError",
    "SplitError",
]


class CoopDBOError(Exception):
    """Base class of every error coop_dbo raises on its own account."""


class YieldAsymmetryError(CoopDBOError, RuntimeError):
    """Microbatches of one step yielded a different number of times or at different sites.

    Attributes:
        ubatch: the microbatch whose yield (or return) revealed the divergence.
        index: the yield index (0-based, within that microbatch) where it diverged.
        expected_site / actual_site: the site the others used at ``index`` and the
            site this microbatch used (``None`` where one of them had finished).
        counts: yields made so far, per microbatch.
        trace: the trace of the failing step when the scheduler traces, else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        ubatch: int,
        index: int,
        expected_site: str | None,
        actual_site: str | None,
        counts: list[int],
        trace: list | None = None,
    ) -> None:
        super().__init__(message)
        self.ubatch = ubatch
        self.index = index
        self.expected_site = expected_site
        self.actual_site = actual_site
        self.counts = counts
        self.trace = trace


class SchedulerStateError(CoopDBOError, RuntimeError):
    """The scheduler was used in a way its state does not allow (e.g. nested ``run``)."""


class CaptureError(CoopDBOError, RuntimeError):
    """CUDA graph capture is unavailable or failed."""


class UnsupportedModelError(CoopDBOError, TypeError):
    """The MoE hooks do not recognise a block of the model."""


class SplitError(CoopDBOError, ValueError):
    """The runner cannot split an argument into microbatches."""
