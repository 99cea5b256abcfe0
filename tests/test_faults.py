"""Reliability on CPU: faults at every yield, asymmetric programs, interrupts, ranks that
disagree or fail, failing communication, and bad input. Nothing hangs, the error names the
microbatch, and the next step on the same runner is exactly right.

Every case here is counted in ``docs/FAULTS.md``.
"""

from __future__ import annotations

import contextvars
import gc
import re
import signal
import types

import greenlet
import pytest
import torch
from deep_ep_double import FakeLowLatencyBuffer
from fault_workers import (
    CAPTURE_FAILURE_STEPS,
    DISAGREEMENT_STEPS,
    GRAPH_AGREEMENT_STEPS,
    MIDSTEP_FAULTS,
    SMALL_CFG_KW,
    FaultySingleProcessBackend,
    InjectedFault,
    YieldFaults,
    capture_agreement_worker,
    capture_failure_worker,
    disagreement_worker,
    faulty_deep_ep_buffer,
    graph_agreement_worker,
    interrupted_capture_worker,
    late_split_worker,
    midstep_fault_worker,
    spawn_bounded,
    step_inputs,
)
from helpers import rendezvous_files, routed_tokens, run_sequential
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import coop_dbo.greenlet_sched as gs
from coop_dbo import (
    CoopDBORunner,
    UBatchScheduler,
    YieldAsymmetryError,
    dbo_current_ubatch_id,
    dbo_yield,
    dbo_yield_and_switch,
    format_trace,
    install_moe_hooks,
    remove_moe_hooks,
)
from coop_dbo.backends import DeepEPLowLatencyBackend, SingleProcessBackend, validate_routing
from coop_dbo.errors import CaptureError, SchedulerStateError, SplitError, UnsupportedModelError
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.moe_hooks import YIELD_SITES, moe_exchange, swiglu_experts
from coop_dbo.split import balanced_sizes

# nothing here may hang (the gloo tests allow more)
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_intra_op_thread")]

CFG = MoEConfig.tiny(**SMALL_CFG_KW)
SWITCH_YIELDS = len(YIELD_SITES["switch"]) * CFG.num_layers  # per microbatch and step
HOOK_YIELDS = len(YIELD_SITES["hook"]) * CFG.num_layers


@pytest.fixture
def faults():
    f = YieldFaults(None)
    with f.installed():
        yield f


def live_greenlets() -> int:
    """Greenlet objects alive (a scheduler's own workers included), besides the one
    running this (the main greenlet)."""
    gc.collect()
    me = greenlet.getcurrent()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o is not me)


def deep_ep_model(buf=None) -> tuple[MoEDecoder, DeepEPLowLatencyBackend]:
    backend = DeepEPLowLatencyBackend(buf if buf is not None else FakeLowLatencyBuffer(),
                                      CFG.num_experts, num_max_dispatch_tokens_per_rank=8)
    return MoEDecoder(CFG, backend), backend


def assert_next_step_exact(runner: CoopDBORunner, reference: MoEDecoder, step: int = 1,
                           batch: int = 7) -> None:
    """A step on fresh KV-cache slots equals the same microbatches run one by one on a
    model that never saw the failure (bitwise: same shapes, same kernels)."""
    inputs = step_inputs(CFG, batch, step, seed=50 + step)
    out = runner(*inputs)
    assert runner.last_path == "eager-dbo"
    assert torch.equal(out, run_sequential(reference, inputs, runner.num_ubatches))


def ubatch_note(exc: BaseException, ubatch: int, num: int) -> bool:
    return (f"coop_dbo: raised in microbatch {ubatch} of {num}; the other microbatches "
            "were unwound.") in getattr(exc, "__notes__", [])


# -- an exception at every yield of every microbatch, through the runner -------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_ubatches, ubatch",
                         [(n, i) for n in (2, 3) for i in range(n)])
@pytest.mark.parametrize("index", range(SWITCH_YIELDS + 1))
def test_fault_at_every_yield_of_every_microbatch(faults, num_ubatches, ubatch,
                                                  index) -> None:
    """index == SWITCH_YIELDS: the microbatch raises as its model call returns."""
    model = MoEDecoder(CFG)
    runner = CoopDBORunner(faults.wrap(model), num_ubatches=num_ubatches)
    faults.set(ubatch, index)
    with pytest.raises(InjectedFault, match=re.escape(
            f"injected fault in microbatch {ubatch} at yield {index}")) as info:
        runner(*step_inputs(CFG, 8, 0, seed=index))
    assert info.value.ubatch_id == ubatch
    assert ubatch_note(info.value, ubatch, num_ubatches)
    assert faults.fired == 1
    # every microbatch that started ran its finally exactly once; with a fault at yield 0
    # the microbatches after the failing one never started
    started = set(range(ubatch + 1)) if index == 0 else set(range(num_ubatches))
    assert sorted(faults.started) == sorted(started)
    assert sorted(faults.cleaned) == sorted(started)
    assert not runner.scheduler._running and dbo_current_ubatch_id() is None
    faults.set(None)
    assert_next_step_exact(runner, MoEDecoder(CFG))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ubatch", [0, 1])
@pytest.mark.parametrize("index", range(HOOK_YIELDS + 1))
def test_fault_at_every_yield_hook_schedule_releases_deep_ep_buffers(faults, ubatch,
                                                                     index) -> None:
    """deep_ep's hook schedule: a microbatch unwound between a send and its receive hook
    still holds a low-latency buffer; it must be released, or the backend refuses every
    later step ("a third dispatch was started while 2 were still held")."""
    buf = FakeLowLatencyBuffer()
    model, backend = deep_ep_model(buf)
    runner = CoopDBORunner(faults.wrap(model))
    faults.set(ubatch, index)
    with pytest.raises(InjectedFault, match=f"microbatch {ubatch} at yield {index}") as info:
        runner(*step_inputs(CFG, 8, 0, seed=index))
    assert info.value.ubatch_id == ubatch
    assert backend.num_held == 0 and buf.num_held == 0
    faults.set(None)
    for step in (1, 2, 3):
        assert_next_step_exact(runner, deep_ep_model()[0], step)
    assert backend.num_held == 0 and buf.num_held == 0


def test_too_many_microbatches_for_deep_ep_leaves_backend_usable() -> None:
    buf = FakeLowLatencyBuffer()
    model, backend = deep_ep_model(buf)
    with pytest.raises(RuntimeError, match=re.escape(
            "deep_ep low-latency holds at most 2 results at once; a third dispatch was "
            "started while 2 were still held.")) as info:
        CoopDBORunner(model, num_ubatches=3)(*step_inputs(CFG, 8, 0, seed=1))
    assert info.value.ubatch_id == 2
    assert backend.num_held == 0 and buf.num_held == 0
    assert_next_step_exact(CoopDBORunner(model, num_ubatches=2), deep_ep_model()[0])


# -- KeyboardInterrupt, GreenletExit, SystemExit ---------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, greenlet.GreenletExit, SystemExit])
@pytest.mark.parametrize("ubatch, index", [(0, 0), (1, 0), (0, 3), (1, 5),
                                           (1, SWITCH_YIELDS)])
def test_base_exception_in_a_microbatch_through_runner(faults, exc_type, ubatch,
                                                       index) -> None:
    model = MoEDecoder(CFG)
    runner = CoopDBORunner(faults.wrap(model))
    faults.set(ubatch, index, exc_type)
    with pytest.raises(exc_type) as info:
        runner(*step_inputs(CFG, 8, 0, seed=3))
    assert type(info.value) is exc_type
    assert info.value.ubatch_id == ubatch
    assert sorted(faults.cleaned) == sorted(faults.started)
    assert len(faults.started) == (ubatch + 1 if index == 0 else 2)
    faults.set(None)
    assert_next_step_exact(runner, MoEDecoder(CFG))


@pytest.fixture
def default_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("index", [0, 2, 7])
def test_real_sigint_inside_a_microbatch(faults, default_sigint, index) -> None:
    """Ctrl-C as the OS delivers it: the default handler raises KeyboardInterrupt in
    whatever greenlet runs, here microbatch 1."""

    def sigint() -> BaseException:
        signal.raise_signal(signal.SIGINT)
        return AssertionError("SIGINT did not raise")  # pragma: no cover

    model = MoEDecoder(CFG)
    runner = CoopDBORunner(faults.wrap(model))
    faults.set(1, index, sigint)
    with pytest.raises(KeyboardInterrupt) as info:
        runner(*step_inputs(CFG, 8, 0, seed=4))
    assert info.value.ubatch_id == 1
    assert sorted(faults.cleaned) == [0, 1]
    faults.set(None)
    assert_next_step_exact(runner, MoEDecoder(CFG))


@pytest.mark.timeout(60)
def test_keyboard_interrupt_in_the_scheduler_loop_unwinds_suspended_microbatches(
        monkeypatch) -> None:
    """Ctrl-C can land in ``run``'s own loop (between two microbatch greenlets) rather than
    in a microbatch: the suspended microbatches must still be unwound before ``run``
    raises, so their ``finally`` blocks (and the deep_ep buffer release) run now."""
    real_next_live = gs._Step.next_live
    fired = []

    def next_live(self, after):
        if not fired and greenlet.getcurrent().parent is None:  # run()'s loop, not a yield
            fired.append(after)
            raise KeyboardInterrupt
        return real_next_live(self, after)

    monkeypatch.setattr(gs._Step, "next_live", next_live)
    cleaned: list[int] = []

    def model(x):
        me = dbo_current_ubatch_id()
        try:
            dbo_yield("a")
            dbo_yield("b")
            return x  # microbatch 0 returns first: run()'s loop runs, Ctrl-C lands there
        finally:
            cleaned.append(me)  # type: ignore[arg-type]

    before = live_greenlets()
    runner = CoopDBORunner(model, num_ubatches=3)
    try:
        runner(torch.ones(6, 2))
    except KeyboardInterrupt:
        cleaned_when_raised = sorted(cleaned)  # the traceback (and run's frame) still live
    else:
        pytest.fail("KeyboardInterrupt did not propagate")
    assert fired == [0]
    assert cleaned_when_raised == [0, 1, 2]
    monkeypatch.setattr(gs._Step, "next_live", real_next_live)
    assert torch.equal(CoopDBORunner(lambda x: (dbo_yield("a"), x * 2)[1], num_ubatches=3)(
        torch.ones(6, 2)), torch.full((6, 2), 2.0))
    del runner  # its scheduler's worker greenlets go with it
    assert live_greenlets() <= before


def test_keyboard_interrupt_during_unwinding_is_not_swallowed() -> None:
    """Microbatch 1 fails; while microbatch 0 unwinds, Ctrl-C arrives in its cleanup. The
    KeyboardInterrupt must reach the caller (a serving loop that catches ``Exception``
    per request would otherwise never stop), carrying the first error as a note."""

    def model(x):
        if dbo_current_ubatch_id() == 1:
            raise InjectedFault("first")
        try:
            dbo_yield("a")
        finally:
            raise KeyboardInterrupt
        return x  # pragma: no cover

    runner = CoopDBORunner(model)
    with pytest.raises(KeyboardInterrupt) as info:
        runner(torch.ones(4, 2))
    notes = "\n".join(info.value.__notes__)
    assert "coop_dbo: raised while unwinding microbatch 0 after microbatch 1 raised " \
           "InjectedFault('first')" in notes
    assert isinstance(info.value.__context__, InjectedFault)
    assert info.value.ubatch_id == 0
    # an ordinary Exception in cleanup stays a note on the first error
    def model2(x):
        if dbo_current_ubatch_id() == 1:
            raise InjectedFault("first")
        try:
            dbo_yield("a")
        finally:
            raise ValueError("cleanup broke")
        return x  # pragma: no cover

    with pytest.raises(InjectedFault, match="first") as info2:
        CoopDBORunner(model2)(torch.ones(4, 2))
    assert any("cleanup raised ValueError('cleanup broke')" in n
               for n in info2.value.__notes__)


# -- asymmetric yield programs (hypothesis) --------------------------------------------------

SITES = ["dispatch", "experts", "combine", "post"]
KINDS = ["yield", "comm", "compute"]
_STEP = st.tuples(st.sampled_from(SITES), st.sampled_from(KINDS))


@st.composite
def asymmetric_programs(draw):
    """A symmetric base program, then 1..n microbatches mutated so that their sites or
    yield kinds (plain or stream switch) differ."""
    n = draw(st.integers(2, 6))
    base = draw(st.lists(_STEP, max_size=10))
    programs = [list(base) for _ in range(n)]
    for v in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)):
        p = programs[v]
        op = draw(st.sampled_from(["drop", "insert", "change", "truncate", "extend"]))
        if op in ("drop", "change", "truncate") and not p:
            op = "insert"
        if op == "drop":
            del p[draw(st.integers(0, len(p) - 1))]
        elif op == "insert":
            p.insert(draw(st.integers(0, len(p))), draw(_STEP))
        elif op == "change":
            j = draw(st.integers(0, len(p) - 1))
            p[j] = (draw(st.sampled_from([s for s in SITES if s != p[j][0]])), p[j][1])
        elif op == "truncate":
            del p[draw(st.integers(0, len(p) - 1)):]
        else:
            p.extend(draw(st.lists(_STEP, min_size=1, max_size=3)))
    assume(any(p != programs[0] for p in programs))
    swallow = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return base, programs, swallow


_SCHEDULERS: dict[int, UBatchScheduler] = {}  # reused across examples: state must not leak


def _program_fn(program, swallow: bool, log: list):
    def fn():
        me = dbo_current_ubatch_id()
        for site, kind in program:
            try:
                if kind == "yield":
                    dbo_yield(site)
                else:
                    dbo_yield_and_switch(kind, site)
            except Exception:
                if not swallow:
                    raise
            log.append((me, site))
        return me
    return fn


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(asymmetric_programs())
def test_asymmetric_programs_always_raise_never_hang(case) -> None:
    base, programs, swallow = case
    n = len(programs)
    sched = _SCHEDULERS.setdefault(n, UBatchScheduler(n, trace=True))
    log: list = []
    with pytest.raises(YieldAsymmetryError) as info:
        sched.run([_program_fn(p, s, log) for p, s in zip(programs, swallow)])
    err = info.value
    sites = [[s for s, _ in p] for p in programs]
    mine = sites[err.ubatch][err.index] if err.index < len(sites[err.ubatch]) else None
    assert mine == err.actual_site
    # the scheduler compares (site, kind) per index; a switch to "comm" and one to
    # "compute" are different kinds on the CPU too, as on CUDA
    at = [q[err.index] if err.index < len(q) else None for q in programs]
    assert any(a != at[err.ubatch] for a in at)
    # the microbatch that diverged stopped right there, unless it swallowed the error
    # (then every later yield was a no-op and it ran to its end)
    ran = [s for u, s in log if u == err.ubatch]
    assert len(ran) == (len(sites[err.ubatch]) if swallow[err.ubatch] else err.index)
    # the same scheduler runs the next (symmetric) step in exact round-robin order
    log.clear()
    assert sched.run([_program_fn(base, False, log)] * n) == list(range(n))
    assert log == [(u, s) for s, _ in base for u in range(n)]
    assert [(e.ubatch, e.site) for e in sched.last_trace] == log


NUM_FLAGS = 4


def _data_dependent_model(x: torch.Tensor) -> torch.Tensor:
    """Yields at flag ``l`` only when a row of this microbatch has it set: the classic
    "skip the exchange when no token is routed to expert l" bug."""
    out = x.clone()
    for col in range(NUM_FLAGS):
        if bool(x[:, col].any()):
            dbo_yield(f"expert{col}")
            out[:, col] += 1
    return out * 2


@pytest.mark.timeout(60)
@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.booleans(), min_size=NUM_FLAGS, max_size=NUM_FLAGS),
                     min_size=1, max_size=9),
       num_ubatches=st.integers(2, 4))
def test_data_dependent_yields_never_hang_never_wrong(rows, num_ubatches) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    runner = CoopDBORunner(_data_dependent_model, num_ubatches=num_ubatches)
    if len(rows) < num_ubatches:
        assert torch.equal(runner(x), _data_dependent_model(x))
        assert runner.last_path == "plain"
        return
    chunks = x.split(balanced_sizes(len(rows), num_ubatches))
    programs = [[c for c in range(NUM_FLAGS) if bool(ch[:, c].any())] for ch in chunks]
    if all(p == programs[0] for p in programs):
        assert torch.equal(runner(x), _data_dependent_model(x))
        assert runner.last_path == "eager-dbo"
    else:
        with pytest.raises(YieldAsymmetryError):
            runner(x)
        assert not runner.scheduler._running


CFG3 = MoEConfig.tiny(**{**SMALL_CFG_KW, "num_layers": 3})
_FIRST_SLOT: contextvars.ContextVar[int] = contextvars.ContextVar("first_slot")


def _skipping_decoder(backend, skip: list[set[int]]):
    """A decoder whose layer ``l`` skips its MoE in the microbatches that start at the
    slots ``skip[l]`` (the microbatch is told by its first KV-cache slot, so the plain
    sequential reference makes the same choices)."""
    model = MoEDecoder(CFG3, backend)
    for li, layer in enumerate(model.layers):
        real = layer.moe

        def moe(self, x, shared_experts, real=real, li=li):
            if _FIRST_SLOT.get() in skip[li]:
                return x * 0.5  # "nothing routed here": no exchange, no yields
            return real(x, shared_experts)
        layer.moe = types.MethodType(moe, layer)

    def forward(tokens, positions, slots):
        token = _FIRST_SLOT.set(int(slots[0]))
        try:
            return model(tokens, positions, slots)
        finally:
            _FIRST_SLOT.reset(token)
    return forward


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["switch", "hook"]), data=st.data())
def test_decoder_skipping_moe_layers_never_hangs_never_wrong(kind, data) -> None:
    n = 3 if kind == "switch" else 2
    batch = 7
    starts = [0, *torch.tensor(balanced_sizes(batch, n)).cumsum(0).tolist()[:-1]]
    skip = [set(starts[i] for i in data.draw(st.sets(st.integers(0, n - 1)), label=f"L{li}"))
            for li in range(CFG3.num_layers)]

    def make():
        if kind == "switch":
            return SingleProcessBackend(CFG3.num_experts), None
        buf = FakeLowLatencyBuffer()
        return DeepEPLowLatencyBackend(buf, CFG3.num_experts, 8), buf

    backend, buf = make()
    runner = CoopDBORunner(_skipping_decoder(backend, skip), num_ubatches=n)
    inputs = (torch.arange(batch) % CFG3.vocab_size, torch.arange(batch) % 5,
              torch.arange(batch))
    # the decoder's sites name the layer (``L<l>.moe.dispatch``), so microbatches are
    # symmetric only when they skip the same layers, not merely as many
    skipped = [frozenset(li for li, s in enumerate(skip) if starts[i] in s) for i in range(n)]
    if len(set(skipped)) == 1:
        out = runner(*inputs)
        ref = run_sequential(_skipping_decoder(make()[0], skip), inputs, n)
        assert torch.equal(out, ref)
    else:
        with pytest.raises(YieldAsymmetryError):
            runner(*inputs)
    if buf is not None:
        assert backend.num_held == 0 and buf.num_held == 0


# -- communication backends that fail --------------------------------------------------------

def _fault_error(kind: str, method: str, ubatch: int, call: int):
    if kind == "timeout":
        return TimeoutError, re.escape(f"{method} timed out after 20 ms (microbatch {ubatch}, "
                                       f"call {call})")
    return InjectedFault, re.escape(f"{method} failed (microbatch {ubatch}, call {call})")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", FaultySingleProcessBackend.PHASES)
@pytest.mark.parametrize("ubatch", [0, 1])
@pytest.mark.parametrize("call", [0, 1])
@pytest.mark.parametrize("kind", ["raise", "timeout"])
def test_switch_backend_fails_in_send_or_receive(method, ubatch, call, kind) -> None:
    backend = FaultySingleProcessBackend(CFG.num_experts)
    backend.arm_fault(method, ubatch, call, kind)
    runner = CoopDBORunner(MoEDecoder(CFG, backend))
    exc_type, msg = _fault_error(kind, method, ubatch, call)
    with pytest.raises(exc_type, match=msg) as info:
        runner(*step_inputs(CFG, 8, 0, seed=5))
    assert info.value.ubatch_id == ubatch and ubatch_note(info.value, ubatch, 2)
    assert backend.fault_fired == 1
    backend.arm_fault(None)
    assert_next_step_exact(runner, MoEDecoder(CFG))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["dispatch_send", "dispatch_hook", "combine_send",
                                    "combine_hook"])
@pytest.mark.parametrize("ubatch", [0, 1])
@pytest.mark.parametrize("call", [0, 1])
@pytest.mark.parametrize("kind", ["raise", "timeout"])
def test_deep_ep_fails_in_send_or_receive_hook(method, ubatch, call, kind) -> None:
    buf = faulty_deep_ep_buffer()
    buf.arm_fault(method, ubatch, call, kind)
    model, backend = deep_ep_model(buf)
    runner = CoopDBORunner(model)
    exc_type, msg = _fault_error(kind, method, ubatch, call)
    with pytest.raises(exc_type, match=msg) as info:
        runner(*step_inputs(CFG, 8, 0, seed=6))
    assert info.value.ubatch_id == ubatch and ubatch_note(info.value, ubatch, 2)
    assert buf.fault_fired == 1
    assert backend.num_held == 0 and buf.num_held == 0
    buf.arm_fault(None)
    for step in (1, 2):
        assert_next_step_exact(runner, deep_ep_model()[0], step)
    assert backend.num_held == 0 and buf.num_held == 0


# -- ranks that disagree or fail (2 processes, gloo) -----------------------------------------

def two_gloo_ranks(worker, tmp_path, name: str, *extra) -> list:
    """``worker(rank, world, rendezvous, out_dir, *extra)`` on two gloo ranks (150 s at
    most), both exiting cleanly; what each rank saved as ``<name><rank>.pt``."""
    codes, wall = spawn_bounded(worker, (rendezvous_files(tmp_path, 1)[0], str(tmp_path),
                                         *extra), deadline_s=150)
    assert codes == [0, 0], f"workers exited with {codes} after {wall:.0f} s"
    return [torch.load(tmp_path / f"{name}{i}.pt", weights_only=False) for i in range(2)]


@pytest.mark.timeout(180)
def test_ranks_capture_replay_or_run_eagerly_together_gloo(tmp_path) -> None:
    """A rank that must capture a whole call's graph (a new key, or a capture that failed
    on it) takes every rank with it: warm-up runs the step's collectives, so a peer that
    replayed instead would pair them with the wrong step and wait for ever."""
    r = two_gloo_ranks(graph_agreement_worker, tmp_path, "graphs")
    expected = ["graph:8"] * 4 + ["eager-dbo"] * 2 + ["graph:8", "eager-dbo", "graph:8"]
    for rank in range(2):
        assert [s["path"] for s in r[rank]["graph"]] == expected, rank
        assert {s["path"] for s in r[rank]["eager"]} == {"eager-dbo"}
        for step, (g, e) in enumerate(zip(r[rank]["graph"], r[rank]["eager"], strict=True)):
            assert torch.equal(g["out"], e["out"]), (rank, step)
    assert len(GRAPH_AGREEMENT_STEPS) == len(expected)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("watchdog", [False, True], ids=["no-watchdog", "watchdog"])
def test_a_capture_failing_on_one_rank_stops_every_rank_gloo(tmp_path, watchdog) -> None:
    """Every rank raises at the failing size; with a watchdog too, and then the group is
    left usable (no rank breaks it: the later steps run, and no error says it broke)."""
    r = two_gloo_ranks(capture_failure_worker, tmp_path, "capture", watchdog)
    assert [len(x) for x in r] == [len(CAPTURE_FAILURE_STEPS)] * 2
    peer = ("a peer rank failed to capture the step of batch 16 (see its error), so this "
            "rank stops capturing too and no rank waits in a collective. Fix that error; "
            "the next call captures again.")
    for step, why in ((0, "out of memory making the example inputs (stand-in)"),
                      (1, "operation not permitted when stream is capturing (stand-in)")):
        assert r[1][step]["error"]["type"] == "RuntimeError"
        assert r[1][step]["error"]["msg"] == why
        assert r[0][step]["error"]["type"] == "CaptureError"
        assert r[0][step]["error"]["msg"] == peer
        assert r[0][step]["error"]["notes"] == r[1][step]["error"]["notes"] == []
    for rank in range(2):
        paths = [rec["path"] for rec in r[rank][2:]]
        assert paths == ["graph:8", "graph:8", "eager-dbo", "graph:8"], rank
        for rec in r[rank][2:]:
            assert torch.equal(rec["out"], rec["eager"]), (rank, rec["step"])


@pytest.mark.timeout(180)
def test_a_capture_agreement_paired_with_another_collective_is_not_agreed_gloo(tmp_path
                                                                             ) -> None:
    r = two_gloo_ranks(capture_agreement_worker, tmp_path, "agree")
    assert r[1] == [(False, False), (True, True)]
    assert r[0] == [(False, False), (True, True), (True, False)]


@pytest.mark.timeout(180)
def test_a_capture_interrupted_on_one_rank_stops_the_step_on_every_rank_gloo(tmp_path
                                                                            ) -> None:
    r = two_gloo_ranks(interrupted_capture_worker, tmp_path, "interrupted")
    assert r[1][1]["error"]["type"] == "KeyboardInterrupt"
    assert r[0][1]["error"] == {
        "type": "RuntimeError", "notes": [], "ubatch_id": None,
        "msg": "CoopDBORunner: a peer rank was interrupted while capturing this step (see "
               "its error), so this rank stops the step too and no rank waits in its "
               "collectives; the next call captures again."}
    assert r[1][1]["error"]["notes"] == []  # (the watchdog did not break the group)
    for rank in range(2):
        assert [rec["path"] for rec in r[rank]] == ["graph:8", "error", "graph:8", "graph:8"]
        for rec in (r[rank][0], r[rank][2], r[rank][3]):
            assert torch.equal(rec["out"], rec["eager"]), (rank, rec["step"])


@pytest.mark.timeout(180)
def test_a_split_skipped_before_the_agreement_fails_on_every_rank_gloo(tmp_path) -> None:
    r = two_gloo_ranks(late_split_worker, tmp_path, "split")
    assert r[0][1]["error"]["msg"] == "split failed (stand-in)"
    assert r[1][1]["error"]["msg"] == (
        "CoopDBORunner: a peer rank failed to prepare this step (see its error); this rank "
        "stops too, so that no rank waits in a collective.")
    assert r[1][3]["error"]["msg"] == "plan failed (stand-in)"
    assert r[0][3]["error"]["msg"] == r[1][1]["error"]["msg"]
    for rank in range(2):
        paths = [rec["path"] for rec in r[rank]]
        assert paths == ["graph:8", "error", "graph:8", "error", "graph:8"]
        for rec in (r[rank][0], r[rank][2], r[rank][4]):
            assert torch.equal(rec["out"], rec["eager"]), (rank, rec["step"])


@pytest.mark.timeout(180)
def test_ranks_disagree_or_fail_while_planning_gloo(tmp_path) -> None:
    r = two_gloo_ranks(disagreement_worker, tmp_path, "disagree")
    assert [len(x) for x in r] == [len(DISAGREEMENT_STEPS)] * 2
    peer = "a peer rank cannot microbatch this step"
    expected = {  # step -> (rank 0, rank 1): path, and reason or error
        0: (("eager-dbo", ""), ("eager-dbo", "")),
        1: (("plain", peer), ("plain", "disabled")),
        2: (("plain", "6 tokens < min_tokens=100"), ("plain", peer)),
        3: (("plain", peer), ("plain", "cost model: no overlap at 5 tokens")),
        4: (("plain", peer), ("plain", "batch of 1 is smaller than num_ubatches=2: a "
                                       "microbatch would be empty")),
        7: (("eager-dbo", ""), ("eager-dbo", "")),
    }
    peer_failed = ("RuntimeError", "CoopDBORunner: a peer rank failed to prepare this step "
                   "(see its error); this rank stops too, so that no rank waits in a "
                   "collective.")
    single = MoEDecoder(CFG)  # every expert in one process
    for step, (_, _, what) in enumerate(DISAGREEMENT_STEPS):
        recs = (r[0][step], r[1][step])
        for rank in range(2):
            assert recs[rank]["elapsed"] < 20, (step, rank)
        if step == 5:
            assert recs[0]["error"]["type"] == "ValueError"
            assert recs[0]["error"]["msg"] == "cost model broke"
            assert (recs[1]["error"]["type"], recs[1]["error"]["msg"]) == peer_failed
            continue
        if step == 6:
            assert recs[1]["error"]["type"] == "KeyboardInterrupt"
            assert (recs[0]["error"]["type"], recs[0]["error"]["msg"]) == peer_failed
            continue
        for rank in range(2):
            assert (recs[rank]["path"], recs[rank]["reason"]) == expected[step][rank], (
                step, what, rank)
            torch.testing.assert_close(recs[rank]["out"], single(*recs[rank]["inputs"]),
                                       rtol=1e-5, atol=1e-5)


GLOO_TIMEOUT_S = 3.0


@pytest.mark.timeout(180)
def test_rank_fails_mid_step_gloo_every_rank_raises_in_bounded_time(tmp_path) -> None:
    """What the runner guarantees when one rank's model or send fails after the ranks
    agreed to microbatch: that rank raises at once; its peer raises when the process
    group's timeout expires in the all-to-all it waits in. Neither waits longer. The
    group is then out of step; after re-creating it the same runner is exact again."""
    groups = rendezvous_files(tmp_path, len(MIDSTEP_FAULTS) + 1)
    codes, wall = spawn_bounded(midstep_fault_worker,
                                (groups, GLOO_TIMEOUT_S, str(tmp_path)), deadline_s=150)
    assert codes == [0, 0], f"workers exited with {codes} after {wall:.0f} s"
    r = [torch.load(tmp_path / f"midstep{i}.pt", weights_only=False) for i in range(2)]
    kinds = [x["kind"] for x in r[0]]
    assert kinds == ["good", MIDSTEP_FAULTS[0], "good", MIDSTEP_FAULTS[1], "good"]
    assert [x["kind"] for x in r[1]] == kinds
    single = MoEDecoder(CFG)
    for i, kind in enumerate(kinds):
        a, b = r[0][i], r[1][i]
        if kind == "good":
            for rec in (a, b):
                assert rec["path"] == "eager-dbo"
                torch.testing.assert_close(rec["out"], single(*rec["inputs"]),
                                           rtol=1e-5, atol=1e-5)
            continue
        assert a["path"] == b["path"] == "error"
        if kind == "model raises at a yield":
            assert b["error"]["type"] == "InjectedFault"
            assert b["error"]["msg"] == "injected fault in microbatch 0 at yield 2"
            assert b["error"]["ubatch_id"] == 0
        else:
            assert b["error"]["type"] == "InjectedFault"
            assert b["error"]["msg"] == "_exchange failed (microbatch 1, call 1)"
            assert b["error"]["ubatch_id"] == 1
        assert b["elapsed"] < 2.0  # the failing rank does not wait
        # the peer waits in the all-to-all of the same microbatch until gloo's timeout,
        # then raises there; it never waits longer (the failing rank waits at a file
        # barrier before it destroys the group, so the peer sees the timeout)
        assert a["error"]["type"] == "RuntimeError"
        assert f"Timed out waiting {GLOO_TIMEOUT_S * 1000:.0f}ms" in a["error"]["msg"]
        assert a["error"]["ubatch_id"] == b["error"]["ubatch_id"]
        assert a["error"]["notes"] == b["error"]["notes"] == [
            f"coop_dbo: raised in microbatch {b['error']['ubatch_id']} of 2; the other "
            "microbatches were unwound."]
        assert GLOO_TIMEOUT_S - 0.5 < a["elapsed"] < GLOO_TIMEOUT_S + 5.0


# -- bad input of every public entry point ---------------------------------------------------

@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "2", None])
def test_scheduler_rejects_bad_num_ubatches(bad) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"num_ubatches must be an int from 1 to 8, got {bad!r}.")):
        UBatchScheduler(bad)


def test_run_rejects_bad_callables_and_accepts_any_sequence() -> None:
    sched = UBatchScheduler(2)
    with pytest.raises(ValueError, match=re.escape(
            "run() got 3 callables but the scheduler was made for 2 microbatches: pass "
            "exactly 2.")):
        sched.run([lambda: 0] * 3)
    with pytest.raises(TypeError, match=re.escape(
            "fns[1] is int, not a callable taking no arguments.")):
        sched.run([lambda: 0, 5])
    with pytest.raises(TypeError, match=re.escape(
            "fns[0] is str, not a callable taking no arguments.")):
        sched.run("ab")
    assert sched.run((lambda: 0, lambda: 1)) == [0, 1]
    assert sched.run(f for f in [lambda: 2, lambda: 3]) == [2, 3]  # any iterable
    with pytest.raises(TypeError, match=re.escape(
            "run() takes an iterable of callables, got int.")):
        sched.run(3)
    # a callable that needs arguments fails inside its microbatch, named
    with pytest.raises(TypeError, match="missing 1 required positional argument") as info:
        sched.run([lambda: 0, lambda x: x])
    assert info.value.ubatch_id == 1
    assert sched.run([lambda: 4, lambda: 5]) == [4, 5]


@pytest.mark.parametrize("to", ["COMM", "", None, 1, "cuda"])
def test_switch_rejects_unknown_stream_inside_and_outside_a_step(to) -> None:
    msg = re.escape(f"dbo_yield_and_switch(to=...) must be 'comm' or 'compute', got {to!r}.")
    with pytest.raises(ValueError, match=msg):
        dbo_yield_and_switch(to, "x")
    sched = UBatchScheduler(2)
    with pytest.raises(ValueError, match=msg) as info:
        sched.run([lambda: dbo_yield_and_switch(to, "x")] * 2)
    assert info.value.ubatch_id == 0
    assert sched.run([lambda: 0, lambda: 1]) == [0, 1]


def test_non_string_sites_work_and_print() -> None:
    sched = UBatchScheduler(2, trace=True)
    assert sched.run([lambda: dbo_yield(3)] * 2) == [None, None]
    assert [e.site for e in sched.last_trace] == [3, 3]
    assert "0: 3 [cpu]" in format_trace(sched.last_trace)
    with pytest.raises(YieldAsymmetryError, match="at site None, but the microbatch that "
                                                  "reached index 0 first yielded at site 3"):
        sched.run([lambda: dbo_yield(3), lambda: dbo_yield(None)])
    assert "coop_dbo yield trace" in format_trace([])
    assert "ValueError: x" in format_trace(ValueError("x"))


def test_runner_rejects_bad_construction() -> None:
    with pytest.raises(TypeError, match=re.escape(
            "model must be callable (an nn.Module or a function), got NoneType.")):
        CoopDBORunner(None)  # type: ignore[arg-type]
    for bad in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match=re.escape(
                f"num_ubatches must be an int from 1 to 8, got {bad!r}.")):
            CoopDBORunner(MoEDecoder(CFG), num_ubatches=bad)  # type: ignore[arg-type]
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match=re.escape(
                f"min_tokens must be an int >= 0, got {bad!r}.")):
            CoopDBORunner(MoEDecoder(CFG), min_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape(
            "split must be a function (args, kwargs, sizes) -> [(args, kwargs), ...] or an "
            "object with plan(args, kwargs).")):
        CoopDBORunner(MoEDecoder(CFG), split=3)
    with pytest.raises(TypeError, match=re.escape("merge must be a function (outputs) -> "
                                                  "output.")):
        CoopDBORunner(MoEDecoder(CFG), merge=3)
    with pytest.raises(ValueError, match=re.escape(
            "pass merge= only with a split function; a splitter object merges through the "
            "plans it makes.")):
        CoopDBORunner(MoEDecoder(CFG), split=types.SimpleNamespace(plan=None),
                      merge=lambda o: o)


@pytest.mark.parametrize("case, inputs, exc, msg", [
    ("tokens int32", lambda t, p, s: (t.int(), p, s), ValueError,
     "tokens must be a 1-D int64 tensor [batch], got torch.int32 of shape (4,)."),
    ("tokens 2-D", lambda t, p, s: (t[:, None], p, s), ValueError,
     "tokens must be a 1-D int64 tensor [batch], got torch.int64 of shape (4, 1)."),
    ("positions float", lambda t, p, s: (t, p.float(), s), ValueError,
     "positions must be a 1-D int64 tensor [batch], got torch.float32 of shape (4,)."),
    ("lengths differ", lambda t, p, s: (t, p[:7], s), ValueError,
     "tokens, positions and slots must have the same length."),
    ("slots on meta", lambda t, p, s: (t, p, s.to("meta")), SplitError,
     "CoopDBORunner got batch inputs on different devices: positional argument 2 is on "
     "meta but positional argument 0 is on cpu."),
    ("all on meta", lambda t, p, s: (t.to("meta"), p.to("meta"), s.to("meta")), ValueError,
     "tokens is on meta but the model is on cpu: move the inputs to the model's device."),
    ("token id too large", lambda t, p, s: (t + CFG.vocab_size, p, s), ValueError,
     f"tokens must be in [0, {CFG.vocab_size}), got values from"),
    ("position too large", lambda t, p, s: (t, p + CFG.max_seq_len, s), ValueError,
     f"positions must be in [0, {CFG.max_seq_len}), got values from"),
    ("slot too large", lambda t, p, s: (t, p, s + CFG.max_batch), ValueError,
     f"slots must be in [0, {CFG.max_batch}), got values from"),
])
def test_runner_on_decoder_rejects_bad_inputs_naming_the_microbatch(case, inputs, exc,
                                                                    msg) -> None:
    model = MoEDecoder(CFG)
    runner = CoopDBORunner(model)
    with pytest.raises(exc, match=re.escape(msg)) as info:
        runner(*inputs(*step_inputs(CFG, 8, 0, seed=7)))
    if exc is not SplitError:  # raised inside microbatch 0
        assert info.value.ubatch_id == 0 and ubatch_note(info.value, 0, 2)
    assert_next_step_exact(runner, MoEDecoder(CFG))


def test_decoder_accepts_an_empty_batch() -> None:
    runner = CoopDBORunner(MoEDecoder(CFG))
    out = runner(*step_inputs(CFG, 0, 0, seed=0))
    assert out.shape == (0, CFG.vocab_size) and runner.last_reason == "empty batch"


def test_decoder_negative_slot_is_a_clear_error() -> None:
    tokens, positions, slots = step_inputs(CFG, 4, 0, seed=0)
    with pytest.raises(ValueError,
                       match=r"slots must be in \[0, \d+\), got values from -1") as info:
        CoopDBORunner(MoEDecoder(CFG))(tokens, positions, slots - 1)
    assert info.value.ubatch_id == 0


def test_decoder_rejects_out_of_range_inputs_on_cpu() -> None:
    tokens, positions, slots = step_inputs(CFG, 4, 0, seed=0)
    model = MoEDecoder(CFG)
    with pytest.raises(ValueError,
                       match=r"positions must be in \[0, 16\), got values from -\d+ to -\d+\."):
        model(tokens, positions - 100, slots)
    with pytest.raises(ValueError, match="slots must be distinct"):
        model(tokens, positions, torch.zeros_like(slots))


def test_empty_and_single_row_batches_run_plainly() -> None:
    seen = []

    def model(x):
        seen.append(dbo_current_ubatch_id())
        dbo_yield("a")
        return x * 2

    runner = CoopDBORunner(model)
    for batch, reason in [(0, "empty batch"), (1, "batch of 1 is smaller than "
                                                   "num_ubatches=2: a microbatch would be "
                                                   "empty")]:
        assert torch.equal(runner(torch.ones(batch, 3)), torch.full((batch, 3), 2.0))
        assert runner.last_path == "plain" and runner.last_reason == reason
    assert seen == [None, None]


def _swiglu(seed: int):
    """SwiGLU experts for ``moe_exchange``: 8 experts, hidden 16, intermediate 8."""
    g = torch.Generator().manual_seed(seed)
    return swiglu_experts(*(torch.randn(8, 16, 8, generator=g) for _ in range(2)),
                          torch.randn(8, 8, 16, generator=g))


def test_non_contiguous_inputs_give_the_same_result() -> None:
    model = MoEDecoder(CFG)
    runner = CoopDBORunner(model)
    tokens, positions, slots = step_inputs(CFG, 8, 0, seed=8)
    strided = tuple(torch.stack([t, t], 1)[:, 0] for t in (tokens, positions, slots))
    assert not any(t.is_contiguous() for t in strided)
    out = runner(*strided)
    assert torch.equal(out, run_sequential(MoEDecoder(CFG), (tokens, positions, slots), 2))
    # moe_exchange directly: non-contiguous activations, ids and weights
    backend = SingleProcessBackend(8)
    x, idx, w = routed_tokens(6, 32, seed=0)
    experts = _swiglu(seed=0)
    xs, idxs, ws = x[:, ::2], idx.t().contiguous().t(), w.t().contiguous().t()
    assert not (xs.is_contiguous() or idxs.is_contiguous() or ws.is_contiguous())
    ref = moe_exchange(backend, xs.contiguous(), idx, w, experts)
    assert torch.equal(moe_exchange(backend, xs, idxs, ws, experts), ref)
    outs = UBatchScheduler(2).run([lambda: moe_exchange(backend, xs, idxs, ws, experts)] * 2)
    assert all(torch.equal(o, ref) for o in outs)


def test_nan_inputs_pass_through_as_nan() -> None:
    # moe_exchange: a NaN token stays NaN, the others are untouched, under the scheduler
    backend = SingleProcessBackend(8)
    x, idx, w = routed_tokens(6, 16, seed=1)
    experts = _swiglu(seed=1)
    clean = moe_exchange(backend, x, idx, w, experts)
    xn, wn = x.clone(), w.clone()
    xn[2] = float("nan")
    wn[4, 1] = float("nan")
    outs = UBatchScheduler(2).run([lambda: moe_exchange(backend, xn, idx, w, experts),
                                   lambda: moe_exchange(backend, x, idx, wn, experts)])
    assert outs[0].isnan().any(1).tolist() == [False, False, True, False, False, False]
    assert outs[1].isnan().any(1).tolist() == [False, False, False, False, True, False]
    for o, bad in zip(outs, (2, 4)):
        keep = torch.arange(6) != bad
        assert torch.equal(o[keep], clean[keep])
    # the decoder through the runner: a NaN embedding row poisons only its sequences
    poisoned = [MoEDecoder(CFG), MoEDecoder(CFG)]
    tokens, positions, slots = step_inputs(CFG, 8, 0, seed=9)
    for m in poisoned:
        m.embed[tokens[3]] = float("nan")
    out = CoopDBORunner(poisoned[0])(tokens, positions, slots)
    rows_nan = out.isnan().any(1)
    assert rows_nan.tolist() == (tokens == tokens[3]).tolist()
    assert torch.equal(out[~rows_nan], run_sequential(
        poisoned[1], (tokens, positions, slots), 2)[~rows_nan])
    # NaN activations through a decoder layer (a float-input model) and the runner
    layer = MoEDecoder(CFG).layers[0]
    h = torch.randn(8, CFG.hidden, generator=torch.Generator().manual_seed(1))
    h[5, 3] = float("nan")
    out = CoopDBORunner(layer)(h, positions, slots + 16)
    assert out.isnan().any(1).tolist() == [i == 5 for i in range(8)]


def test_moe_exchange_rejects_bad_inputs() -> None:
    backend = SingleProcessBackend(8)
    experts = swiglu_experts(torch.randn(8, 16, 8), torch.randn(8, 16, 8),
                             torch.randn(8, 8, 16))
    x, idx, w = torch.randn(4, 16), torch.tensor([[0, 1]] * 4), torch.rand(4, 2)
    cases = [
        ((x[0], idx, w), ValueError, "x must be [num_tokens, hidden], got shape (16,)."),
        ((x[None], idx, w), ValueError, "x must be [num_tokens, hidden], got shape "
                                        "(1, 4, 16)."),
        ((x, idx[:3], w[:3]), ValueError, "topk_idx must be [num_tokens=4, top_k], got "
                                          "(3, 2)."),
        ((x, idx, w[:, :1]), ValueError, "topk_weights (4, 1) must have the shape of "
                                         "topk_idx (4, 2)."),
        ((x, idx.int(), w), TypeError, "topk_idx must be int64 expert ids, got torch.int32."),
        ((x, idx, w.long()), TypeError, "topk_weights must be floating point, got "
                                        "torch.int64."),
        ((x, idx + 7, w), ValueError, "expert ids must be in [0, 8), got ids from 7 to 8."),
        ((x, idx.to("meta"), w), ValueError, "topk_idx is on meta but x is on cpu"),
        ((x, idx, w.to("meta")), ValueError, "topk_weights is on meta but x is on cpu"),
        ((x.bfloat16(), idx, w), ValueError,
         "the experts' weights are torch.float32 on cpu but the tokens they get are "
         "torch.bfloat16 on cpu"),
        ((x.to("meta"), idx.to("meta"), w.to("meta")), ValueError,
         "the experts' weights are torch.float32 on cpu but the tokens they get are "
         "torch.float32 on meta"),
        ((x.long(), idx, w), ValueError,
         "the experts' weights are torch.float32 on cpu but the tokens they get are "
         "torch.int64 on cpu"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=re.escape(msg)):
            moe_exchange(backend, *args, experts)
        with pytest.raises(exc, match=re.escape(msg)) as info:  # inside a step: named
            UBatchScheduler(2).run([lambda: moe_exchange(backend, x, idx, w, experts),
                                    lambda args=args: moe_exchange(backend, *args, experts)])
        assert info.value.ubatch_id == 1
    with pytest.raises(ValueError, match=re.escape("top_k=9 is larger than num_experts=8")):
        validate_routing(x, torch.zeros(4, 9, dtype=torch.int64), torch.rand(4, 9), 8)
    with pytest.raises(ValueError, match=re.escape(
            "5 tokens exceed num_max_tokens_per_rank=4 of this backend: construct it with "
            "num_max_tokens_per_rank >= the largest (micro)batch it will see.")):
        moe_exchange(SingleProcessBackend(8, num_max_tokens_per_rank=4), torch.randn(5, 16),
                     torch.tensor([[0, 1]] * 5), torch.rand(5, 2), experts)
    with pytest.raises(ValueError, match=re.escape(
            "SingleProcessBackend: dispatch_us must be a number of microseconds >= 0, got -1.")):
        SingleProcessBackend(8, dispatch_us=-1)
    # zero tokens (a rank or microbatch with nothing routed) is fine
    assert moe_exchange(backend, x[:0], idx[:0], w[:0], experts).shape == (0, 16)


def test_decoder_and_hooks_reject_bad_construction() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "backend routes 8 experts but the config has 4.")):
        MoEDecoder(CFG, SingleProcessBackend(8))
    with pytest.raises(ValueError, match=re.escape("top_k=5 is larger than num_experts=4.")):
        MoEDecoder(MoEConfig.tiny(**{**SMALL_CFG_KW, "top_k": 5}))
    with pytest.raises(TypeError, match=re.escape(
            "install_moe_hooks needs an nn.Module, got function.")):
        install_moe_hooks(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match=re.escape(
            "install_moe_hooks: found no MoE block in Sequential.")):
        install_moe_hooks(nn.Sequential(nn.Linear(4, 4)))
    assert remove_moe_hooks(nn.Linear(2, 2)) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_graph_capture_entry_points_on_cpu() -> None:
    from coop_dbo.cudagraph_capture import DBOGraphRunner, StepGraph

    msg = re.escape("CUDA graph capture needs a CUDA GPU, and torch.cuda.is_available() is "
                    "False here. On CPU run the model eagerly (UBatchScheduler or "
                    "CoopDBORunner with cuda_graph_sizes=None).")
    with pytest.raises(CaptureError, match=msg):
        DBOGraphRunner(MoEDecoder(CFG), lambda s: step_inputs(CFG, s, 0, 0), [8])
    with pytest.raises(CaptureError, match=msg):
        StepGraph(lambda x: x, (torch.ones(2),))
    with pytest.raises(CaptureError, match=re.escape(
            "CoopDBORunner(cuda_graph_sizes=...) needs a CUDA GPU")):
        CoopDBORunner(MoEDecoder(CFG), cuda_graph_sizes=[8])


def test_nested_and_reentrant_runner_calls_are_refused() -> None:
    inner = CoopDBORunner(lambda x: x)

    def outer_model(x):
        return inner(x)  # a runner inside a microbatch of another runner

    runner = CoopDBORunner(outer_model)
    with pytest.raises(SchedulerStateError, match=re.escape(
            "UBatchScheduler.run() was called from inside microbatch 0 of a running "
            "scheduler.")):
        runner(torch.ones(4, 2))
    assert torch.equal(inner(torch.ones(4, 2)), torch.ones(4, 2))
    assert torch.equal(runner(torch.ones(1, 2)), torch.ones(1, 2))  # plain path: fine
