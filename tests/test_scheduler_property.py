"""Hypothesis: random yield programs against a model of round-robin scheduling."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from coop_dbo import UBatchScheduler, YieldAsymmetryError, dbo_yield

SITES = ["dispatch", "combine", "attn", "post"]


def model_of_round_robin(programs: list[list[str]]):
    """Expected trace [(ubatch, index, site)] of symmetric programs, or None if asymmetric."""
    if any(p != programs[0] for p in programs):
        return None
    return [(ub, k, site) for k, site in enumerate(programs[0])
            for ub in range(len(programs))]


def run(programs: list[list[str]]):
    sched = UBatchScheduler(len(programs), trace=True)

    def make(i: int, sites: list[str]):
        def fn():
            for s in sites:
                dbo_yield(s)
            return i
        return fn

    results = sched.run([make(i, p) for i, p in enumerate(programs)])
    return results, [(e.ubatch, e.index, e.site) for e in sched.last_trace]


programs_strategy = st.integers(1, 8).flatmap(
    lambda n: st.one_of(
        # symmetric: one program for all microbatches
        st.lists(st.sampled_from(SITES), max_size=12).map(lambda p: [list(p)] * n),
        # arbitrary: each microbatch its own program (mostly asymmetric)
        st.lists(st.lists(st.sampled_from(SITES), max_size=8), min_size=n, max_size=n),
    ))


@settings(max_examples=400, deadline=None)
@given(programs_strategy)
def test_trace_matches_round_robin_model(programs: list[list[str]]) -> None:
    expected = model_of_round_robin(programs)
    if expected is None:
        try:
            run(programs)
        except YieldAsymmetryError as err:
            # the error points at a microbatch and index where programs really differ
            p = programs[err.ubatch]
            mine = p[err.index] if err.index < len(p) else None
            assert mine == err.actual_site
            assert any((q[err.index] if err.index < len(q) else None) != mine
                       for q in programs)
        else:
            raise AssertionError(f"asymmetric programs ran without error: {programs}")
    else:
        results, trace = run(programs)
        assert results == list(range(len(programs)))
        assert trace == expected
