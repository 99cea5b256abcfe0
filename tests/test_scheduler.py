"""The greenlet microbatch scheduler: ordering, symmetry, faults, context, nesting."""

from __future__ import annotations

import contextvars
import gc
import re

import greenlet
import pytest

from coop_dbo import (
    SchedulerStateError,
    UBatchScheduler,
    YieldAsymmetryError,
    dbo_current_ubatch_id,
    dbo_yield,
    dbo_yield_and_switch,
)


class Recorder:
    """Collects (ubatch, label) pairs in the order they happen."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str]] = []

    def __call__(self, label: str) -> None:
        ub = dbo_current_ubatch_id()
        assert ub is not None
        self.events.append((ub, label))


def round_robin(num_ubatches: int, labels: list[str]) -> list[tuple[int, str]]:
    """The order symmetric microbatches must follow: each stretch, ub 0..n-1, in turn."""
    return [(ub, label) for label in labels for ub in range(num_ubatches)]


def symmetric_program(rec: Recorder, num_yields: int):
    def fn() -> int:
        for k in range(num_yields):
            rec(f"before{k}")
            dbo_yield(f"site{k}")
        rec("end")
        return dbo_current_ubatch_id()  # type: ignore[return-value]
    return fn


# -- ordering ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_ubatches", range(1, 9))
@pytest.mark.parametrize("num_yields", [0, 1, 3])
def test_round_robin_order_and_results(num_ubatches: int, num_yields: int) -> None:
    rec = Recorder()
    sched = UBatchScheduler(num_ubatches)
    fn = symmetric_program(rec, num_yields)
    results = sched.run([fn] * num_ubatches)
    assert results == list(range(num_ubatches))
    labels = [f"before{k}" for k in range(num_yields)] + ["end"]
    assert rec.events == round_robin(num_ubatches, labels)


def test_results_are_in_microbatch_order_not_completion_order() -> None:
    sched = UBatchScheduler(3)
    done: list[int] = []

    def fn(i: int):
        def body():
            dbo_yield("a")
            done.append(i)
            return f"r{i}"
        return body

    assert sched.run([fn(0), fn(1), fn(2)]) == ["r0", "r1", "r2"]
    assert done == [0, 1, 2]


def test_trace_records_every_yield_in_order() -> None:
    sched = UBatchScheduler(2, trace=True)
    sched.run([symmetric_program(Recorder(), 2)] * 2)
    got = [(e.ubatch, e.index, e.site, e.stream) for e in sched.last_trace]
    assert got == [(0, 0, "site0", "cpu"), (1, 0, "site0", "cpu"),
                   (0, 1, "site1", "cpu"), (1, 1, "site1", "cpu")]
    times = [e.time_us for e in sched.last_trace]
    assert times == sorted(times)


def test_trace_off_records_nothing() -> None:
    sched = UBatchScheduler(2)
    sched.run([symmetric_program(Recorder(), 2)] * 2)
    assert sched.last_trace == []


def test_switch_is_a_plain_yield_on_cpu() -> None:
    rec = Recorder()
    sched = UBatchScheduler(2, trace=True)

    def fn():
        rec("a")
        dbo_yield_and_switch("comm", "dispatch")
        rec("b")
        dbo_yield_and_switch("compute", "experts")
        rec("c")

    sched.run([fn, fn])
    assert rec.events == round_robin(2, ["a", "b", "c"])
    # recorded with the direction, as on CUDA (the symmetry check compares it)
    assert [e.kind for e in sched.last_trace] == ["switch->comm"] * 2 + ["switch->compute"] * 2


# -- outside a scheduler -------------------------------------------------------------------

def test_yields_are_noops_outside_a_scheduler() -> None:
    assert dbo_current_ubatch_id() is None
    dbo_yield("x")
    dbo_yield_and_switch("comm", "x")
    dbo_yield_and_switch("compute")
    assert dbo_current_ubatch_id() is None


def test_switch_rejects_unknown_stream_name() -> None:
    with pytest.raises(ValueError, match=r"must be 'comm' or 'compute', got 'gpu'"):
        dbo_yield_and_switch("gpu")  # type: ignore[arg-type]


# -- bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "2"])
def test_num_ubatches_validated(bad) -> None:
    with pytest.raises(ValueError, match=r"num_ubatches must be an int from 1 to 8"):
        UBatchScheduler(bad)


def test_wrong_number_of_callables() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "run() got 3 callables but the scheduler was made for 2 microbatches")):
        UBatchScheduler(2).run([lambda: 0] * 3)


def test_non_callable() -> None:
    with pytest.raises(TypeError, match=r"fns\[1\] is int, not a callable"):
        UBatchScheduler(2).run([lambda: 0, 5])  # type: ignore[list-item]


# -- symmetry ------------------------------------------------------------------------------

def run_programs(programs: list[list[str]], trace: bool = False):
    """Each microbatch yields at the listed sites, in order."""
    sched = UBatchScheduler(len(programs), trace=trace)

    def make(sites: list[str]):
        def fn():
            for s in sites:
                dbo_yield(s)
            return len(sites)
        return fn

    return sched, sched.run([make(p) for p in programs])


@pytest.mark.parametrize("programs, ubatch, index, expected, actual, msg", [
    # extra yield at the start of microbatch 1: site mismatch at index 0
    ([["a", "b"], ["x", "a", "b"]], 1, 0, "a", "x",
     "Microbatch 1 yielded at index 0 at site 'x', but the microbatch that reached index 0 "
     "first yielded at site 'a'."),
    # extra yield in the middle
    ([["a", "b", "c"], ["a", "x", "b", "c"]], 1, 1, "b", "x",
     "Microbatch 1 yielded at index 1 at site 'x', but the microbatch that reached index 1 "
     "first yielded at site 'b'."),
    # extra yield at the end of microbatch 1 (microbatch 0 returned first)
    ([["a", "b"], ["a", "b", "c"]], 1, 2, None, "c",
     "Microbatch 1 yielded at index 2 (site 'c'), but microbatch 0 returned after 2 "
     "yields."),
    # extra yield at the end of microbatch 0: microbatch 1 returns while 0 waits at index 2
    ([["a", "b", "c"], ["a", "b"]], 1, 2, "c", None,
     "Microbatch 1 returned after 2 yields, but microbatch 0 yielded at index 2 (site "
     "'c')."),
    # one microbatch with no yields at all
    ([["a", "b"], []], 1, 0, "a", None,
     "Microbatch 1 returned after 0 yields, but microbatch 0 yielded at index 0 (site "
     "'a')."),
    ([[], ["a"]], 1, 0, None, "a",
     "Microbatch 1 yielded at index 0 (site 'a'), but microbatch 0 returned after 0 "
     "yields."),
    # site mismatch with equal counts
    ([["dispatch", "combine"], ["dispatch", "dispatch"]], 1, 1, "combine", "dispatch",
     "Microbatch 1 yielded at index 1 at site 'dispatch', but the microbatch that reached "
     "index 1 first yielded at site 'combine'."),
    # three microbatches, the last one short
    ([["a", "b"], ["a", "b"], ["a"]], 2, 1, "b", None,
     "Microbatch 2 returned after 1 yields, but microbatch 0 yielded at index 1 (site "
     "'b')."),
])
def test_asymmetry_shapes(programs, ubatch, index, expected, actual, msg) -> None:
    with pytest.raises(YieldAsymmetryError) as info:
        run_programs(programs)
    err = info.value
    assert str(err).startswith(msg)
    assert "Yield counts so far:" in str(err)
    assert (err.ubatch, err.index, err.expected_site, err.actual_site) == (
        ubatch, index, expected, actual)
    assert isinstance(err, RuntimeError)
    assert err.trace is None


def test_asymmetry_error_carries_trace_when_tracing() -> None:
    with pytest.raises(YieldAsymmetryError) as info:
        run_programs([["a", "b"], ["a", "x"]], trace=True)
    assert [(e.ubatch, e.index, e.site) for e in info.value.trace] == [
        (0, 0, "a"), (1, 0, "a"), (0, 1, "b")]


def test_asymmetry_detected_before_later_yields_run() -> None:
    """The divergence surfaces at the diverging yield, not at the end of the step."""
    reached: list[str] = []

    def ub0():
        dbo_yield("a")
        for k in range(1000):
            dbo_yield(f"s{k}")
            reached.append(f"ub0 s{k}")

    def ub1():
        dbo_yield("a")
        dbo_yield("different")
        reached.append("ub1 after divergence")

    with pytest.raises(YieldAsymmetryError):
        UBatchScheduler(2).run([ub0, ub1])
    assert reached == []


def test_swallowed_asymmetry_still_fails_the_step() -> None:
    def ub0():
        dbo_yield("a")
        dbo_yield("b")
        return "ub0"

    def ub1():
        dbo_yield("a")
        try:
            dbo_yield("x")
        except RuntimeError:
            pass  # a model that catches too broadly must not hide the divergence
        dbo_yield("b")
        return "ub1"

    with pytest.raises(YieldAsymmetryError, match="site 'x'"):
        UBatchScheduler(2).run([ub0, ub1])


# -- exceptions ----------------------------------------------------------------------------

class Boom(Exception):
    pass


NUM_YIELDS = 3


@pytest.mark.parametrize("num_ubatches, failing",
                         [(n, f) for n in (2, 3) for f in range(n)])
@pytest.mark.parametrize("at_index", range(NUM_YIELDS + 1))
def test_exception_at_each_yield_index_unwinds_all(num_ubatches, failing, at_index) -> None:
    cleaned: list[int] = []
    sched = UBatchScheduler(num_ubatches)

    def fn():
        me = dbo_current_ubatch_id()
        try:
            for k in range(NUM_YIELDS + 1):
                if me == failing and k == at_index:
                    raise Boom(f"boom in {me} at {k}")
                if k < NUM_YIELDS:
                    dbo_yield(f"s{k}")
        finally:
            cleaned.append(me)  # type: ignore[arg-type]
        return me

    with pytest.raises(Boom, match=f"boom in {failing} at {at_index}") as info:
        sched.run([fn] * num_ubatches)
    assert info.value.ubatch_id == failing
    assert f"raised in microbatch {failing} of {num_ubatches}" in "".join(
        info.value.__notes__)
    # every microbatch that started ran its finally block exactly once
    assert sorted(cleaned) == sorted(set(cleaned))
    assert failing in cleaned
    started = set(range(num_ubatches)) if at_index > 0 else set(range(failing + 1))
    assert set(cleaned) == started
    # the same scheduler runs the next step fine
    rec = Recorder()
    assert sched.run([symmetric_program(rec, 2)] * num_ubatches) == list(
        range(num_ubatches))
    assert rec.events == round_robin(num_ubatches, ["before0", "before1", "end"])


def test_yields_during_unwinding_are_noops() -> None:
    order: list[str] = []

    def ub0():
        try:
            dbo_yield("a")
            dbo_yield("b")
        finally:
            dbo_yield("cleanup")  # must not switch (nor raise) while unwinding
            order.append("ub0 cleanup done")

    def ub1():
        dbo_yield("a")
        raise Boom("ub1")

    with pytest.raises(Boom):
        UBatchScheduler(2).run([ub0, ub1])
    assert order == ["ub0 cleanup done"]


def test_greenlet_exit_is_thrown_into_suspended_microbatches() -> None:
    seen: list[type] = []

    def ub0():
        try:
            dbo_yield("a")
        except BaseException as e:
            seen.append(type(e))
            raise

    def ub1():
        raise Boom("x")

    with pytest.raises(Boom):
        UBatchScheduler(2).run([ub0, ub1])
    assert seen == [greenlet.GreenletExit]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, greenlet.GreenletExit, SystemExit])
def test_base_exceptions_propagate(exc_type) -> None:
    cleaned: list[int] = []

    def ub0():
        try:
            dbo_yield("a")
            dbo_yield("b")
        finally:
            cleaned.append(0)

    def ub1():
        dbo_yield("a")
        raise exc_type()

    sched = UBatchScheduler(2)
    with pytest.raises(exc_type) as info:
        sched.run([ub0, ub1])
    assert info.value.ubatch_id == 1
    assert cleaned == [0]
    assert sched.run([lambda: 1, lambda: 2]) == [1, 2]


def test_cleanup_error_is_noted_not_lost() -> None:
    def ub0():
        try:
            dbo_yield("a")
        finally:
            raise ValueError("cleanup broke")

    def ub1():
        raise Boom("first")

    with pytest.raises(Boom) as info:
        UBatchScheduler(2).run([ub0, ub1])
    assert any("cleanup broke" in n for n in info.value.__notes__)


# -- context -------------------------------------------------------------------------------

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_contextvars_isolated_per_microbatch() -> None:
    VAR.set("caller")
    seen: list[tuple[int, str]] = []

    def fn():
        me = dbo_current_ubatch_id()
        seen.append((me, VAR.get()))  # inherits the caller's value
        VAR.set(f"ub{me}")
        dbo_yield("a")
        seen.append((me, VAR.get()))  # its own value survived the other's set
        dbo_yield("b")
        return VAR.get()

    assert UBatchScheduler(3).run([fn] * 3) == ["ub0", "ub1", "ub2"]
    assert seen == [(0, "caller"), (1, "caller"), (2, "caller"),
                    (0, "ub0"), (1, "ub1"), (2, "ub2")]
    assert VAR.get() == "caller"  # the caller's context is untouched
    assert dbo_current_ubatch_id() is None


def test_ubatch_id_follows_each_switch() -> None:
    ids: list[int | None] = []

    def fn():
        for _ in range(3):
            ids.append(dbo_current_ubatch_id())
            dbo_yield("s")
        ids.append(dbo_current_ubatch_id())

    UBatchScheduler(2).run([fn, fn])
    assert ids == [0, 1] * 4


# -- nesting -------------------------------------------------------------------------------

def test_nested_run_is_an_error() -> None:
    inner = UBatchScheduler(2)

    def fn():
        inner.run([lambda: 0, lambda: 1])

    with pytest.raises(SchedulerStateError, match=re.escape(
            "UBatchScheduler.run() was called from inside microbatch 0 of a running "
            "scheduler. Microbatches cannot be nested")):
        UBatchScheduler(2).run([fn, fn])
    assert inner.run([lambda: 0, lambda: 1]) == [0, 1]


def test_reentering_the_same_scheduler_is_an_error() -> None:
    sched = UBatchScheduler(1)

    def fn():
        # run() from a fresh context (e.g. a callback) is still refused by this scheduler
        return contextvars.Context().run(sched.run, [lambda: 0])

    with pytest.raises(SchedulerStateError, match="already running a step"):
        sched.run([fn])
    assert sched.run([lambda: 3]) == [3]


# -- stress --------------------------------------------------------------------------------

def test_100k_yields_and_no_greenlet_leak() -> None:
    gc.collect()
    me = greenlet.getcurrent()  # the main greenlet exists from here on: not counted
    before = sum(isinstance(o, greenlet.greenlet) and o is not me for o in gc.get_objects())
    count = [0, 0]

    def fn():
        me = dbo_current_ubatch_id()
        for _ in range(50_000):
            count[me] += 1  # type: ignore[index]
            dbo_yield("s")
        return me

    sched = UBatchScheduler(2)
    assert sched.run([fn, fn]) == [0, 1]
    assert count == [50_000, 50_000]
    for _ in range(200):
        sched.run([lambda: 0, lambda: 1])
    workers = {id(g) for g in sched._workers}
    for _ in range(5):  # the same worker greenlets run every step
        sched.run([lambda: 0, lambda: 1])
        assert {id(g) for g in sched._workers} == workers
    del sched  # its workers go with it
    gc.collect()
    after = sum(isinstance(o, greenlet.greenlet) and o is not me for o in gc.get_objects())
    assert after <= before


def test_grad_mode_follows_each_microbatch_and_caller_gets_its_own_back() -> None:
    import torch

    seen: list[tuple[int, bool]] = []

    def ub0():
        with torch.no_grad():
            dbo_yield("a")  # microbatch 1 runs here with grad mode on
            seen.append((0, torch.is_grad_enabled()))
            dbo_yield("b")
        seen.append((0, torch.is_grad_enabled()))

    def ub1():
        seen.append((1, torch.is_grad_enabled()))
        dbo_yield("a")
        with torch.enable_grad():
            dbo_yield("b")
            seen.append((1, torch.is_grad_enabled()))

    assert torch.is_grad_enabled()
    UBatchScheduler(2).run([ub0, ub1])
    assert seen == [(1, True), (0, False), (0, True), (1, True)]
    assert torch.is_grad_enabled()
    with torch.no_grad():
        UBatchScheduler(2).run([lambda: torch.set_grad_enabled(True), lambda: None])
        assert not torch.is_grad_enabled()


def test_plain_yield_and_stream_switch_at_one_site_are_asymmetric() -> None:
    def ub0():
        dbo_yield("dispatch")

    def ub1():
        dbo_yield_and_switch("comm", "dispatch")

    with pytest.raises(YieldAsymmetryError, match=re.escape(
            "Microbatch 1 yielded at index 0 (site 'dispatch') with a stream switch to comm, "
            "but the microbatch that reached index 0 first yielded there with a plain "
            "yield.")):
        UBatchScheduler(2).run([ub0, ub1])
