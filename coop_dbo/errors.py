"""All exceptions raised by coop_dbo, in one place."""

from __future__ import annotations

__all__ = [
    "CoopDBOError",
    "YieldAsymmetryError",
    "SchedulerStateError",
    "CaptureError",
    "UnsupportedModelError",
    "SplitError",
    "ScheduleMismatchError",
    "StepTimeoutError",
    "PeerRankError",
    "GroupBrokenError",
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
        agreed: the step ran under an agreed schedule (``UBatchScheduler.run(schedule=)``):
            ``expected_site`` is that schedule's site at ``index``.
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
        agreed: bool = False,
    ) -> None:
        super().__init__(message)
        self.ubatch = ubatch
        self.index = index
        self.expected_site = expected_site
        self.actual_site = actual_site
        self.counts = counts
        self.trace = trace
        self.agreed = agreed


class SchedulerStateError(CoopDBOError, RuntimeError):
    """The scheduler was used in a way its state does not allow (e.g. nested ``run``)."""


class CaptureError(CoopDBOError, RuntimeError):
    """CUDA graph capture is unavailable or failed."""


class UnsupportedModelError(CoopDBOError, TypeError):
    """The MoE hooks do not recognise a block of the model."""


class SplitError(CoopDBOError, ValueError):
    """The runner cannot split an argument into microbatches."""


class ScheduleMismatchError(CoopDBOError, RuntimeError):
    """The ranks of a process group would run, or ran, different DBO schedules.

    Raised on every rank, before the step when the ranks' fingerprints differ, or during
    it when one rank leaves the schedule the ranks agreed on (that rank raises at once and
    its peers when their next collective with it fails).

    Attributes:
        step: the runner's call count, the same on every rank.
        index: the first yield index (of one microbatch) where the sequences differ;
            ``None`` when the ranks differ in their setup (``setups``).
        sites: ``{rank: site}`` at ``index`` for the two ranks compared (``None``: that
            rank's sequence ends there, or it is not known); key ``-1`` is the schedule
            the ranks agreed on, where one rank left it during the step.
        sequences: ``{rank: [site, ...]}``, the two yield sequences compared (key
            ``-1`` as in ``sites``).
        setups: ``{rank: description}`` of every rank (microbatch count, graph sizes).
    """

    def __init__(self, message: str, *, step: int, index: int | None = None,
                 sites: dict[int, str | None] | None = None,
                 sequences: dict[int, list[str]] | None = None,
                 setups: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.index = index
        self.sites = sites or {}
        self.sequences = sequences or {}
        self.setups = setups or {}


class StepTimeoutError(CoopDBOError, TimeoutError):
    """A runner step ran longer than its watchdog limit (``CoopDBORunner(watchdog_s=)``).

    Attributes:
        step: the runner's call count.
        limit_s: the limit, seconds.
        dump: path of the JSON file that says where each microbatch stood.
        rank: the rank whose watchdog fired (this one, or a peer).
    """

    def __init__(self, message: str = "", *, step: int = -1, limit_s: float = 0.0,
                 dump: str | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.limit_s = limit_s
        self.dump = dump
        self.rank = rank


class PeerRankError(CoopDBOError, RuntimeError):
    """A peer rank failed in the middle of a step; this rank stopped because of it.

    Attributes:
        step: the runner's call count.
        rank: the rank that failed first.
        error: its exception, as ``"Type: message"``.
    """

    def __init__(self, message: str, *, step: int, rank: int, error: str) -> None:
        super().__init__(message)
        self.step = step
        self.rank = rank
        self.error = error


class GroupBrokenError(CoopDBOError, RuntimeError):
    """The runner's process group was aborted by coop_dbo after a failed step (so that no
    rank waited for it), and it is still the runner's group: make a new one."""
