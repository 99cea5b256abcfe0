"""Schedule policy: where movable work of a layer runs relative to its yields.

A layer of the two-microbatch schedule has two compute stretches, one before the dispatch
and one between dispatch and combine; each must line up with a transfer of the other
microbatch, so the compute stream idles for the difference between them in every layer.
Work that depends only on what is known before the dispatch (the shared expert, the next
layer's KV-cache gathers) can run in either stretch without changing any result. A
``SchedulePolicy`` says which, by microbatch size. It is separate from the model's shape
(``MoEConfig``) because the right answer depends on the card, the shape and the link:
``bench/profile_layer.py`` measures the stretches a policy should even out.
"""

from __future__ import annotations

import dataclasses

__all__ = ["SchedulePolicy"]


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
    """

    shared_after_dispatch_min_tokens: int = 128
    values_gather_early_tokens: tuple[int, int] = (128, 256)

    def __post_init__(self) -> None:
        if (not isinstance(self.shared_after_dispatch_min_tokens, int)
                or self.shared_after_dispatch_min_tokens < 0):
            raise ValueError("shared_after_dispatch_min_tokens must be an int >= 0, got "
                             f"{self.shared_after_dispatch_min_tokens!r}.")
        lohi = self.values_gather_early_tokens
        if (not isinstance(lohi, tuple) or len(lohi) != 2
                or not all(isinstance(v, int) and v >= 0 for v in lohi)):
            raise ValueError("values_gather_early_tokens must be a (lo, hi) pair of ints "
                             f">= 0, got {lohi!r}.")

    def shared_before_dispatch(self, num_tokens: int) -> bool:
        """Whether a microbatch of ``num_tokens`` runs the shared expert before the dispatch."""
        return num_tokens < self.shared_after_dispatch_min_tokens

    def values_before_dispatch(self, num_tokens: int) -> bool:
        """Whether it gathers the next layer's cached values before the dispatch."""
        lo, hi = self.values_gather_early_tokens
        return lo <= num_tokens < hi
