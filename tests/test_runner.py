"""CoopDBORunner: same result as the model, the right path, clear errors, ranks that agree."""

from __future__ import annotations

import inspect
import os
import re
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp
from fault_workers import end_group
from helpers import decode_inputs, init_group, rendezvous_files, run_sequential, yields_per_layer
from torch import nn

from coop_dbo import CoopDBORunner, SplitError, dbo_current_ubatch_id, dbo_yield
from coop_dbo.errors import CaptureError
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.moe_hooks import layer_sites
from coop_dbo.runner import unwrap_forward, wrap_forward
from coop_dbo.split import register_split_type

CFG = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=2)


class Toy(nn.Module):
    """``x [B, 4]`` -> ``x @ w`` with one yield; ``mode`` picks the output structure."""

    Pair = namedtuple("Pair", ["a", "b"])

    def __init__(self, mode: str = "tensor") -> None:
        super().__init__()
        self.w = nn.Parameter(torch.arange(16.0).reshape(4, 4))
        self.mode = mode
        self.calls: list[tuple[int | None, int]] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None):
        self.calls.append((dbo_current_ubatch_id(), x.shape[0]))
        h = x @ self.w * scale
        dbo_yield("toy.mid")
        if bias is not None:
            h = h + bias
        if self.mode == "tuple":
            return h, None, [h.sum(-1)]
        if self.mode == "dict":
            return {"h": h, "rows": h[:, :1], "tag": "same"}
        if self.mode == "namedtuple":
            return Toy.Pair(h, h * 2)
        if self.mode == "scalar":
            return h.sum()
        return h


def xs(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed))


# -- same result ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_ubatches", [2, 3])
@pytest.mark.parametrize("batch", [8, 13])
def test_decoder_through_runner_equals_model(num_ubatches: int, batch: int) -> None:
    model = MoEDecoder(CFG)
    runner = CoopDBORunner(model, num_ubatches=num_ubatches, trace=True)
    inputs = decode_inputs(CFG, batch)
    out = runner(*inputs)
    assert runner.last_path == "eager-dbo" and runner.last_reason == ""
    assert runner.last_step.sizes == [len(c) for c in torch.arange(batch).tensor_split(
        num_ubatches)]
    assert torch.equal(out, run_sequential(model, inputs, num_ubatches))  # same microbatches
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-5)
    sites = yields_per_layer(runner.last_trace, num_ubatches)
    assert all(s == layer_sites("switch", CFG.num_layers) for s in sites.values())
    # interleaved: each yield index is taken by every microbatch in turn
    assert [e.ubatch for e in runner.last_trace] == list(range(num_ubatches)) * (
        4 * CFG.num_layers)


@pytest.mark.parametrize("mode", ["tensor", "tuple", "dict", "namedtuple"])
def test_output_structures_merge_in_order(mode: str) -> None:
    model = Toy(mode)
    x, bias = xs(9), torch.randn(4)
    runner = CoopDBORunner(model)
    out = runner(x, scale=0.5, bias=bias)  # bias [4] != batch: shared, not split
    ref = model(x, scale=0.5, bias=bias)
    assert type(out) is type(ref)
    flat = lambda o: [t for t in (o.values() if isinstance(o, dict) else o)  # noqa: E731
                      if t is not None] if mode != "tensor" else [o]
    for a, b in zip(flat(out), flat(ref)):
        if isinstance(a, list):
            a, b = a[0], b[0]
        if isinstance(a, str):
            assert a == b
        else:
            torch.testing.assert_close(a, b)
    assert model.calls[:2] == [(0, 5), (1, 4)]  # balanced, larger first, in greenlets
    assert runner.last_step.sizes == [5, 4]


def test_transformers_model_output_is_merged() -> None:
    from transformers.modeling_outputs import CausalLMOutput

    class M(nn.Module):
        def forward(self, input_ids):
            dbo_yield("m")
            return CausalLMOutput(logits=input_ids.float()[..., None] * 2)

    ids = torch.arange(12).reshape(6, 2)
    out = CoopDBORunner(M())(input_ids=ids)
    assert isinstance(out, CausalLMOutput) and out.loss is None
    assert torch.equal(out.logits, ids.float()[..., None] * 2)


def test_custom_split_and_merge() -> None:
    """Attention metadata the default splitter cannot cut: per-sequence lengths in a list."""

    @dataclass
    class Meta:
        lengths: list[int]
        slots: torch.Tensor

    def model(x, meta):
        dbo_yield("m")
        return x.sum(-1) + torch.tensor(meta.lengths, dtype=x.dtype) + meta.slots

    def split(args, kwargs, sizes):
        x, meta = args
        out, start = [], 0
        for n in sizes:
            m = Meta(meta.lengths[start:start + n], meta.slots[start:start + n])
            out.append(((x[start:start + n], m), {}))
            start += n
        return out

    x = xs(7)
    meta = Meta([3, 1, 4, 1, 5, 9, 2], torch.arange(7.0))
    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner's default splitter cannot split positional argument 1 of type "
            "test_runner.test_custom_split_and_merge.<locals>.Meta: it holds tensors")):
        CoopDBORunner(model)(x, meta)
    runner = CoopDBORunner(model, split=split, merge=lambda outs: torch.cat(outs) * 1)
    torch.testing.assert_close(runner(x, meta), model(x, meta))
    assert runner.last_path == "eager-dbo" and runner.last_step.sizes == [4, 3]


def test_registered_split_type() -> None:
    class Slots:
        def __init__(self, t):
            self.t = t

    def split(obj, sizes, batch):
        return [Slots(p) for p in obj.t.split(sizes)]

    merged_with = []

    def merge(parts, original):
        merged_with.append(original)
        return Slots(torch.cat([p.t for p in parts]))

    register_split_type(Slots, split, merge)

    def model(x, s):
        dbo_yield("m")
        return x * 2, Slots(s.t + 1)

    x, s = xs(6), Slots(torch.arange(6.0))
    y, s2 = CoopDBORunner(model)(x, s)
    assert torch.equal(y, x * 2) and torch.equal(s2.t, torch.arange(6.0) + 1)
    assert merged_with == [None]  # the model made new objects: no original to merge into


# -- when not to microbatch ----------------------------------------------------------------

class Overlap:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.asked: list[int] = []

    def should_overlap(self, num_tokens: int) -> bool:
        self.asked.append(num_tokens)
        return num_tokens >= self.threshold


@pytest.mark.parametrize("batch, kwargs, reason", [
    (1, {}, "batch of 1 is smaller than num_ubatches=2: a microbatch would be empty"),
    (3, {"num_ubatches": 4},
     "batch of 3 is smaller than num_ubatches=4: a microbatch would be empty"),
    (0, {}, "empty batch"),
    (8, {"enabled": False}, "disabled"),
    (8, {"min_tokens": 9}, "8 tokens < min_tokens=9"),
    (8, {"cost_model": Overlap(10)}, "cost model: no overlap at 8 tokens"),
])
def test_plain_fallback(batch: int, kwargs: dict, reason: str) -> None:
    model = Toy()
    runner = CoopDBORunner(model, trace=True, **kwargs)
    x = xs(batch)
    out = runner(x)
    assert runner.last_path == "plain" and runner.last_reason == reason
    assert runner.last_trace == []
    assert model.calls == [(None, batch)]  # called once, outside any microbatch
    assert torch.equal(out, x @ model.w)


def test_cost_model_and_threshold_let_large_steps_overlap() -> None:
    cost = Overlap(10)
    runner = CoopDBORunner(Toy(), cost_model=cost, min_tokens=4)
    runner(xs(12))
    assert runner.last_path == "eager-dbo"
    runner(xs(6))
    assert runner.last_path == "plain"
    assert cost.asked == [12, 6]
    runner.enabled = False
    runner(xs(12))
    assert runner.last_reason == "disabled" and cost.asked == [12, 6]
    assert runner.path_counts == {"eager-dbo": 1, "plain": 2}


def test_tokens_count_sequence_positions() -> None:
    """Token ids [B, L] count B*L tokens; activations [B, L, H] count B*L too."""
    seen = []
    runner = CoopDBORunner(lambda x: x, on_step=seen.append)
    runner(torch.zeros(4, 5, dtype=torch.long))
    runner(torch.zeros(4, 5, 8))
    runner(torch.zeros(4, 8))
    assert [s.num_tokens for s in seen] == [20, 20, 4]


def test_trace_is_switchable() -> None:
    runner = CoopDBORunner(Toy())
    runner(xs(4))
    assert runner.last_path == "eager-dbo" and runner.last_trace == []
    runner.trace = True
    runner(xs(4))
    assert [(e.ubatch, e.index, e.site) for e in runner.last_trace] == [
        (0, 0, "toy.mid"), (1, 0, "toy.mid")]


# -- bad input -----------------------------------------------------------------------------

def test_tensors_on_different_devices() -> None:
    model = Toy()
    x = xs(4)
    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner got batch inputs on different devices: argument 'bias' is on meta "
            "but positional argument 0 is on cpu. Move every batch input to the model's "
            "device")):
        CoopDBORunner(model)(x, bias=torch.zeros(4, 4, device="meta"))
    assert model.calls == []


def test_no_batch_tensor() -> None:
    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner found no tensor argument with a batch dimension, so it cannot "
            "tell the batch size")):
        CoopDBORunner(lambda n: n)(3)


def test_unmergeable_output_names_the_fix() -> None:
    runner = CoopDBORunner(Toy("scalar"))
    with pytest.raises(SplitError) as e:
        runner(xs(4))
    assert str(e.value) == (
        "cannot merge the output: in the microbatches (rows [2, 2]) it has shapes [(), ()], "
        "so it is not per row (dim 0 = the microbatch's rows), and it differs between "
        "microbatches, so it is not one value for the whole batch either (a loss, a "
        "statistic of the rows?): pass merge=<fn(outputs) -> output> to CoopDBORunner "
        "(outputs: one per microbatch, in order).")
    runner2 = CoopDBORunner(Toy("scalar"), merge=lambda outs: sum(outs))
    torch.testing.assert_close(runner2(xs(4)), (xs(4) @ Toy().w).sum())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "num_ubatches must be an int from 1 to 8, got 9.")):
        CoopDBORunner(Toy(), num_ubatches=9)
    with pytest.raises(TypeError, match=re.escape(
            "cost_model must have a should_overlap(num_tokens) -> bool method; int has none.")):
        CoopDBORunner(Toy(), cost_model=3)
    with pytest.raises(ValueError, match="min_tokens must be an int >= 0"):
        CoopDBORunner(Toy(), min_tokens=-1)
    with pytest.raises(RuntimeError, match=re.escape(
            "CoopDBORunner(process_group=...) needs torch.distributed to be initialised")):
        CoopDBORunner(Toy(), process_group=object())
    bad = CoopDBORunner(Toy(), split=lambda a, k, sizes: [(a, k)])
    with pytest.raises(SplitError, match=re.escape(
            "split= returned 1 microbatches for sizes [2, 2]: return one (args, kwargs) pair "
            "per size.")):
        bad(xs(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cuda_graph_sizes_without_cuda() -> None:
    with pytest.raises(CaptureError, match=re.escape(
            "CoopDBORunner(cuda_graph_sizes=...) needs a CUDA GPU, and "
            "torch.cuda.is_available() is False here. On CPU run the model eagerly")):
        CoopDBORunner(Toy(), cuda_graph_sizes=[8])


def test_model_error_propagates_and_runner_recovers() -> None:
    def model(x):
        dbo_yield("a")
        if dbo_current_ubatch_id() == 1:
            raise KeyError("boom")
        return x

    runner = CoopDBORunner(model)
    with pytest.raises(KeyError, match="boom") as info:
        runner(xs(4))
    assert info.value.ubatch_id == 1
    runner.model = lambda x: x * 3
    assert torch.equal(runner(xs(4)), xs(4) * 3)


# -- wrap_forward --------------------------------------------------------------------------

def test_wrap_forward_keeps_signature_and_unwraps() -> None:
    model = Toy()
    sig = inspect.signature(model.forward)
    pre_hook_calls = []
    model.register_forward_pre_hook(lambda m, a: pre_hook_calls.append(1))
    runner = wrap_forward(model, trace=True)
    assert inspect.signature(model.forward) == sig
    x = xs(6)
    out = model(x)
    assert runner.last_path == "eager-dbo" and len(runner.last_trace) == 2
    assert pre_hook_calls == [1]  # module hooks run once per call, outside the microbatches
    assert torch.equal(out, x @ model.w)
    with pytest.raises(RuntimeError, match="already wrapped by a CoopDBORunner"):
        wrap_forward(model)
    unwrap_forward(model)
    assert "forward" not in model.__dict__
    model(x)
    assert runner.last_path == "eager-dbo" and model.calls[-1] == (None, 6)
    with pytest.raises(RuntimeError, match="is not wrapped by a CoopDBORunner"):
        unwrap_forward(model)


# -- process group: all ranks agree (gloo, 2 processes) -------------------------------------

def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """gloo with a short timeout: a collective that cannot complete fails instead of hanging."""
    init_group("gloo", rank, world, rendezvous, timeout_s=60)


def spawn(fn, args: tuple, world: int = 2, timeout_s: float = 150.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; fail after ``timeout_s``."""
    import time

    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, start_method="spawn",
                             join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} ranks did not finish within {timeout_s} s")


class Slots:
    """Holds a tensor the default splitter does not know how to split."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def agreement_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    from coop_dbo.backends import TorchDistributedBackend

    init_gloo(rank, world, rendezvous)
    try:
        cfg = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=2)
        model = MoEDecoder(cfg, TorchDistributedBackend(cfg.num_experts))
        runner = CoopDBORunner(model, process_group=dist.group.WORLD, trace=True)
        results = []
        # step 0: both ranks can microbatch (different batch sizes)
        # step 1: rank 1 has one sequence: nobody microbatches
        # step 2: rank 1 passes an argument the splitter cannot split: both raise, no hang
        # step 3: both fine again
        for step, batch in enumerate([(8, 5), (6, 1), (4, 4), (7, 3)]):
            inputs = decode_inputs(cfg, batch[rank], seed=10 * step + rank)
            args: tuple = inputs
            if step == 2 and rank == 1:
                args = (*inputs[:2], Slots(inputs[2]))
            try:
                out = runner(*args)
                results.append((runner.last_path, runner.last_reason, out, inputs))
            except Exception as exc:
                results.append(("error", f"{type(exc).__name__}: {exc}", None, inputs))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        end_group(out_dir, rank, world)


def test_process_group_ranks_agree_gloo(tmp_path) -> None:
    world = 2
    spawn(agreement_worker, (rendezvous_files(tmp_path, 1)[0], str(tmp_path)), world)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(world)]
    assert [x[0] for x in r[0]] == ["eager-dbo", "plain", "error", "eager-dbo"]
    assert [x[0] for x in r[1]] == ["eager-dbo", "plain", "error", "eager-dbo"]
    assert r[0][1][1] == "a peer rank cannot microbatch this step"
    assert r[1][1][1] == ("batch of 1 is smaller than num_ubatches=2: a microbatch would be "
                          "empty")
    assert r[0][2][1] == ("RuntimeError: CoopDBORunner: a peer rank failed to prepare this "
                          "step (see its error); this rank stops too, so that no rank waits "
                          "in a collective.")
    assert r[1][2][1].startswith("SplitError: CoopDBORunner's default splitter cannot split "
                                 "positional argument 2 of type")
    for rank in range(world):
        single = MoEDecoder(CFG)  # every expert in one process, its own KV cache like the rank
        for path, _, out, inputs in r[rank]:
            if path != "error":
                torch.testing.assert_close(out, single(*inputs), rtol=1e-5, atol=1e-5)


def test_graph_path_pads_and_slices_with_a_stand_in(monkeypatch) -> None:
    """The graph path's choices on CPU: ``DBOGraphRunner`` replaced by a recorder (the real
    one needs CUDA and is exercised by test_hf_models.py::test_runner_cuda_graph_path_gpu)."""
    import coop_dbo.cudagraph_capture as cg

    made = []

    class StandIn:
        def __init__(self, fn, example_inputs, sizes, *, num_ubatches, clone_outputs, trace,
                     any_rank_failed):
            self.fn, self.calls = fn, []
            self.examples = {s: example_inputs(s) for s in sizes}
            made.append(self)

        def __call__(self, *inputs):
            self.calls.append(inputs)
            return self.fn(*inputs)

    monkeypatch.setattr(cg, "DBOGraphRunner", StandIn)
    model = Toy()
    runner = CoopDBORunner(model)
    runner.graph_sizes = [8, 16]
    monkeypatch.setattr(runner, "_graph_eligible", lambda plan: (plan.graph_ok, None))
    x = xs(6)
    out = runner(x)
    assert runner.last_path == "graph:8" and out.shape == (6, 4)
    torch.testing.assert_close(out, x @ model.w)
    (g,) = made
    (padded,) = g.calls[0]
    assert padded.shape == (8, 4) and torch.equal(padded[:6], x)
    assert torch.equal(padded[6:], x[5:].expand(2, 4))  # last row repeated
    assert torch.equal(g.examples[16][0][:6], x) and g.examples[8][0].shape == (8, 4)
    runner(xs(13))
    assert runner.last_path == "graph:16" and len(made) == 1  # captured once
    runner(xs(20))
    assert runner.last_path == "eager-dbo"  # larger than every captured size
    runner(xs(8), scale=2.0)
    assert runner.last_path == "eager-dbo"  # keyword arguments never replay
    assert len(g.calls) == 2


def test_cost_model_of_another_microbatch_count_is_refused() -> None:
    from coop_dbo.cost_model import CostModel

    cm = CostModel(points={64: 0.6, 256: 1.2}, gpu="x", comm="sim", num_ubatches=2)
    with pytest.raises(ValueError, match="calibrated with 2 microbatches but this runner "
                                         "uses num_ubatches=4"):
        CoopDBORunner(Toy(), num_ubatches=4, cost_model=cm)
    assert CoopDBORunner(Toy(), num_ubatches=2, cost_model=cm).cost_model is cm


def test_a_hashed_tuple_hashes_again_in_another_process(tmp_path) -> None:
    """``HashedTuple`` keeps its hash, so a pickled one must not carry it into a process
    whose string hashes differ (dict lookups with an equal key would miss there)."""
    import pickle
    import subprocess
    import sys

    from coop_dbo.split import HashedTuple

    key = HashedTuple(("state", ("layers", 0, "keys"), 3))
    assert key == tuple(key) and hash(key) == hash(tuple(key))
    assert {tuple(key): 1}[key] == 1 and {key: 1}[tuple(key)] == 1
    path = tmp_path / "key.pkl"
    path.write_bytes(pickle.dumps(key))
    check = ("import pickle, sys; k = pickle.load(open(sys.argv[1], 'rb')); "
             "assert type(k).__name__ == 'HashedTuple'; "
             "assert hash(k) == hash(tuple(k)), 'stale hash'")
    for seed in ("1", "2"):
        p = subprocess.run([sys.executable, "-c", check, str(path)], capture_output=True,
                           text=True, env={**os.environ, "PYTHONHASHSEED": seed}, check=False)
        assert p.returncode == 0, p.stderr[-2000:]
