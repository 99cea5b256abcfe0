"""Deciding by measuring: per batch bucket, run the first steps both ways, keep the faster.

DBO does not always pay (a split makes memory-bound matmuls read their weights once per
microbatch, and two microbatches double the host work of an eager step). Without a
calibration file ``CoopDBORunner`` therefore measures on the user's own model, GPU and
link: for each **bucket** of batch sizes (the next power of two of the batch that every
rank agreed on), the first steps alternate between the plain path and the DBO path, each
timed (CUDA events on a GPU, wall time otherwise); the first step of each path is a
warm-up (capture, allocator, cuBLAS) and is not counted. Once both paths have
``num_trials`` counted steps, the medians decide: DBO is kept only when the plain median
divided by the DBO median is at least ``min_speedup``, so a tie or noise keeps the plain
path. With several ranks the medians are reduced to their maximum over ranks before the
decision (``agree``), so every rank decides the same. A decided bucket never measures
again; ``calibration`` turns the decisions into the ``CostModel`` that ``make bench``
writes, so a saved decision seeds the next run.

Measuring steps produce the same outputs as any other step: both paths compute the same
function of the inputs (the runner's merge equals the plain call), only the timing is
taken.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

__all__ = [
    "StepTimer",
    "WallTimer",
    "CudaEventTimer",
    "BucketTrials",
    "MeasuredDecider",
    "bucket_of",
]

Path = Literal["plain", "dbo"]


class StepTimer(Protocol):
    """Times one step: ``token = start()`` before it, ``stop(token)`` after it -> ms."""

    def start(self) -> Any: ...

    def stop(self, token: Any) -> float: ...


class WallTimer:
    """Host wall time (``time.perf_counter``), for CPU runs."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, token: float) -> float:
        return (time.perf_counter() - token) * 1e3


class CudaEventTimer:
    """GPU time of the step on the current stream, from two CUDA events.

    ``stop`` synchronises on the end event: a measuring step waits for the GPU once,
    which only the few measuring steps of each bucket pay.
    """

    def start(self) -> Any:
        import torch

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, token: Any) -> float:
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return float(token.elapsed_time(end))


def bucket_of(batch: int) -> int:
    """The bucket of a batch: the smallest power of two that holds it (1 for 0 and 1)."""
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}.")
    return 1 if batch <= 1 else 1 << (batch - 1).bit_length()


@dataclasses.dataclass
class BucketTrials:
    """What was measured for one bucket.

    Invariants: ``len(plain_ms)`` and ``len(dbo_ms)`` never exceed ``warmup + num_trials``
    of the decider; ``use_dbo`` is ``None`` until both are full, then fixed for good.
    """

    bucket: int
    plain_ms: list[float] = dataclasses.field(default_factory=list)  # warm-up first
    dbo_ms: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)  # tokens of each counted step
    plain_median_ms: float | None = None  # after agreement across ranks
    dbo_median_ms: float | None = None
    use_dbo: bool | None = None

    @property
    def speedup(self) -> float | None:
        """Plain median / DBO median (> 1: DBO faster), once decided."""
        if self.plain_median_ms is None or not self.dbo_median_ms:
            return None
        return self.plain_median_ms / self.dbo_median_ms

    def describe(self) -> str:
        """The decision and its figures, for ``last_reason``."""
        if self.use_dbo is None:
            return f"measuring batch bucket {self.bucket}"
        return (f"measured at batch bucket {self.bucket}: plain {self.plain_median_ms:.3f} ms, "
                f"DBO {self.dbo_median_ms:.3f} ms ({self.speedup:.2f}x): "
                f"{'DBO' if self.use_dbo else 'plain'}")


class MeasuredDecider:
    """Per-bucket measurement and decision (see the module doc).

    Args:
        num_trials: counted steps per path and bucket (after one warm-up step each).
        min_speedup: plain / DBO median needed to keep DBO; ties keep the plain path.
        timer: how a step is timed (default: CUDA events when CUDA is in use, else wall
            time; the runner picks per step).
        warmup: uncounted first steps per path and bucket.
    """

    def __init__(self, num_trials: int = 3, *, min_speedup: float = 1.02,
                 timer: StepTimer | None = None, warmup: int = 1) -> None:
        if not isinstance(num_trials, int) or num_trials < 1:
            raise ValueError(f"num_trials must be an int >= 1, got {num_trials!r}.")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}.")
        if not min_speedup > 0:
            raise ValueError(f"min_speedup must be > 0, got {min_speedup!r}.")
        self.num_trials = num_trials
        self.min_speedup = float(min_speedup)
        self.timer = timer
        self.warmup = warmup
        self.buckets: dict[int, BucketTrials] = {}

    def trials(self, bucket: int) -> BucketTrials:
        entry = self.buckets.get(bucket)
        if entry is None:
            entry = self.buckets[bucket] = BucketTrials(bucket)
        return entry

    def next_path(self, bucket: int) -> Path | None:
        """The path the next step of this bucket must take to be measured, or ``None``
        when the bucket is decided. Plain and DBO alternate, plain first."""
        t = self.trials(bucket)
        if t.use_dbo is not None:
            return None
        full = self.warmup + self.num_trials
        if len(t.plain_ms) <= len(t.dbo_ms) and len(t.plain_ms) < full:
            return "plain"
        return "dbo"

    def record(self, bucket: int, path: Path, ms: float, num_tokens: int) -> None:
        """One measured step of ``path``, ``ms`` milliseconds, ``num_tokens`` tokens."""
        t = self.trials(bucket)
        times = t.plain_ms if path == "plain" else t.dbo_ms
        if len(times) >= self.warmup:
            t.tokens.append(num_tokens)
        times.append(float(ms))

    def ready(self, bucket: int) -> bool:
        """Both paths of the bucket have all their steps (decide next)."""
        t = self.trials(bucket)
        full = self.warmup + self.num_trials
        return t.use_dbo is None and len(t.plain_ms) >= full and len(t.dbo_ms) >= full

    def decide(self, bucket: int,
               agree: Callable[[list[float]], list[float]] | None = None) -> BucketTrials:
        """Fix the bucket's decision from the counted steps' medians.

        Args:
            agree: with several ranks, ``agree([plain_ms, dbo_ms]) -> [plain_ms, dbo_ms]``
                reduces the medians to their maximum over ranks (every rank calls it).
        """
        t = self.trials(bucket)
        medians = [statistics.median(t.plain_ms[self.warmup:]),
                   statistics.median(t.dbo_ms[self.warmup:])]
        if agree is not None:
            medians = agree(medians)
        t.plain_median_ms, t.dbo_median_ms = medians
        t.use_dbo = bool(medians[1] > 0 and medians[0] / medians[1] >= self.min_speedup)
        return t

    def calibration(self, num_ubatches: int, **profile: Any) -> Any:
        """The decided buckets as a ``CostModel`` (``coop_dbo.cost_model``), one point per
        bucket at its mean counted tokens per microbatch; ``profile`` fills ``gpu``,
        ``comm``, ``model_shape`` and ``meta``. ``CostModel.save(path)`` writes it."""
        from .cost_model import CostModel

        points: dict[int, float] = {}
        for t in self.buckets.values():
            if t.use_dbo is None or t.speedup is None or not t.tokens:
                continue
            tokens = max(1, round(statistics.fmean(t.tokens) / num_ubatches))
            points[tokens] = t.speedup
        if not points:
            raise ValueError("no bucket has been decided yet: run steps of each batch size "
                             "first (each bucket decides after "
                             f"{2 * (self.warmup + self.num_trials)} steps).")
        return CostModel(points=points, num_ubatches=num_ubatches,
                         min_speedup=self.min_speedup, **profile)
