"""MoE hooks: DBO output equals the no-DBO output, yields are symmetric, bad input is caught."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from deep_ep_double import FakeLowLatencyBuffer
from helpers import (
    decode_inputs,
    rendezvous_files,
    routed_tokens,
    run_dbo,
    run_sequential,
    split_inputs,
    yields_per_layer,
)

from coop_dbo import UBatchScheduler, YieldAsymmetryError
from coop_dbo.backends import DeepEPLowLatencyBackend, SingleProcessBackend, validate_routing
from coop_dbo.backends.flat import _stable_order
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.moe_hooks import YIELD_SITES, layer_sites, moe_exchange, swiglu_experts
from coop_dbo.schedule import SchedulePolicy

CFG = MoEConfig.tiny(num_layers=3, num_experts=8, top_k=2)


def decode_steps(model, sched, batch, steps=3, seed=0):
    """Several decode steps (positions advance); DBO vs sequential microbatches."""
    cfg = model.cfg
    tokens, positions, slots = decode_inputs(cfg, batch, seed=seed)
    positions = positions % (cfg.max_seq_len - steps)
    for step in range(steps):
        inputs = (tokens, positions + step, slots)
        dbo = run_dbo(model, inputs, sched)
        ref = run_sequential(model, inputs, sched.num_ubatches)
        full = model(*inputs)
        yield dbo, ref, full
        tokens = dbo.argmax(-1)


@pytest.mark.parametrize("num_ubatches", [2, 3, 4])
@pytest.mark.parametrize("batch", [8, 13])
def test_dbo_equals_no_dbo_exactly_fp32(num_ubatches, batch) -> None:
    model = MoEDecoder(CFG)
    sched = UBatchScheduler(num_ubatches, trace=True)
    for dbo, ref, full in decode_steps(model, sched, batch):
        assert torch.equal(dbo, ref)  # bitwise: same microbatches, no scheduler
        # The unsplit batch differs only by GEMM blocking (MKL picks kernels by rows).
        torch.testing.assert_close(dbo, full, rtol=1e-5, atol=1e-5)
        sites = yields_per_layer(sched.last_trace, num_ubatches)
        expected = layer_sites("switch", CFG.num_layers)
        assert all(s == expected for s in sites.values())


def test_static_padded_mode_equals_exact_mode() -> None:
    exact = MoEDecoder(CFG, SingleProcessBackend(CFG.num_experts))
    static = MoEDecoder(CFG, SingleProcessBackend(CFG.num_experts,
                                                  num_max_tokens_per_rank=16))
    inputs = decode_inputs(CFG, 12)
    a = run_dbo(exact, inputs, UBatchScheduler(2))
    b = run_dbo(static, inputs, UBatchScheduler(2))
    assert torch.equal(a, b)


def routed(backend, x, idx, w):
    n_local = backend.num_local_experts
    gen = torch.Generator().manual_seed(1)
    h, i = x.shape[1], 8
    wg, wu = (torch.randn(n_local, h, i, generator=gen) for _ in range(2))
    wd = torch.randn(n_local, i, h, generator=gen)
    return moe_exchange(backend, x, idx, w, swiglu_experts(wg, wu, wd))


def dense_moe_reference(x, idx, w, num_experts):
    """Per-token loop: the textbook MoE, for checking the backends' data movement."""
    gen = torch.Generator().manual_seed(1)
    h, i = x.shape[1], 8
    wg, wu = (torch.randn(num_experts, h, i, generator=gen) for _ in range(2))
    wd = torch.randn(num_experts, i, h, generator=gen)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            hid = torch.nn.functional.silu(x[t] @ wg[e]) * (x[t] @ wu[e])
            out[t] += w[t, k] * (hid @ wd[e])
    return out


def test_skewed_routing_keeps_yields_symmetric() -> None:
    """Microbatch 1 routes every token to expert 0: no rows for the others, same yields."""
    x = torch.randn(2, 5, 16)
    idx = torch.stack([torch.randint(0, 8, (5, 2)), torch.tensor([[0, 1]] * 5)])
    idx[0] = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    w = torch.rand(2, 5, 2)
    backend = SingleProcessBackend(8)
    sched = UBatchScheduler(2, trace=True)
    outs = sched.run([lambda i=i: routed(backend, x[i], idx[i], w[i]) for i in range(2)])
    for i in range(2):
        torch.testing.assert_close(outs[i], dense_moe_reference(x[i], idx[i], w[i], 8),
                                   rtol=1e-5, atol=1e-5)
    sites = yields_per_layer(sched.last_trace, 2)
    assert sites[0] == sites[1] == list(YIELD_SITES["switch"])


def test_skipping_the_exchange_is_reported_not_hung() -> None:
    """A model that skips the MoE exchange for an empty microbatch gets a clear error."""
    backend = SingleProcessBackend(8)
    x, idx, w = routed_tokens(4, 16)

    def careless(i):
        if i == 1:
            return x  # "no tokens for experts here", so no exchange: asymmetric yields
        return routed(backend, x, idx, w)

    with pytest.raises(YieldAsymmetryError, match="Microbatch 1 returned after 0 yields"):
        UBatchScheduler(2).run([lambda: careless(0), lambda: careless(1)])


# -- deep_ep adapter against the double ----------------------------------------------------

def test_deep_ep_adapter_hook_schedule_matches_reference() -> None:
    buf = FakeLowLatencyBuffer()
    backend = DeepEPLowLatencyBackend(buf, num_experts=8,
                                      num_max_dispatch_tokens_per_rank=8)
    x = torch.randn(2, 6, 16)
    idx = torch.stack([torch.stack([torch.randperm(8)[:2] for _ in range(6)])
                       for _ in range(2)])
    w = torch.rand(2, 6, 2)
    sched = UBatchScheduler(2, trace=True)
    outs = sched.run([lambda i=i: routed(backend, x[i], idx[i], w[i]) for i in range(2)])
    for i in range(2):
        assert not outs[i].isnan().any()
        torch.testing.assert_close(outs[i], dense_moe_reference(x[i], idx[i], w[i], 8),
                                   rtol=1e-5, atol=1e-5)
    assert yields_per_layer(sched.last_trace, 2) == {0: list(YIELD_SITES["hook"]),
                                                    1: list(YIELD_SITES["hook"])}
    # the receive hooks ran after the yields, interleaved with the other microbatch's sends
    assert buf.calls == ["dispatch_send", "dispatch_send", "dispatch_hook", "combine_send",
                         "dispatch_hook", "combine_send", "combine_hook", "combine_hook"]
    assert backend.num_held == 0 and buf.num_held == 0


def test_deep_ep_model_dbo_equals_sequential() -> None:
    buf = FakeLowLatencyBuffer()
    backend = DeepEPLowLatencyBackend(buf, CFG.num_experts, num_max_dispatch_tokens_per_rank=8)
    model = MoEDecoder(CFG, backend)
    inputs = decode_inputs(CFG, 10)
    sched = UBatchScheduler(2, trace=True)
    dbo = run_dbo(model, inputs, sched)
    ref = run_sequential(model, inputs, 2)
    assert torch.equal(dbo, ref)
    torch.testing.assert_close(dbo, MoEDecoder(CFG)(*inputs), rtol=1e-5, atol=1e-5)
    assert len(sched.last_trace) == 2 * 2 * CFG.num_layers


def test_deep_ep_third_held_result_is_an_error() -> None:
    backend = DeepEPLowLatencyBackend(FakeLowLatencyBuffer(), 8,
                                      num_max_dispatch_tokens_per_rank=8)
    x = torch.randn(3, 4, 16)
    idx = torch.stack([torch.stack([torch.randperm(8)[:2] for _ in range(4)])
                       for _ in range(3)])
    w = torch.rand(3, 4, 2)
    with pytest.raises(RuntimeError, match=re.escape(
            "deep_ep low-latency holds at most 2 results at once; a third dispatch was "
            "started while 2 were still held. Run at most two microbatches")) as info:
        UBatchScheduler(3).run([lambda i=i: routed(backend, x[i], idx[i], w[i])
                                for i in range(3)])
    assert info.value.ubatch_id == 2


def test_double_enforces_contract_itself() -> None:
    buf = FakeLowLatencyBuffer()
    x = torch.randn(2, 4)
    idx = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(AssertionError, match="cannot both be set"):
        buf.low_latency_dispatch(x, idx, 4, 4, use_fp8=False, async_finish=True,
                                 return_recv_hook=True)
    recv_x, count, handle, _, hook = buf.low_latency_dispatch(
        x, idx, 4, 4, use_fp8=False, return_recv_hook=True)
    assert recv_x.isnan().all()  # nothing arrives before the hook
    hook()
    assert torch.equal(recv_x[1, :2], x)
    assert count.tolist() == [1, 2, 1, 0]


def test_deep_ep_missing_gives_install_hint(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "deep_ep":
            raise ImportError("no deep_ep")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=re.escape("pip install 'coop-dbo[deepep]'")):
        DeepEPLowLatencyBackend.load_buffer_class()


# -- torch.distributed over gloo -----------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
def test_torch_distributed_gloo_two_ranks(tmp_path, static) -> None:
    from dist_workers import ep_decoder_worker

    world = 2
    mp.start_processes(ep_decoder_worker,
                       args=(world, rendezvous_files(tmp_path, 1)[0], static, str(tmp_path)),
                       nprocs=world, start_method="spawn")
    cfg = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=3)
    single = MoEDecoder(cfg)  # all experts in one process
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(r["dbo"], r["seq"])
        torch.testing.assert_close(r["dbo"], r["full"], rtol=1e-5, atol=1e-5)
        # the expert-parallel model computes what one process with every expert computes
        torch.testing.assert_close(r["full"], single(*r["inputs"]), rtol=1e-5, atol=1e-5)
        assert r["sites"] == layer_sites("switch", cfg.num_layers)


# -- bad input -----------------------------------------------------------------------------

def test_bad_routing_inputs() -> None:
    x = torch.randn(4, 16)
    idx = torch.tensor([[0, 1]] * 4)
    w = torch.rand(4, 2)
    with pytest.raises(ValueError, match="x has hidden size 16 but the experts expect 32"):
        validate_routing(x, idx, w, 8, hidden=32)
    with pytest.raises(ValueError, match=re.escape("top_k=9 is larger than num_experts=8")):
        validate_routing(x, torch.zeros(4, 9, dtype=torch.int64), torch.rand(4, 9), 8)
    with pytest.raises(ValueError, match=re.escape("expert ids must be in [0, 8), got ids "
                                                   "from 0 to 8")):
        validate_routing(x, torch.tensor([[0, 8]] * 4), w, 8)
    with pytest.raises(ValueError, match="from -1 to 1"):
        validate_routing(x, torch.tensor([[-1, 1]] * 4), w, 8)
    with pytest.raises(TypeError, match="topk_idx must be int64"):
        validate_routing(x, idx.int(), w, 8)
    with pytest.raises(ValueError, match="topk_idx is on meta but x is on cpu"):
        validate_routing(x, idx.to("meta"), w, 8)
    with pytest.raises(ValueError, match=r"topk_weights \(4, 3\) must have the shape"):
        validate_routing(x, idx, torch.rand(4, 3), 8)


def test_model_rejects_bad_inputs() -> None:
    model = MoEDecoder(CFG)
    tokens, positions, slots = decode_inputs(CFG, 4)
    with pytest.raises(ValueError, match="tokens is on meta but the model is on cpu"):
        model(tokens.to("meta"), positions, slots)
    with pytest.raises(ValueError, match="positions must be a 1-D int64 tensor"):
        model(tokens, positions.int(), slots)
    with pytest.raises(ValueError, match=re.escape("top_k=9 is larger than num_experts=8")):
        MoEDecoder(MoEConfig.tiny(top_k=9))
    with pytest.raises(ValueError, match="must be divisible by the expert-parallel size"):
        DeepEPLowLatencyBackend(type("B", (), {"group_size": 3, "rank": 0})(), 8, 4)


def test_decode_steps_do_not_accumulate_autograd_history() -> None:
    """KV-cache writes must not chain steps into one autograd graph (memory leak)."""
    model = MoEDecoder(CFG)
    inputs = decode_inputs(CFG, 6)
    out = run_dbo(model, inputs, UBatchScheduler(2))
    assert not out.requires_grad
    assert all(layer.k_cache.grad_fn is None for layer in model.layers)


def test_masked_expert_mm_matches_grouped_mm() -> None:
    """The capture-safe fallback (CUDA dtypes other than bf16) computes the same rows."""
    from coop_dbo.backends.base import _masked_expert_mm

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=gen)
    w = torch.randn(3, 8, 4, generator=gen)
    offsets = torch.tensor([3, 3, 8], dtype=torch.int32)  # expert 1 gets no rows
    out = _masked_expert_mm(h, w, offsets)
    torch.testing.assert_close(out[:8], torch._grouped_mm(h, w, offs=offsets)[:8])
    assert torch.equal(out[8:], torch.zeros(2, 4))  # padding rows


def test_copy_engine_transfer_mode_moves_the_same_data() -> None:
    """On CPU no time is simulated; both transfer modes give the exact same output."""
    inputs = decode_inputs(CFG, 9)
    outs = []
    for transfer in ("spin", "copy_engine"):
        backend = SingleProcessBackend(CFG.num_experts, dispatch_us=50, combine_us=50,
                                       transfer=transfer)
        outs.append(run_dbo(MoEDecoder(CFG, backend), inputs, UBatchScheduler(2)))
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="transfer must be 'spin' or 'copy_engine', got 'dma'"):
        SingleProcessBackend(8, transfer="dma")  # type: ignore[arg-type]


def test_sites_name_the_layer_so_skipping_different_layers_is_caught() -> None:
    """Two microbatches that each skip one MoE layer, but not the same one, yield as
    often as each other; the layer in the site name makes the check catch it."""
    backend = SingleProcessBackend(8)
    x, idx, w = routed_tokens(4, 16)

    def two_layers(skip: int):
        def fn():
            for layer in range(2):
                if layer != skip:
                    moe_exchange(backend, x, idx, w, lambda b: b.x,
                                 site_prefix=f"L{layer}.")
        return fn

    with pytest.raises(YieldAsymmetryError,
                       match="Microbatch 1 yielded at index 0 at site 'L0.moe.dispatch', "
                             "but the microbatch that reached index 0 first yielded at "
                             "site 'L1.moe.dispatch'"):
        UBatchScheduler(2).run([two_layers(0), two_layers(1)])
    UBatchScheduler(2).run([two_layers(1), two_layers(1)])  # same layer skipped: fine
    assert layer_sites("hook", 2) == ["L0.moe.dispatch", "L0.moe.combine",
                                      "L1.moe.dispatch", "L1.moe.combine"]


# -- cross-stream lifetimes: what stays alive across which switch, what gets record_stream ---
# On CPU no stream exists, so these tests replace the stream switch with a stand-in that
# reports whether it waited (and can raise), and record which objects moe_exchange hands to
# record_stream. The backend remembers its phase outputs, by weak reference.

HELD_AT = {"moe.experts": "dispatch_pack", "moe.combine": "dispatch_transfer",
           "moe.post": "combine_pack"}  # the object whose reuse the switch orders


class _RecordingBackend(SingleProcessBackend):
    """Keeps weak references to each phase's output."""

    def __init__(self, *a, fail: str | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.outputs: dict[str, weakref.ref] = {}
        self.fail = fail

    def _keep(self, phase: str, obj):
        if self.fail == phase:
            raise RuntimeError(f"{phase} failed")
        self.outputs[phase] = weakref.ref(obj)
        return obj

    def dispatch_pack(self, *a):
        return self._keep("dispatch_pack", super().dispatch_pack(*a))

    def dispatch_transfer(self, packed):
        return self._keep("dispatch_transfer", super().dispatch_transfer(packed))

    def combine_pack(self, *a):
        return self._keep("combine_pack", super().combine_pack(*a))

    def combine_transfer(self, packed):
        return self._keep("combine_transfer", super().combine_transfer(packed))


class _Lifetimes:
    """Stands in for the stream switch and for record_stream (``_hand_over``)."""

    def __init__(self, monkeypatch, backend: _RecordingBackend, waited: bool = True,
                 raise_at: str | None = None) -> None:
        import coop_dbo.moe_hooks as mh

        self.marked: list[tuple[str, str]] = []  # (phase whose output was marked, stream)
        self.switches: list[str] = []
        self.alive_at_switch: dict[str, bool] = {}

        def phase_of(obj) -> str:
            return next((ph for ph, ref in backend.outputs.items() if ref() is obj), "?")

        def switch(to, site=""):
            self.switches.append(site)
            phase = HELD_AT.get(site)
            if phase is not None:
                ref = backend.outputs.get(phase)
                self.alive_at_switch[site] = ref is not None and ref() is not None
            if site == raise_at:
                raise KeyboardInterrupt(f"at {site}")
            return waited

        def hand_over(obj, to):
            self.marked.append((phase_of(obj), to))

        monkeypatch.setattr(mh, "dbo_yield_and_switch", switch)
        monkeypatch.setattr(mh, "_hand_over", hand_over)


def _exchange(backend, experts=None):
    x, idx, w = routed_tokens(6, 16)
    weights = torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0))
    experts = experts or (lambda batch: batch.linear(batch.x, weights))
    return moe_exchange(backend, x, idx, w, experts)


def _backend(**kw) -> _RecordingBackend:
    return _RecordingBackend(8, num_max_tokens_per_rank=6, **kw)


def test_switches_that_waited_leave_one_record_stream_per_exchange(monkeypatch) -> None:
    """Each crossing object is alive at the switch that orders its reuse; only the
    combine's result is marked."""
    backend = _backend()
    life = _Lifetimes(monkeypatch, backend, waited=True)
    _exchange(backend)
    assert life.switches == list(YIELD_SITES["switch"])
    assert life.alive_at_switch == {site: True for site in HELD_AT}
    assert life.marked == [("combine_transfer", "compute")]


def test_switches_without_a_wait_mark_everything_they_held(monkeypatch) -> None:
    backend = _backend()
    life = _Lifetimes(monkeypatch, backend, waited=False)
    _exchange(backend)
    assert life.marked == [("dispatch_pack", "comm"), ("dispatch_transfer", "compute"),
                           ("combine_pack", "comm"), ("combine_transfer", "compute")]


def test_an_exchange_off_the_compute_stream_marks_everything(monkeypatch) -> None:
    """The waits order the step's compute stream; packs made on another stream are not
    protected by them, so everything is marked."""
    import coop_dbo.moe_hooks as mh

    class OtherStream:
        compute_key = ("compute",)

        @staticmethod
        def current_key():
            return ("side",)

    backend = _backend()
    life = _Lifetimes(monkeypatch, backend, waited=True)
    monkeypatch.setattr(mh, "dbo_streams", lambda: OtherStream())
    _exchange(backend)
    assert life.marked == [("dispatch_pack", "comm"), ("dispatch_transfer", "compute"),
                           ("combine_pack", "comm"), ("combine_transfer", "compute")]


def test_an_expert_failure_marks_the_received_rows_it_drops(monkeypatch) -> None:
    backend = _backend()
    life = _Lifetimes(monkeypatch, backend, waited=True)

    def failing(batch):
        raise RuntimeError("expert failed")

    with pytest.raises(RuntimeError, match="expert failed"):
        _exchange(backend, experts=failing)
    assert life.marked == [("dispatch_transfer", "compute")]


@pytest.mark.parametrize("phase, expected", [
    ("dispatch_transfer", [("dispatch_pack", "comm")]),
    ("combine_pack", [("dispatch_transfer", "compute")]),
    ("combine_transfer", [("combine_pack", "comm")]),
])
def test_a_phase_failure_marks_what_is_still_read(monkeypatch, phase, expected) -> None:
    backend = _backend(fail=phase)
    life = _Lifetimes(monkeypatch, backend, waited=True)
    with pytest.raises(RuntimeError, match=f"{phase} failed"):
        _exchange(backend)
    assert life.marked == expected


@pytest.mark.parametrize("site, expected", [
    ("moe.dispatch", []),  # nothing has crossed yet
    ("moe.experts", [("dispatch_pack", "comm")]),
    ("moe.combine", [("dispatch_transfer", "compute")]),
    ("moe.post", [("combine_pack", "comm"), ("combine_transfer", "compute")]),
])
def test_a_microbatch_unwound_at_a_switch_marks_what_it_held(monkeypatch, site,
                                                              expected) -> None:
    backend = _backend()
    life = _Lifetimes(monkeypatch, backend, waited=True, raise_at=site)
    with pytest.raises(KeyboardInterrupt, match=f"at {site}"):
        _exchange(backend)
    assert life.marked == expected


def test_dbo_yield_and_switch_reports_no_wait_without_cuda_streams() -> None:
    from coop_dbo import dbo_yield_and_switch

    assert dbo_yield_and_switch("comm", "outside") is False
    seen: list[bool] = []
    UBatchScheduler(2).run([lambda: seen.append(dbo_yield_and_switch("comm", "s"))] * 2)
    assert seen == [False, False]


@pytest.mark.parametrize("n", [1, 17, 256, 257, 32_768, 32_769, 40_000])
def test_stable_order_is_a_stable_argsort(n: int) -> None:
    # Narrowed keys (uint8 up to 256 ids, then int16, int32) must give exactly the stable
    # argsort of the int64 ids, ties in their original order, at every width's edge.
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, n, (3000,), generator=g)
    ids[:4] = n - 1  # the largest id must survive the narrowing
    assert torch.equal(_stable_order(ids, n), torch.argsort(ids, stable=True))


def test_decoder_attention_sees_the_cache_and_the_steps_own_key() -> None:
    # The cache is gathered before the step writes its key and value (one stretch early,
    # next to the previous layer's experts); the attention must still equal a plain
    # per-sequence softmax over the cache rows 0..position as they are after the write.
    # Stale random rows everywhere: a missed patch or mask changes the result.
    model = MoEDecoder(CFG)
    layer = model.layers[1]
    g = torch.Generator().manual_seed(3)
    layer.k_cache.copy_(torch.randn(layer.k_cache.shape, generator=g))
    layer.v_cache.copy_(torch.randn(layer.v_cache.shape, generator=g))
    b, nh, hd = 5, CFG.num_heads, CFG.head_dim
    x = torch.randn(b, CFG.hidden, generator=g)
    positions = torch.tensor([0, 3, 7, 1, CFG.max_seq_len - 1])
    slots = torch.tensor([9, 2, 40, 11, 0])
    out = layer.attention(x, positions, slots, layer.gather_kv(slots))
    q = (x @ layer.wqkv).view(b, 3, nh, hd)[:, 0]
    rows = []
    for i in range(b):
        keys = layer.k_cache[slots[i], :, :positions[i] + 1]  # [heads, pos + 1, head_dim]
        values = layer.v_cache[slots[i], :, :positions[i] + 1]
        p = torch.einsum("hd,hsd->hs", q[i], keys).mul(hd ** -0.5).softmax(-1)
        rows.append(torch.einsum("hs,hsd->hd", p, values).reshape(nh * hd))
    torch.testing.assert_close(out, torch.stack(rows) @ layer.wo)


def test_decoder_with_a_layer_that_skips_its_shared_experts_gathers_the_cache_itself() -> None:
    # The next layer's cache is gathered inside the shared-experts callable; a layer whose
    # ``moe`` never calls it leaves the next layer to gather its own, same result.
    model, plain = MoEDecoder(CFG), MoEDecoder(CFG)
    real = model.layers[0].moe
    model.layers[0].moe = lambda x, shared_experts: real(x, plain.layers[0].shared_expert)
    inputs = decode_inputs(CFG, 6, seed=4)
    torch.testing.assert_close(model(*inputs), plain(*inputs), rtol=0, atol=0)


def test_shared_expert_placement_changes_where_it_runs_not_what_it_computes() -> None:
    # Before the dispatch (small microbatches) or after it (large ones): the same sum, so
    # bitwise the same logits, plain and under DBO.
    inputs = decode_inputs(CFG, 12, seed=5)
    early = MoEDecoder(CFG, schedule=SchedulePolicy(shared_after_dispatch_min_tokens=10**9))
    late = MoEDecoder(CFG, schedule=SchedulePolicy(shared_after_dispatch_min_tokens=0))
    calls: list[str] = []
    for name, m in (("early", early), ("late", late)):
        layer = m.layers[0]
        real_shared, real_pack = layer.shared_expert, m.backend.dispatch_pack
        layer.shared_expert = lambda h, f=real_shared, n=name: (calls.append(f"{n} shared"),
                                                                f(h))[1]
        m.backend.dispatch_pack = lambda *a, f=real_pack, n=name: (
            calls.append(f"{n} dispatch"), f(*a))[1]
    assert torch.equal(early(*inputs), late(*inputs))
    first_layer = [c for c in calls if "shared" in c or c in ("early dispatch",
                                                               "late dispatch")]
    assert first_layer[:2] == ["early shared", "early dispatch"]
    assert first_layer[1 + CFG.num_layers:3 + CFG.num_layers] == ["late dispatch",
                                                                  "late shared"]
    assert torch.equal(run_dbo(early, inputs, UBatchScheduler(2)),
                       run_dbo(late, inputs, UBatchScheduler(2)))


@pytest.mark.parametrize("batch", [5, 6])
def test_shared_expert_placement_threshold_is_the_first_size_that_runs_it_late(batch) -> None:
    # shared_after_dispatch_min_tokens=6: a microbatch of 5 runs the shared expert before
    # the dispatch, one of 6 after it.
    model = MoEDecoder(CFG, schedule=SchedulePolicy(shared_after_dispatch_min_tokens=6))
    calls: list[str] = []
    layer = model.layers[0]
    real_shared, real_pack = layer.shared_expert, model.backend.dispatch_pack
    layer.shared_expert = lambda h: (calls.append("shared"), real_shared(h))[1]
    model.backend.dispatch_pack = lambda *a: (calls.append("dispatch"), real_pack(*a))[1]
    model(*decode_inputs(CFG, batch, seed=6))
    assert calls[:2] == (["shared", "dispatch"] if batch < 6 else ["dispatch", "shared"])


def test_shared_experts_callable_called_with_another_tensor_raises() -> None:
    # The shared expert of a small microbatch is computed before the dispatch from moe's
    # input; a moe that hands the callable something else must not get that stale result.
    model = MoEDecoder(CFG)
    real = model.layers[0].moe
    model.layers[0].moe = lambda x, shared_experts: real(x, lambda h: shared_experts(h * 2))
    with pytest.raises(RuntimeError, match=re.escape(
            "MoELayer.moe called its shared_experts callable with another tensor than the "
            "one step() passed it")):
        model(*decode_inputs(CFG, 4, seed=7))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("values_early", [(0, 0), (0, 10**9)])
def test_a_layers_gathered_cache_is_freed_before_its_moe(values_early, steps) -> None:
    # Each layer's gathered copy is spent by its attention: only the next layer's copy may
    # be alive while a layer's MoE runs (at 512 tokens of the GPU bench shape a copy is
    # 128 MiB, and a CUDA graph's pool would keep both); also with the values gathered a
    # stretch earlier, and across decode steps (layer 0's copy made in the step before).
    # None is left once the call returns.
    model = MoEDecoder(CFG, schedule=SchedulePolicy(values_gather_early_tokens=values_early))
    copies: dict[int, list[weakref.ref]] = {}
    alive_in_own_moe: list[int] = []
    for i, layer in enumerate(model.layers):
        real_keys, real_values, real_moe = layer.gather_keys, layer.gather_values, layer.moe

        def gather(slots, i=i, real=real_keys):
            t = real(slots)
            copies.setdefault(i, []).append(weakref.ref(t))
            return t

        def moe(x, shared_experts, i=i, real_moe=real_moe):
            alive_in_own_moe.extend(i for r in copies[i] if r() is not None)
            return real_moe(x, shared_experts)
        layer.gather_keys, layer.moe = gather, moe
        layer.gather_values = lambda slots, i=i, real=real_values: gather(slots, i, real)
    inputs = decode_inputs(CFG, 6, seed=8, num_steps=steps)
    if steps == 1:
        model(*inputs)
    else:
        model.decode(*inputs, steps)
    assert sorted(copies) == list(range(CFG.num_layers))
    assert all(len(c) == 2 * steps for c in copies.values())
    assert alive_in_own_moe == []
    assert [r for c in copies.values() for r in c if r() is not None] == []


@pytest.mark.parametrize("batch", [5, 6, 8])
def test_values_gather_placement_changes_where_it_runs_not_what_it_computes(batch) -> None:
    # values_gather_early_tokens=(6, 8): microbatches of 6 and 7 tokens gather the next
    # layer's values before the dispatch, its keys after; 5 and 8 gather both after.
    early = MoEDecoder(CFG, schedule=SchedulePolicy(values_gather_early_tokens=(6, 8)))
    calls: list[str] = []
    layer, nxt = early.layers[0], early.layers[1]
    for name in ("gather_keys", "gather_values"):
        real = getattr(nxt, name)
        setattr(nxt, name, lambda slots, f=real, n=name: (calls.append(n), f(slots))[1])
    real_pack = early.backend.dispatch_pack
    early.backend.dispatch_pack = lambda *a: (calls.append("dispatch"), real_pack(*a))[1]
    real_moe = layer.moe
    layer.moe = lambda x, shared: (calls.append("moe"), real_moe(x, shared))[1]
    inputs = decode_inputs(CFG, batch, seed=9)
    out = early(*inputs)
    first_layer = calls[:4]
    if 6 <= batch < 8:
        assert first_layer == ["gather_values", "moe", "dispatch", "gather_keys"], calls
    else:
        assert first_layer == ["moe", "dispatch", "gather_keys", "gather_values"], calls
    late = MoEDecoder(CFG, schedule=SchedulePolicy(values_gather_early_tokens=(0, 0)))
    assert torch.equal(out, late(*inputs))
    two_ubatches = decode_inputs(CFG, 2 * batch, seed=10, num_steps=3)  # `batch` each
    assert torch.equal(run_dbo_decode(early, two_ubatches, 3),
                       run_dbo_decode(late, two_ubatches, 3))


# -- several decode steps in one call ------------------------------------------------------

def run_dbo_decode(model: MoEDecoder, inputs, steps: int, num_ubatches: int = 2):
    chunks = split_inputs(inputs, num_ubatches)
    return torch.cat(UBatchScheduler(num_ubatches).run(
        [lambda c=c: model.decode(*c, steps) for c in chunks]))


def test_decode_is_forward_then_argmax_step_by_step() -> None:
    model, twin = MoEDecoder(CFG), MoEDecoder(CFG)  # same weights, separate caches
    tokens, positions, slots = decode_inputs(CFG, 7, seed=1, num_steps=4)
    out = model.decode(tokens, positions, slots, 4)
    assert out.shape == (7, 4) and out.dtype == torch.int64
    expected = []
    for step in range(4):
        tokens = twin(tokens, positions + step, slots).argmax(-1)
        expected.append(tokens)
    assert torch.equal(out, torch.stack(expected, dim=1))
    for layer, other in zip(model.layers, twin.layers):  # the same cache rows written
        assert torch.equal(layer.k_cache, other.k_cache)
        assert torch.equal(layer.v_cache, other.v_cache)


def test_decode_gathers_the_first_layers_cache_for_the_next_step_beside_the_last_experts(
        ) -> None:
    # As between layers: the last layer's shared-experts callable (after its dispatch,
    # before its combine) gathers layer 0's cache for the next step; the last step gathers
    # nothing more. (The result is checked bitwise by the test above.)
    model = MoEDecoder(CFG)
    calls: list[str] = []
    for i, layer in enumerate(model.layers):
        real_gather = layer.gather_kv
        layer.gather_kv = lambda slots, f=real_gather, i=i: (calls.append(f"gather L{i}"),
                                                             f(slots))[1]
    real_pack, real_combine = model.backend.dispatch_pack, model.backend.combine_pack
    model.backend.dispatch_pack = lambda *a: (calls.append("dispatch"), real_pack(*a))[1]
    model.backend.combine_pack = lambda *a: (calls.append("combine"), real_combine(*a))[1]
    model.decode(*decode_inputs(CFG, 4, num_steps=2), 2)
    last = CFG.num_layers - 1
    one_step = ["gather L0"] + [c for i in range(CFG.num_layers) for c in (
        ["dispatch", f"gather L{i + 1}", "combine"] if i < last else ["dispatch", "combine"])]
    second = one_step[1:]  # its layer 0 cache was gathered in the first step
    first = one_step[:-1] + ["gather L0", "combine"]
    assert calls == first + second


@pytest.mark.parametrize("num_ubatches", [2, 3])
def test_decode_under_dbo_runs_every_step_in_one_interleaved_schedule(num_ubatches) -> None:
    # No barrier between steps: a microbatch starts its next step while the others still
    # finish theirs, so the trace is one alternation over all steps' yields.
    model = MoEDecoder(CFG)
    inputs = decode_inputs(CFG, 10, seed=2, num_steps=3)
    chunks = split_inputs(inputs, num_ubatches)
    sched = UBatchScheduler(num_ubatches, trace=True)
    dbo = torch.cat(sched.run([lambda c=c: model.decode(*c, 3) for c in chunks]))
    ref = torch.cat([MoEDecoder(CFG).decode(*c, 3) for c in chunks])
    assert torch.equal(dbo, ref)
    per_step = layer_sites("switch", CFG.num_layers)
    assert yields_per_layer(sched.last_trace, num_ubatches) == {
        u: per_step * 3 for u in range(num_ubatches)}
    assert [e.ubatch for e in sched.last_trace] == list(range(num_ubatches)) * (3 * len(
        per_step))


@pytest.mark.parametrize("num_steps, msg", [
    (0, "num_steps must be a positive int, got 0."),
    (True, "num_steps must be a positive int, got True."),
    (2.0, "num_steps must be a positive int, got 2.0."),
])
def test_decode_rejects_a_bad_num_steps(num_steps, msg) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        MoEDecoder(CFG).decode(*decode_inputs(CFG, 4), num_steps)


def test_decode_rejects_positions_that_would_run_past_the_cache() -> None:
    tokens, _, slots = decode_inputs(CFG, 3)
    positions = torch.tensor([0, CFG.max_seq_len - 3, CFG.max_seq_len - 2])
    model = MoEDecoder(CFG)
    model.decode(tokens[:2], positions[:2], slots[:2], 3)  # up to max_seq_len - 1: fine
    with pytest.raises(ValueError, match=re.escape(
            f"positions must be in [0, {CFG.max_seq_len - 2}) (decoding 3 steps from each "
            f"position within max_seq_len={CFG.max_seq_len}), got values from 0 to "
            f"{CFG.max_seq_len - 2}. Decode fewer steps for the sequences near the end, or "
            "build the model with a larger max_seq_len.")):
        model.decode(tokens, positions, slots, 3)
    with pytest.raises(ValueError, match=re.escape(
            f"num_steps={CFG.max_seq_len + 1} is more than max_seq_len={CFG.max_seq_len}: "
            "no sequence has room for that many new tokens. Decode fewer steps per call or "
            "build the model with a larger max_seq_len.")):
        model.decode(tokens, positions * 0, slots, CFG.max_seq_len + 1)
