"""The schedule planner: where each layer's movable work runs, chosen by simulating DBO.

Under DBO a layer's two compute stretches each hide a transfer of the other microbatch
(``schedule.py``). When the stretch before the dispatch (``a``) and the experts' stretch
(``e``) differ, the compute stream idles for the difference: at comm = compute a layer of
two microbatches costs ``2(a + e) + |a - e|`` (``3a + e`` when ``a > e``) instead of
``2(a + e)``. Three pieces of a layer of the reference decoder may run in either stretch
without changing any result: the shared expert and the next layer's keys and values
gathers. This module models the schedule, predicts a step's time for each placement of
those pieces and picks the fastest, per bucket of tokens per microbatch.

**The model.** A microbatch's step is a list of ``Piece``s, the work between two of its
yields, each on one CUDA stream. Per MoE layer (the ``"switch"`` schedule of
``moe_exchange``)::

    compute  A: what follows the previous layer's combine (its unpack; in layer 0 the
                embedding and, in the first step, layer 0's own cache gather), norms,
                attention, router, dispatch pack, + movable pieces placed before
    comm     D: the dispatch transfer
    compute  E: dispatch unpack, the movable pieces placed after, routed experts,
                combine pack
    comm     C: the combine transfer

and after the last layer the tail (last unpack, final norm, LM head), which in a
multi-step ``MoEDecoder.decode`` runs on, without a yield, into the next step's first
``A`` (the pipeline does not drain between steps). The greenlet scheduler runs piece
``k`` of every microbatch, in microbatch order, before piece ``k + 1`` of any; so each
stream receives its pieces in that issue order (per layer: compute A0 A1 E0 E1, comm D0
D1 C0 C1). ``simulate_pieces`` replays it: each stream runs its pieces in issue order,
each piece starting when its stream is free and its own microbatch's previous piece has
ended (the event wait of a stream switch). Nothing else is modelled: no slowdown of one
stream by the other (a transfer that holds SMs would cause one; the copy-engine transfer
of the benchmarks holds none) and no host time (graph replay). Against measured DBO
graphs of the reference decoder the prediction came within 0.3-5% (``bench/RESULTS.md``).

**The search.** 3 movable pieces x {before the dispatch, experts' stretch}: 8
placements (``PLACEMENTS``), the same in every layer, since the decoder's policy is by
microbatch size. ``best_placement`` simulates all 8; ``plan_schedule`` does it per bucket
and returns a ``SchedulePlan`` whose ``policy()`` the decoder runs. Plans are saved into
the calibration file of ``cost_model.py`` (a ``"schedules"`` list beside its
``"profiles"``).

**Modelled, not applied** (the analysis is in the docstrings of ``split_estimates`` and
``ubatch_pieces``): an uneven split between microbatches (the runner's splitter makes the
split, not the decoder; in the cases tried the model gains about 1% at most) and an extra
yield that splits attention in two stages (with one FIFO comm stream it only delays each
transfer's issue: the model never finds it faster). Neither is part of the search. A
placement per microbatch, or per layer, is expressible in the simulator
(``simulate_pieces``) but found nothing over one placement for all on equal layers. Nor
did a second microbatch that lags the first by one or more pieces (zero-length pieces at
the front of its list: the same or up to 13 points less hidden), or a third microbatch:
the model has three hide nearly everything where the stretches differ, but the measured
graphs hide 1-6 points less than two (``bench/probes/ubatch_count.py``).

All times are GPU microseconds (us). This module needs no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .cost_model import _pick, _read_section, _write_section
from .schedule import MOVABLE_PIECES, Placement, SchedulePolicy

__all__ = [
    "ALL_AFTER",
    "PLACEMENTS",
    "LayerStretches",
    "Piece",
    "PlannedBucket",
    "SchedulePlan",
    "StepEstimate",
    "StretchProfile",
    "best_placement",
    "estimate",
    "ideal_us",
    "no_dbo_us",
    "plan_schedule",
    "share_hidden",
    "simulate",
    "simulate_dbo",
    "simulate_pieces",
    "split_estimates",
    "ubatch_pieces",
]

Stream = Literal["compute", "comm"]

#: Every placement of the movable pieces (2 ** 3 = 8), all after the dispatch first.
PLACEMENTS: tuple[Placement, ...] = tuple(
    Placement(keys_before=k, values_before=v, shared_before=s)
    for s in (False, True) for v in (False, True) for k in (False, True))

#: Every movable piece in the experts' stretch (the default placement of the simulator).
ALL_AFTER = Placement()

#: Key of the schedule plans in a calibration file.
SCHEDULES_KEY = "schedules"


def _duration(owner: str, name: str, value: Any) -> float:
    """``value`` as a float us >= 0 and finite, else a ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a number of microseconds, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name} must be a finite time >= 0 us, got {value!r}.")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Piece:
    """The work of one microbatch between two of its yields: ``us`` of GPU time on one
    stream. ``label`` names it in reports (e.g. ``"s0.L3.E"``)."""

    stream: Stream
    us: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.stream not in ("compute", "comm"):
            raise ValueError(f"Piece.stream must be 'compute' or 'comm', got {self.stream!r}.")
        object.__setattr__(self, "us", _duration("Piece", "us", self.us))


@dataclasses.dataclass(frozen=True)
class LayerStretches:
    """GPU time of one microbatch's pieces of one MoE layer, at one microbatch size.

    Attributes (us, each >= 0):
        before_us: the fixed part before the dispatch: the previous layer's combine
            unpack (layer 0: the embedding), norms, attention, router, dispatch pack.
            Layer 0's own cache gather in a first step is ``StretchProfile.first_gather_us``.
        shared_us: the shared expert (movable).
        keys_us: the gather of the next layer's cached keys (movable); in the last
            layer, of layer 0's for the next decode step (absent in the last step).
        values_us: the same for the cached values (movable).
        experts_us: the fixed part of the experts' stretch: dispatch unpack, routed
            experts, combine pack.
        dispatch_us: the dispatch transfer on the comm stream.
        combine_us: the combine transfer on the comm stream.
    """

    before_us: float
    shared_us: float
    keys_us: float
    values_us: float
    experts_us: float
    dispatch_us: float = 0.0
    combine_us: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _duration("LayerStretches", f.name,
                                                       getattr(self, f.name)))

    def movable_us(self, piece: str, has_next: bool) -> float:
        """The time of movable ``piece``; the gathers take none without a next layer."""
        if piece == "shared":
            return self.shared_us
        if piece not in MOVABLE_PIECES:
            raise ValueError(f"unknown movable piece {piece!r}: one of {MOVABLE_PIECES}.")
        return getattr(self, f"{piece}_us") if has_next else 0.0

    def stretches(self, placement: Placement, has_next: bool) -> tuple[float, float]:
        """``(a, e)``: the compute before the dispatch and the experts' stretch, us, with
        the movable pieces where ``placement`` puts them (``has_next``: a next layer, or a
        next decode step after the last layer, whose cache this layer gathers)."""
        moved = [(placement.is_before(p), self.movable_us(p, has_next))
                 for p in MOVABLE_PIECES]
        return (self.before_us + sum(us for before, us in moved if before),
                self.experts_us + sum(us for before, us in moved if not before))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StretchProfile:
    """GPU time of every piece of one microbatch's decode step at one size (us).

    Attributes:
        tokens_per_ubatch: the microbatch's tokens (decode: sequences), >= 1.
        layers: one ``LayerStretches`` per MoE layer, at least one.
        tail_us: after the last combine: its unpack, the final norm and the LM head.
        first_gather_us: layer 0's own cache gather, in the stretch before its dispatch,
            in a step that was not handed it by the step before (the first of a
            ``decode`` call, or a ``forward``).
    """

    tokens_per_ubatch: int
    layers: tuple[LayerStretches, ...]
    tail_us: float = 0.0
    first_gather_us: float = 0.0

    def __post_init__(self) -> None:
        t = self.tokens_per_ubatch
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"StretchProfile.tokens_per_ubatch must be an int >= 1, got {t!r}.")
        layers = tuple(self.layers)
        if not layers or not all(isinstance(x, LayerStretches) for x in layers):
            raise ValueError("StretchProfile.layers must be a non-empty sequence of "
                             "LayerStretches (one per MoE layer).")
        object.__setattr__(self, "layers", layers)
        for name in ("tail_us", "first_gather_us"):
            object.__setattr__(self, name, _duration("StretchProfile", name,
                                                     getattr(self, name)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def with_comm(self, dispatch_us: float, combine_us: float) -> StretchProfile:
        """This profile with every layer's transfers set to ``dispatch_us`` /
        ``combine_us`` (us per microbatch and layer)."""
        return dataclasses.replace(self, layers=tuple(
            dataclasses.replace(x, dispatch_us=dispatch_us, combine_us=combine_us)
            for x in self.layers))

    def compute_us(self, num_steps: int = 1) -> float:
        """All compute of ``num_steps`` decode steps of this microbatch (any placement)."""
        return sum(p.us for p in ubatch_pieces(self, Placement(), num_steps)
                   if p.stream == "compute")

    def comm_us(self, num_steps: int = 1) -> float:
        """All transfers of ``num_steps`` decode steps of this microbatch."""
        return num_steps * sum(x.dispatch_us + x.combine_us for x in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_ubatch": self.tokens_per_ubatch, "tail_us": self.tail_us,
                "first_gather_us": self.first_gather_us,
                "layers": [x.to_dict() for x in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StretchProfile:
        try:
            layers = tuple(LayerStretches(**x) for x in d["layers"])
            return cls(tokens_per_ubatch=d["tokens_per_ubatch"], layers=layers,
                       tail_us=d.get("tail_us", 0.0),
                       first_gather_us=d.get("first_gather_us", 0.0))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a stretch profile ({e!r}): it needs tokens_per_ubatch and "
                             "layers, each layer with before_us, shared_us, keys_us, "
                             "values_us, experts_us (dispatch_us, combine_us optional).") from e


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")


def ubatch_pieces(profile: StretchProfile, placement: Placement, num_steps: int = 1, *,
                  attention_split: float | None = None) -> list[Piece]:
    """One microbatch's pieces over ``num_steps`` decode steps, in issue order.

    ``attention_split`` (modelled, not applied by the decoder): an extra plain yield
    inside the stretch before the dispatch, after that fraction (0 < f < 1) of its fixed
    part; the movable pieces placed before the dispatch go to the second stage. This is
    the two-stage attention of DeepSeek's decode overlap. With one FIFO comm stream it
    does not pay: the compute stream then runs A0' A1' A0'' A1'' instead of A0 A1, so
    every dispatch is issued after part of the other microbatch's attention and waits
    longer; the simulator finds it slower at every split tried (``tests/test_planner.py``
    checks that a synthetic sweep never gains).
    """
    _check_steps(num_steps)
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a coop_dbo.schedule.Placement, got "
                        f"{type(placement).__name__}.")
    if attention_split is not None and not 0.0 < attention_split < 1.0:
        raise ValueError(f"attention_split must be None or a fraction in (0, 1), got "
                         f"{attention_split!r}.")
    out: list[Piece] = []
    carry = 0.0  # compute since this microbatch's last yield (a tail runs on into a step)
    last = profile.num_layers - 1
    for step in range(num_steps):
        for i, layer in enumerate(profile.layers):
            has_next = i < last or step < num_steps - 1
            a, e = layer.stretches(placement, has_next)
            if step == 0 and i == 0:
                a += profile.first_gather_us
            tag = f"s{step}.L{i}"
            if attention_split is None:
                out.append(Piece("compute", carry + a, f"{tag}.A"))
            else:
                first = layer.before_us * attention_split
                out.append(Piece("compute", carry + first, f"{tag}.A1"))
                out.append(Piece("compute", a - first, f"{tag}.A2"))
            out.append(Piece("comm", layer.dispatch_us, f"{tag}.D"))
            out.append(Piece("compute", e, f"{tag}.E"))
            out.append(Piece("comm", layer.combine_us, f"{tag}.C"))
            carry = 0.0
        carry = profile.tail_us
    out.append(Piece("compute", carry, f"s{num_steps - 1}.tail"))
    return out


def simulate_pieces(per_ubatch: Sequence[Sequence[Piece]], *,
                    start_us: Sequence[float] | None = None) -> float:
    """Step time (us) of microbatches whose pieces are ``per_ubatch[u]`` (issue order).

    Piece ``k`` of every microbatch is issued, in microbatch order, before piece ``k + 1``
    of any (the greenlet scheduler's round robin); each stream runs its pieces in issue
    order, each starting when the stream is free and its microbatch's previous piece has
    ended. ``start_us[u]``: microbatch ``u``'s first piece starts no earlier (default 0).
    Returns the time at which the last piece ends, from 0.
    """
    n = len(per_ubatch)
    if n < 1:
        raise ValueError("simulate_pieces needs at least one microbatch's pieces.")
    lengths = {len(p) for p in per_ubatch}
    if len(lengths) != 1:
        raise ValueError(f"every microbatch must have the same number of pieces (it yields "
                         f"the same number of times), got {[len(p) for p in per_ubatch]}.")
    if start_us is None:
        end = [0.0] * n
    else:
        if len(start_us) != n:
            raise ValueError(f"start_us has {len(start_us)} entries for {n} microbatches.")
        end = [_duration("start_us", str(u), s) for u, s in enumerate(start_us)]
    free = {"compute": 0.0, "comm": 0.0}
    for k in range(lengths.pop()):
        for u in range(n):
            piece = per_ubatch[u][k]
            t = max(free[piece.stream], end[u]) + piece.us
            free[piece.stream] = t
            end[u] = t
    return max(end)


def _per_ubatch(profiles: StretchProfile | Sequence[StretchProfile],
                placements: Placement | Sequence[Placement],
                num_ubatches: int | None) -> tuple[list[StretchProfile], list[Placement]]:
    """Profiles and placements as one per microbatch (a single one is repeated)."""
    profs = [profiles] if isinstance(profiles, StretchProfile) else list(profiles)
    places = [placements] if isinstance(placements, Placement) else list(placements)
    n = num_ubatches if num_ubatches is not None else max(len(profs), len(places), 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_ubatches must be an int >= 1, got {n!r}.")
    if len(profs) not in (1, n) or len(places) not in (1, n):
        raise ValueError(f"give one profile and one placement, or one per microbatch: got "
                         f"{len(profs)} profiles and {len(places)} placements for {n} "
                         "microbatches.")
    profs *= n // len(profs)
    places *= n // len(places)
    if not all(isinstance(p, StretchProfile) for p in profs):
        raise TypeError("profiles must be StretchProfile objects.")
    if len({p.num_layers for p in profs}) != 1:
        raise ValueError(f"the microbatches' profiles have different layer counts "
                         f"{[p.num_layers for p in profs]}: profile the same model.")
    return profs, places


def simulate_dbo(profiles: StretchProfile | Sequence[StretchProfile],
                 placements: Placement | Sequence[Placement] = ALL_AFTER, *,
                 num_ubatches: int | None = None, num_steps: int = 1,
                 start_us: Sequence[float] | None = None,
                 attention_split: float | None = None) -> float:
    """Predicted step time (us) of ``num_steps`` decode steps under DBO.

    Args:
        profiles: one ``StretchProfile`` for every microbatch, or one per microbatch (an
            uneven split: each at its own size).
        placements: one ``Placement`` for every microbatch, or one per microbatch.
        num_ubatches: microbatches (default: the number of profiles or placements
            given, 2 when one of each).
        num_steps: decode steps in one call (one graph): the pipeline fills and drains once.
        start_us: per microbatch, the earliest start of its first piece (default 0).
        attention_split: modelled only (see ``ubatch_pieces``).
    """
    profs, places = _per_ubatch(profiles, placements, num_ubatches)
    return simulate_pieces([ubatch_pieces(p, q, num_steps, attention_split=attention_split)
                            for p, q in zip(profs, places, strict=True)], start_us=start_us)


def simulate(before: Sequence[float], experts: Sequence[float], tail: float, comm_us: float,
             num_ubatches: int = 2) -> float:
    """Step time (us) of the DBO schedule if every stretch kept its one-microbatch length
    and every transfer took ``comm_us``: ``before[l]`` / ``experts[l]`` are layer ``l``'s
    measured stretches (``bench/profile_layer.py``), ``tail`` the compute after the last
    combine. The whole-stretch form of ``simulate_dbo``; issue order per layer: compute
    A0 A1 E0 E1, comm D0 D1 C0 C1."""
    if len(before) != len(experts):
        raise ValueError(f"before has {len(before)} layers and experts {len(experts)}.")
    layers = tuple(LayerStretches(before_us=b, shared_us=0.0, keys_us=0.0, values_us=0.0,
                                  experts_us=e, dispatch_us=comm_us, combine_us=comm_us)
                   for b, e in zip(before, experts, strict=True))
    return simulate_dbo(StretchProfile(1, layers, tail_us=tail), Placement(),
                        num_ubatches=num_ubatches)


def ideal_us(profiles: StretchProfile | Sequence[StretchProfile], *,
             num_ubatches: int | None = None, num_steps: int = 1) -> float:
    """The overlap ideal: ``max(all compute, all comm)`` of the microbatches (us). With
    the profile of the whole batch as one microbatch (``num_ubatches=1``), the ideal of
    the step without DBO, as the benchmarks define it."""
    profs, _ = _per_ubatch(profiles, Placement(), num_ubatches)
    return max(sum(p.compute_us(num_steps) for p in profs),
               sum(p.comm_us(num_steps) for p in profs))


def no_dbo_us(profile: StretchProfile, num_steps: int = 1) -> float:
    """The step without DBO: ``profile`` (measured at the whole batch's size) as one
    microbatch, every piece after the other (us)."""
    return simulate_dbo(profile, Placement(), num_ubatches=1, num_steps=num_steps)


def share_hidden(no_dbo: float, dbo: float, ideal: float) -> float | None:
    """``(no_dbo - dbo) / (no_dbo - ideal)``: the share of what overlap can hide that it
    hid; ``None`` when ``no_dbo - ideal`` is under 2% of ``no_dbo`` (nothing to hide)."""
    gap = no_dbo - ideal
    if gap <= 0.02 * no_dbo:
        return None
    return (no_dbo - dbo) / gap


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """Predicted times (us) of one DBO step and its references.

    Attributes:
        dbo_us: the DBO step (``simulate_dbo``).
        serial_us: the same microbatches with no overlap, every piece after the other.
        ideal_us: ``max(compute, comm)`` of the same microbatches.
    """

    dbo_us: float
    serial_us: float
    ideal_us: float

    @property
    def share_hidden(self) -> float | None:
        """What DBO hid of what its own microbatches leave to hide (``share_hidden``)."""
        return share_hidden(self.serial_us, self.dbo_us, self.ideal_us)


def estimate(profiles: StretchProfile | Sequence[StretchProfile],
             placements: Placement | Sequence[Placement] = ALL_AFTER, *,
             num_ubatches: int | None = None, num_steps: int = 1) -> StepEstimate:
    """``StepEstimate`` of a DBO step (arguments as for ``simulate_dbo``)."""
    profs, places = _per_ubatch(profiles, placements, num_ubatches)
    n = len(profs)
    dbo = simulate_dbo(profs, places, num_ubatches=n, num_steps=num_steps)
    serial = sum(p.compute_us(num_steps) + p.comm_us(num_steps) for p in profs)
    return StepEstimate(dbo_us=dbo, serial_us=serial,
                        ideal_us=ideal_us(profs, num_ubatches=n, num_steps=num_steps))


def best_placement(profiles: StretchProfile | Sequence[StretchProfile], *,
                   num_ubatches: int | None = None, num_steps: int = 1,
                   prefer: Placement | None = None
                   ) -> tuple[Placement, float, dict[Placement, float]]:
    """The placement (the same for every microbatch) with the shortest simulated step.

    Simulates each of the 8 ``PLACEMENTS``. Ties (within 1e-9 relative) go to ``prefer``
    (e.g. the fallback policy's placement, so that a plan changes nothing it cannot
    improve), else to the first in ``PLACEMENTS``. Returns ``(placement, its step us,
    {placement: step us} of all 8)``.
    """
    times = {p: simulate_dbo(profiles, p, num_ubatches=num_ubatches, num_steps=num_steps)
             for p in PLACEMENTS}
    best_us = min(times.values())
    tol = 1e-9 * max(best_us, 1.0)
    if prefer is not None and times[prefer] <= best_us + tol:
        return prefer, times[prefer], times
    best = next(p for p in PLACEMENTS if times[p] <= best_us + tol)
    return best, times[best], times


def split_estimates(profile_of: Callable[[int], StretchProfile], total_tokens: int,
                    policy: SchedulePolicy, *,
                    sizes: Iterable[Sequence[int]] | None = None,
                    num_steps: int = 1) -> dict[tuple[int, ...], float]:
    """Predicted DBO step (us) of each split of ``total_tokens`` (modelled, not applied).

    ``profile_of(n)`` is the profile of a microbatch of ``n`` tokens (comm included);
    each microbatch takes ``policy.placement`` of its own size, as the decoder does.
    ``sizes``: the splits to try (default: every two-way split). The split itself is the
    runner's (``split.py`` balances the microbatches), not the decoder's, so no plan
    applies an uneven one; with stretches and transfers that grow with the tokens a
    balanced split is within about 1% of the best in this model (the first microbatch's
    stretch fills the pipeline, the last one's drains it: making one smaller lengthens
    the other).
    """
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < 2:
        raise ValueError(f"total_tokens must be an int >= 2, got {total_tokens!r}.")
    splits = ([(n, total_tokens - n) for n in range(1, total_tokens)] if sizes is None
              else [tuple(s) for s in sizes])
    cache: dict[int, StretchProfile] = {}
    out: dict[tuple[int, ...], float] = {}
    for split in splits:
        if sum(split) != total_tokens or min(split) < 1:
            raise ValueError(f"split {split} does not cut {total_tokens} tokens into parts "
                             ">= 1.")
        profs = [cache.setdefault(n, profile_of(n)) for n in split]
        out[split] = simulate_dbo(profs, [policy.placement(n) for n in split],
                                  num_steps=num_steps)
    return out


# -- plans -------------------------------------------------------------------------------

def _placement_to_json(p: Placement) -> list[str]:
    return list(p.before())


def _placement_from_json(value: Any, where: str) -> Placement:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of piece names (of {list(MOVABLE_PIECES)}), "
                         f"got {value!r}.")
    return Placement.from_before(value)


@dataclasses.dataclass(frozen=True)
class PlannedBucket:
    """The planner's choice for microbatches of ``tokens_per_ubatch`` tokens and up (to
    the next bucket).

    Attributes:
        tokens_per_ubatch: the bucket's size, >= 1.
        placement: the chosen placement.
        predicted_us: its simulated step (us).
        fallback_placement: what the plan's fallback thresholds would run at this size.
        fallback_us: that placement's simulated step (us), ``>= predicted_us``.
        profile: the stretch profile the choice was made from (comm included), if kept.
    """

    tokens_per_ubatch: int  # >= 1
    placement: Placement
    predicted_us: float  # NaN when a file did not record it
    fallback_placement: Placement
    fallback_us: float  # >= predicted_us (the planner prefers the fallback on a tie)
    profile: StretchProfile | None = None  # None, or measured at tokens_per_ubatch

    def __post_init__(self) -> None:
        t = self.tokens_per_ubatch
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"a planned bucket's tokens_per_ubatch must be an int >= 1, "
                             f"got {t!r}.")
        if not (isinstance(self.placement, Placement)
                and isinstance(self.fallback_placement, Placement)):
            raise TypeError("PlannedBucket.placement and .fallback_placement must be "
                            "Placement objects.")
        if self.profile is not None and self.profile.tokens_per_ubatch != t:
            raise ValueError(f"the profile of the {t}-token bucket was measured at "
                             f"{self.profile.tokens_per_ubatch} tokens per microbatch.")

    @property
    def gain(self) -> float:
        """Predicted speedup of the plan over the fallback at this size (>= 1)."""
        return self.fallback_us / self.predicted_us if self.predicted_us > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "tokens_per_ubatch": self.tokens_per_ubatch,
            "before_dispatch": _placement_to_json(self.placement),
            "predicted_us": self.predicted_us,
            "fallback_before_dispatch": _placement_to_json(self.fallback_placement),
            "fallback_us": self.fallback_us}
        if self.profile is not None:
            d["profile"] = self.profile.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlannedBucket:
        try:
            tokens = d["tokens_per_ubatch"]
            placement = _placement_from_json(d["before_dispatch"], "before_dispatch")
            fallback = _placement_from_json(d.get("fallback_before_dispatch", []),
                                            "fallback_before_dispatch")
            predicted = float(d.get("predicted_us", math.nan))
            fallback_us = float(d.get("fallback_us", predicted))
        except KeyError as e:
            raise ValueError(f"a planned bucket needs {e}: got {dict(d)!r}.") from None
        profile = d.get("profile")
        return cls(tokens_per_ubatch=tokens, placement=placement, predicted_us=predicted,
                   fallback_placement=fallback, fallback_us=fallback_us,
                   profile=None if profile is None else StretchProfile.from_dict(profile))


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    """Planned placements per bucket of tokens per microbatch, for one GPU, model and
    comm setting; ``policy()`` is what ``MoEDecoder(schedule=...)`` runs.

    Attributes:
        buckets: sorted by ``tokens_per_ubatch``, each size once, at least one.
        fallback: the thresholds for microbatches smaller than every bucket (its own
            ``planned`` is ignored).
        gpu / comm / model_shape / num_ubatches / num_steps: what the plan was made for
            (as in ``CostModel``; ``num_steps``: decode steps per graph it assumed).
        meta: anything else worth keeping (date, command, measured times).
    """

    buckets: tuple[PlannedBucket, ...]
    fallback: SchedulePolicy = SchedulePolicy()
    gpu: str = ""
    comm: str = ""
    model_shape: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_ubatches: int = 2
    num_steps: int = 1
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        buckets = tuple(sorted(self.buckets, key=lambda b: b.tokens_per_ubatch))
        if not buckets or not all(isinstance(b, PlannedBucket) for b in buckets):
            raise ValueError("a SchedulePlan needs at least one PlannedBucket.")
        sizes = [b.tokens_per_ubatch for b in buckets]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"a SchedulePlan has each bucket once, got sizes {sizes}.")
        if not isinstance(self.fallback, SchedulePolicy):
            raise TypeError("SchedulePlan.fallback must be a SchedulePolicy.")
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "fallback",
                           dataclasses.replace(self.fallback, planned=()))
        object.__setattr__(self, "model_shape", dict(self.model_shape))
        object.__setattr__(self, "meta", dict(self.meta))

    def policy(self) -> SchedulePolicy:
        """The fallback thresholds plus each bucket's placement."""
        return dataclasses.replace(self.fallback, planned=tuple(
            (b.tokens_per_ubatch, b.placement) for b in self.buckets))

    def key(self) -> tuple[Any, ...]:
        """What identifies the plan in a calibration file (one per key)."""
        return (self.gpu, self.comm, self.model_shape, self.num_ubatches, self.num_steps)

    def to_dict(self) -> dict[str, Any]:
        fb = self.fallback
        return {"gpu": self.gpu, "comm": self.comm, "model_shape": dict(self.model_shape),
                "num_ubatches": self.num_ubatches, "num_steps": self.num_steps,
                "fallback": {"shared_after_dispatch_min_tokens":
                             fb.shared_after_dispatch_min_tokens,
                             "values_gather_early_tokens": list(fb.values_gather_early_tokens)},
                "buckets": [b.to_dict() for b in self.buckets], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulePlan:
        buckets = d.get("buckets")
        if not isinstance(buckets, list) or not buckets:
            raise ValueError("a schedule plan needs a non-empty 'buckets' list.")
        fb = d.get("fallback", {})
        fallback = SchedulePolicy(
            shared_after_dispatch_min_tokens=fb.get("shared_after_dispatch_min_tokens", 128),
            values_gather_early_tokens=tuple(fb.get("values_gather_early_tokens",
                                                    (128, 256))))
        return cls(buckets=tuple(PlannedBucket.from_dict(b) for b in buckets),
                   fallback=fallback, gpu=str(d.get("gpu", "")), comm=str(d.get("comm", "")),
                   model_shape=dict(d.get("model_shape", {})),
                   num_ubatches=int(d.get("num_ubatches", 2)),
                   num_steps=int(d.get("num_steps", 1)), meta=dict(d.get("meta", {})))

    @staticmethod
    def load_all(path: str | Path) -> list[SchedulePlan]:
        """Every schedule plan in a calibration file (none in a file from before plans)."""
        return _read_section(path, SCHEDULES_KEY, SchedulePlan.from_dict)[1]

    @classmethod
    def load(cls, path: str | Path, comm: str | None = None, *,
             model_shape: Mapping[str, Any] | None = None) -> SchedulePlan:
        """The plan of ``path`` for ``comm`` (and ``model_shape``, when given); ``comm``
        may be left out when exactly one plan matches."""
        return _pick(cls.load_all(path), path, comm, model_shape, "schedule plan",
                     have_what="plans for ",
                     empty_hint="write one with `python3 -m bench.profile_layer --plan` "
                                "(or SchedulePlan.save).")

    def save(self, path: str | Path) -> Path:
        """Write this plan into the calibration file ``path``, replacing a plan with the
        same ``key()`` and keeping everything else in the file (cost-model profiles, other
        plans). An unreadable file is kept aside as ``<name>.bak``."""
        return _write_section(path, SCHEDULES_KEY, self, SchedulePlan.from_dict,
                              lambda p: p.key() == self.key())


def plan_schedule(profiles: Mapping[int, StretchProfile] | Callable[[int], StretchProfile],
                  tokens: Iterable[int] | None = None, *,
                  fallback: SchedulePolicy | None = None, num_ubatches: int = 2,
                  num_steps: int = 1, gpu: str = "", comm: str = "",
                  model_shape: Mapping[str, Any] | None = None,
                  meta: Mapping[str, Any] | None = None,
                  keep_profiles: bool = True) -> SchedulePlan:
    """Plan each bucket: the fastest of the 8 placements in simulation.

    Args:
        profiles: ``{tokens_per_ubatch: StretchProfile}`` (comm included), or a function
            ``tokens -> StretchProfile``; every microbatch of a bucket gets that profile
            (an even split).
        tokens: the buckets (tokens per microbatch); default: the mapping's keys.
        fallback: the thresholds below the smallest bucket, and the placement a bucket
            keeps when nothing beats it (default ``SchedulePolicy()``).
        num_ubatches / num_steps: microbatches per step, decode steps per graph.
        gpu / comm / model_shape / meta: recorded in the plan.
        keep_profiles: store each bucket's profile in the plan (re-planning needs no GPU).
    """
    fallback = SchedulePolicy() if fallback is None else dataclasses.replace(fallback,
                                                                             planned=())
    if tokens is None:
        if not isinstance(profiles, Mapping):
            raise ValueError("plan_schedule with a profile function needs tokens=, the "
                             "buckets (tokens per microbatch) to plan.")
        tokens = profiles.keys()
    sizes = sorted(set(tokens))
    if not sizes:
        raise ValueError("plan_schedule needs at least one bucket (tokens per microbatch).")
    buckets = []
    for t in sizes:
        if isinstance(profiles, Mapping):
            if t not in profiles:
                raise KeyError(f"no stretch profile for {t} tokens per microbatch; profiles "
                               f"cover {sorted(profiles)}.")
            prof = profiles[t]
        else:
            prof = profiles(t)
        if not isinstance(prof, StretchProfile):
            raise TypeError(f"the profile for {t} tokens is a {type(prof).__name__}, not a "
                            "StretchProfile.")
        if prof.tokens_per_ubatch != t:
            raise ValueError(f"the profile given for {t} tokens per microbatch was measured "
                             f"at {prof.tokens_per_ubatch}.")
        fb = fallback.placement(t)
        best, best_us, times = best_placement(prof, num_ubatches=num_ubatches,
                                              num_steps=num_steps, prefer=fb)
        buckets.append(PlannedBucket(tokens_per_ubatch=t, placement=best,
                                     predicted_us=best_us, fallback_placement=fb,
                                     fallback_us=times[fb],
                                     profile=prof if keep_profiles else None))
    return SchedulePlan(buckets=tuple(buckets), fallback=fallback, gpu=gpu, comm=comm,
                        model_shape=dict(model_shape or {}), num_ubatches=num_ubatches,
                        num_steps=num_steps, meta=dict(meta or {}))
