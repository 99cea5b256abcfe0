"""Schedule policy: where movable work of a layer runs relative to its yields.

A layer of the two-microbatch schedule has two compute stretches, one before the dispatch
and one between dispatch and combine; each must line up with a transfer of the other
microbatch, so the compute stream idles for the difference between them in every layer.
Work that depends only on what is known before the dispatch (the shared expert, the next
layer's KV-cache gathers) can run in either stretch without changing any result. A
``SchedulePolicy`` says which, by microbatch size. It is separate from the model's shape
(``MoEConfig``) because the right answer depends on the card, the shape and the link:
``bench/profile_layer.py`` measures the stretches, ``coop_dbo.planner`` chooses the
``Placement`` of each batch bucket from them (``SchedulePlan.policy()``).

Two forms, one class:

* **thresholds** (the fallback): ``shared_after_dispatch_min_tokens`` and
  ``values_gather_early_tokens``, set from measurements of the benchmark's shape on one
  card;
* **planned**: ``planned``, a ``Placement`` per bucket of tokens per microbatch, from the
  planner. A microbatch uses the largest planned bucket at or below its size; one smaller
  than every planned bucket uses the thresholds.

This module needs no torch.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MOVABLE_PIECES", "Placement", "SchedulePolicy"]

#: The movable pieces of a layer, in the order the decoder runs them before the dispatch:
#: the next layer's cached keys and values gathers (a copy in attention's layout), then the
#: shared expert.
MOVABLE_PIECES: tuple[str, ...] = ("keys", "values", "shared")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which movable pieces of a layer run before its dispatch; the others run in the
    experts' stretch (between dispatch and combine, before the routed experts).

    Attributes:
        keys_before: gather the next layer's cached keys before the dispatch.
        values_before: gather the next layer's cached values before the dispatch.
        shared_before: run the shared expert before the dispatch.

    ``Placement()`` puts everything in the experts' stretch. No placement changes a result
    (each piece reads only what is known before the dispatch); it changes which compute
    stretch carries the piece's GPU time.
    """

    keys_before: bool = False
    values_before: bool = False
    shared_before: bool = False

    def __post_init__(self) -> None:
        for name in ("keys_before", "values_before", "shared_before"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Placement.{name} must be a bool, got "
                                f"{getattr(self, name)!r}.")

    def before(self) -> tuple[str, ...]:
        """The names (``MOVABLE_PIECES``) of the pieces placed before the dispatch."""
        return tuple(p for p in MOVABLE_PIECES if getattr(self, f"{p}_before"))

    def is_before(self, piece: str) -> bool:
        """Whether ``piece`` (one of ``MOVABLE_PIECES``) runs before the dispatch."""
        if piece not in MOVABLE_PIECES:
            raise ValueError(f"unknown movable piece {piece!r}: one of {MOVABLE_PIECES}.")
        return bool(getattr(self, f"{piece}_before"))

    @classmethod
    def from_before(cls, pieces: Iterable[str]) -> Placement:
        """The placement that runs ``pieces`` (names of ``MOVABLE_PIECES``) before the
        dispatch and the others after it."""
        if isinstance(pieces, str):
            raise TypeError(f"from_before takes a list of piece names, got the string "
                            f"{pieces!r}: write [{pieces!r}].")
        names = list(pieces)
        unknown = [p for p in names if p not in MOVABLE_PIECES]
        if unknown:
            raise ValueError(f"unknown movable piece(s) {unknown}: the pieces are "
                             f"{list(MOVABLE_PIECES)}.")
        return cls(**{f"{p}_before": p in names for p in MOVABLE_PIECES})

    def __str__(self) -> str:
        before = self.before()
        return "before the dispatch: " + (", ".join(before) if before else "nothing")


def _fallback_shape_error(lohi: Any) -> ValueError:
    return ValueError("values_gather_early_tokens must be a (lo, hi) pair of ints >= 0, got "
                      f"{lohi!r}.")


@dataclasses.dataclass(frozen=True)
class SchedulePolicy:
    """Placement of movable work in the reference decoder's layers.

    Attributes:
        shared_after_dispatch_min_tokens: microbatches of at least this many tokens run
            the shared expert between dispatch and combine (beside the routed experts),
            smaller ones before the dispatch. The default is the crossover measured for
            the benchmark's shape on one card (``bench/RESULTS.md``).
        values_gather_early_tokens: ``(lo, hi)``: microbatches of ``lo <= tokens < hi``
            gather the next layer's cached values before the dispatch (its keys after it,
            with the rest of the gather); ``(0, 0)`` turns it off.
        planned: ``((tokens_per_ubatch, Placement), ...)`` from the planner
            (``coop_dbo.planner``), any order (kept sorted by size); a ``Mapping`` of the
            same is accepted. Empty (the default): the thresholds alone decide.

    The thresholds never gather keys before the dispatch; a planned placement may.
    """

    shared_after_dispatch_min_tokens: int = 128
    values_gather_early_tokens: tuple[int, int] = (128, 256)
    # Sorted by tokens per microbatch, each size once, every size >= 1.
    planned: tuple[tuple[int, Placement], ...] = ()

    def __post_init__(self) -> None:
        if (not isinstance(self.shared_after_dispatch_min_tokens, int)
                or self.shared_after_dispatch_min_tokens < 0):
            raise ValueError("shared_after_dispatch_min_tokens must be an int >= 0, got "
                             f"{self.shared_after_dispatch_min_tokens!r}.")
        lohi = self.values_gather_early_tokens
        if (not isinstance(lohi, tuple) or len(lohi) != 2
                or not all(isinstance(v, int) and v >= 0 for v in lohi)):
            raise _fallback_shape_error(lohi)
        object.__setattr__(self, "planned", self._checked_plan(self.planned))

    @staticmethod
    def _checked_plan(planned: Any) -> tuple[tuple[int, Placement], ...]:
        items = list(planned.items()) if isinstance(planned, Mapping) else planned
        try:
            pairs = [tuple(item) for item in items]
        except TypeError:
            raise TypeError("planned must be a Mapping {tokens_per_ubatch: Placement} or "
                            f"(tokens_per_ubatch, Placement) pairs, got {planned!r}.") from None
        seen: set[int] = set()
        for pair in pairs:
            if (len(pair) != 2 or isinstance(pair[0], bool) or not isinstance(pair[0], int)
                    or pair[0] < 1 or not isinstance(pair[1], Placement)):
                raise ValueError("planned takes (tokens_per_ubatch, Placement) pairs with "
                                 f"tokens_per_ubatch an int >= 1, got {pair!r}.")
            if pair[0] in seen:
                raise ValueError(f"planned has two placements for {pair[0]} tokens per "
                                 "microbatch: give each bucket once.")
            seen.add(pair[0])
        return tuple(sorted(pairs, key=lambda p: p[0]))

    def fallback_placement(self, num_tokens: int) -> Placement:
        """The thresholds' placement for a microbatch of ``num_tokens`` tokens."""
        lo, hi = self.values_gather_early_tokens
        return Placement(keys_before=False, values_before=lo <= num_tokens < hi,
                         shared_before=num_tokens < self.shared_after_dispatch_min_tokens)

    def placement(self, num_tokens: int) -> Placement:
        """The placement of a microbatch of ``num_tokens`` tokens: the largest planned
        bucket at or below ``num_tokens``, else the thresholds'."""
        planned = self.planned
        if planned:
            i = bisect.bisect_right(planned, num_tokens, key=lambda p: p[0])
            if i:
                return planned[i - 1][1]
        return self.fallback_placement(num_tokens)

    def shared_before_dispatch(self, num_tokens: int) -> bool:
        """Whether a microbatch of ``num_tokens`` runs the shared expert before the dispatch."""
        return self.placement(num_tokens).shared_before

    def values_before_dispatch(self, num_tokens: int) -> bool:
        """Whether it gathers the next layer's cached values before the dispatch."""
        return self.placement(num_tokens).values_before

    def keys_before_dispatch(self, num_tokens: int) -> bool:
        """Whether it gathers the next layer's cached keys before the dispatch."""
        return self.placement(num_tokens).keys_before
