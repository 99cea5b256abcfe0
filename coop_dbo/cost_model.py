"""When to overlap: a cost model calibrated by ``make bench``.

DBO does not always pay: splitting a batch makes memory-bound matmuls read their weights
once per microbatch, and when there is little communication there is little to hide
(``bench/RESULTS.md`` has a two-GPU NCCL case where DBO loses at small sizes). The
benchmark measures, per GPU, model shape and communication setting, the speedup of a
DBO step over the same step without DBO at several microbatch sizes, and writes them to a
calibration file. ``CostModel.should_overlap(num_tokens)`` then says yes only where the
measurement says DBO wins.

Decision rule (conservative):

* a measured point *wins* when its speedup (no-DBO time / DBO time) is at least
  ``min_speedup`` (default 1.02: a win within measurement noise is no win);
* at a measured size, that point decides;
* between two measured sizes, DBO is chosen only when *both* neighbours win (then a
  linear interpolation of the speedup is above the threshold too);
* below the smallest or above the largest measured size, the nearest point decides.

``num_tokens`` is the number of tokens of the step on this rank *before* the split (what a
runner sees); it is divided by ``num_ubatches`` to get tokens per microbatch, the unit of
the calibration. Use ``should_overlap_ubatch`` to ask in tokens per microbatch directly.

Calibration file (JSON)::

    {"format": "coop-dbo-calibration/1",
     "profiles": [{"gpu": "NVIDIA H100 80GB HBM3", "comm": "nccl-ep2",
                   "model_shape": {"hidden": 2048, ...}, "num_ubatches": 2,
                   "min_speedup": 1.02,
                   "points": [{"tokens_per_ubatch": 64, "speedup": 0.71}, ...],
                   "meta": {...}}, ...]}

A file may hold several profiles (one per communication setting, e.g. each simulated
comm/compute ratio of the 1-GPU sweep, or NCCL with 2 and 4 ranks); ``load`` picks one.
It may also hold schedule plans (``"schedules"``, ``coop_dbo.planner.SchedulePlan``),
which ``save`` keeps.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = ["CostModel", "FORMAT"]

FORMAT = "coop-dbo-calibration/1"


class _Entry(Protocol):
    """What the calibration file's reader and writer use of an entry of one of its
    sections: a cost-model profile or a schedule plan (``coop_dbo.planner``)."""

    @property
    def comm(self) -> str: ...

    @property
    def model_shape(self) -> Mapping[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


_E = TypeVar("_E", bound=_Entry)


def _read_calibration(path: str | Path) -> dict[str, Any]:
    """The top-level object of the calibration file ``path``.

    Raises ``ValueError`` when the file is not JSON or not of ``FORMAT``.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a coop-dbo calibration file (format {got!r}, "
                         f"expected {FORMAT!r}).")
    return data


def _read_section(path: str | Path, key: str,
                  parse: Callable[[Mapping[str, Any]], _E]) -> tuple[dict[str, Any], list[_E]]:
    """The whole calibration file ``path`` and the entries of its section ``key`` (none
    when the file has no such section), each read with ``parse``."""
    data = _read_calibration(path)
    return data, [parse(d) for d in data.get(key, [])]


def _pick(entries: list[_E], path: str | Path, comm: str | None,
          model_shape: Mapping[str, Any] | None, what: str, *, have_what: str = "",
          empty_hint: str | None = None) -> _E:
    """The one entry for ``comm`` and ``model_shape`` (either ``None``: any).

    ``what`` names an entry in the errors (``"schedule plan"``), ``have_what`` goes before
    the list of comm settings the file has, and ``empty_hint``, when given, is what to do
    when the file has no entry at all.
    """
    found = [e for e in entries
             if (comm is None or e.comm == comm)
             and (model_shape is None or e.model_shape == dict(model_shape))]
    if len(found) == 1:
        return found[0]
    if not entries and empty_hint is not None:
        raise KeyError(f"{path} holds no {what}: {empty_hint}")
    have = sorted({e.comm for e in entries})
    if not found:
        raise KeyError(f"no {what} for comm={comm!r}"
                       f"{' and that model shape' if model_shape else ''} in {path}; "
                       f"it has {have_what}comm settings {have}.")
    raise KeyError(f"{len(found)} {what}s in {path} match comm={comm!r}: "
                   f"pass comm= (one of {have}) and/or model_shape= to pick one.")


def _write_section(path: str | Path, key: str, entry: _E,
                   parse: Callable[[Mapping[str, Any]], _E],
                   same: Callable[[_E], bool]) -> Path:
    """Write ``entry`` into the section ``key`` of the calibration file ``path``.

    The entries of that section for which ``same`` holds are replaced, the others and
    every other top-level key are kept. An unreadable file (e.g. of a newer format) is
    kept aside as ``<name>.bak`` rather than dropped, and a new file is started.
    """
    path = Path(path)
    data: dict[str, Any] = {}
    entries: list[_E] = []
    if path.exists():
        try:
            data, entries = _read_section(path, key, parse)
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            path.replace(path.with_name(path.name + ".bak"))
            data, entries = {}, []
    entries = [e for e in entries if not same(e)] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "profiles": [], **data,
                                key: [e.to_dict() for e in entries]}, indent=2))
    return path


@dataclass
class CostModel:
    """Measured DBO speedup per tokens-per-microbatch for one GPU, model shape and comm.

    Args:
        points: ``{tokens_per_ubatch: speedup}``; speedup = no-DBO step time / DBO step
            time (> 1 means DBO is faster).
        gpu: the GPU name the measurement ran on (``torch.cuda.get_device_name()``).
        comm: the communication setting, e.g. ``"nccl-ep2"`` or ``"sim-ratio-1"``.
        model_shape: the model's widths (free-form, compared for equality only).
        num_ubatches: microbatches per step in the measurement.
        min_speedup: the smallest speedup that counts as a win.
        meta: anything else worth keeping (date, versions, command).
    """

    points: dict[int, float]
    gpu: str = ""
    comm: str = ""
    model_shape: dict[str, Any] = field(default_factory=dict)
    num_ubatches: int = 2
    min_speedup: float = 1.02
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a CostModel needs at least one measured point.")
        clean: dict[int, float] = {}
        for t, s in self.points.items():
            t, s = int(t), float(s)
            if t < 1 or not s > 0:
                raise ValueError(f"bad calibration point: {t} tokens per microbatch, "
                                 f"speedup {s} (need tokens >= 1 and speedup > 0).")
            clean[t] = s
        self.points = dict(sorted(clean.items()))
        if self.num_ubatches < 1:
            raise ValueError(f"num_ubatches must be >= 1, got {self.num_ubatches}.")
        self._sizes = list(self.points)

    # -- the decision -------------------------------------------------------------------

    def wins(self, tokens_per_ubatch: int) -> bool:
        """Whether the measured point at exactly this size wins (KeyError if unmeasured)."""
        return self.points[tokens_per_ubatch] >= self.min_speedup

    def should_overlap_ubatch(self, tokens_per_ubatch: float) -> bool:
        """The decision for microbatches of ``tokens_per_ubatch`` tokens (see module doc)."""
        sizes = self._sizes
        if tokens_per_ubatch <= sizes[0]:
            return self.wins(sizes[0])
        if tokens_per_ubatch >= sizes[-1]:
            return self.wins(sizes[-1])
        i = bisect.bisect_left(sizes, tokens_per_ubatch)
        if sizes[i] == tokens_per_ubatch:
            return self.wins(sizes[i])
        return self.wins(sizes[i - 1]) and self.wins(sizes[i])

    def should_overlap(self, num_tokens: int) -> bool:
        """Whether to run a step of ``num_tokens`` tokens (this rank, before the split) with
        DBO. False when there are fewer tokens than microbatches."""
        if num_tokens < self.num_ubatches:
            return False
        return self.should_overlap_ubatch(num_tokens / self.num_ubatches)

    def speedup_estimate(self, tokens_per_ubatch: float) -> float:
        """Piecewise-linear speedup (nearest point outside the range); for reports."""
        sizes = self._sizes
        if tokens_per_ubatch <= sizes[0]:
            return self.points[sizes[0]]
        if tokens_per_ubatch >= sizes[-1]:
            return self.points[sizes[-1]]
        i = bisect.bisect_left(sizes, tokens_per_ubatch)
        lo, hi = sizes[i - 1], sizes[i]
        w = (tokens_per_ubatch - lo) / (hi - lo)
        return self.points[lo] * (1 - w) + self.points[hi] * w

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "comm": self.comm, "model_shape": dict(self.model_shape),
                "num_ubatches": self.num_ubatches, "min_speedup": self.min_speedup,
                "points": [{"tokens_per_ubatch": t, "speedup": s}
                           for t, s in self.points.items()],
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostModel:
        pts = d.get("points")
        if isinstance(pts, Mapping):
            points = {int(k): float(v) for k, v in pts.items()}
        elif isinstance(pts, list):
            points = {int(p["tokens_per_ubatch"]): float(p["speedup"]) for p in pts}
        else:
            raise ValueError("calibration profile has no 'points'.")
        return cls(points=points, gpu=str(d.get("gpu", "")), comm=str(d.get("comm", "")),
                   model_shape=dict(d.get("model_shape", {})),
                   num_ubatches=int(d.get("num_ubatches", 2)),
                   min_speedup=float(d.get("min_speedup", 1.02)),
                   meta=dict(d.get("meta", {})))

    def same_profile(self, other: CostModel) -> bool:
        return (self.gpu, self.comm, self.model_shape, self.num_ubatches) == (
            other.gpu, other.comm, other.model_shape, other.num_ubatches)

    @staticmethod
    def load_all(path: str | Path) -> list[CostModel]:
        """Every profile in a calibration file."""
        return _read_section(path, "profiles", CostModel.from_dict)[1]

    @classmethod
    def load(cls, path: str | Path, comm: str | None = None, *,
             model_shape: Mapping[str, Any] | None = None) -> CostModel:
        """The profile of ``path`` for ``comm`` (and ``model_shape``, when given).

        ``comm`` may be left out when the file holds exactly one matching profile.
        """
        return _pick(cls.load_all(path), path, comm, model_shape, "calibration profile")

    def save(self, path: str | Path) -> Path:
        """Write this profile into ``path``, replacing a profile of the same GPU, comm,
        model shape and microbatch count and keeping the others, and everything else in
        the file (the planner's schedule plans). An unreadable file is kept aside as
        ``<name>.bak``."""
        return _write_section(path, "profiles", self, CostModel.from_dict, self.same_profile)
