"""transformers decode steps as CUDA graphs: the static-call plumbing (CPU) and the graph
path through ``generate`` (GPU).

A decode step of ``generate(..., cache_implementation="static")`` calls the model with
``input_ids [B, 1]``, a fixed-length mask ``[B, 1, 1, max_len]`` and the same
``StaticCache`` object every step: the split layer describes it as a ``StaticCall`` whose
key stays the same from step to step, and the runner replays one graph per key.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from helpers import StandInCallGraph, stand_in_graphs
from hf_families import build
from hf_families import family as hf_family
from hf_families import prompts as hf_prompts
from test_hf_models import FAMILIES, NEW_TOKENS, greedy, make_model, prompts
from transformers import StaticCache

from coop_dbo import install_moe_hooks
from coop_dbo.hf.cache import cache_fingerprint, cache_snapshot
from coop_dbo.runner import wrap_forward
from coop_dbo.split import DefaultSplitter


def record_calls(model) -> list[tuple[dict, object]]:
    """Wrap ``model.forward`` to record each call's kwargs and static call."""
    calls: list[tuple[dict, object]] = []
    original = model.forward

    def forward(*args, **kwargs):
        calls.append((kwargs, DefaultSplitter().plan(args, kwargs).static_call()))
        return original(*args, **kwargs)

    model.forward = forward
    return calls


def test_static_cache_decode_steps_share_one_key() -> None:
    model = make_model("qwen3_moe")
    ids, mask = prompts(4)
    calls = record_calls(model)
    greedy(model, ids, mask, cache_implementation="static")
    assert len(calls) == NEW_TOKENS
    prefill, decode = calls[0][1], [c[1] for c in calls[1:]]
    assert prefill is None  # the cache allocates its tensors in the prefill: no replay
    assert all(c is not None for c in decode)
    assert len({c.key for c in decode}) == 1  # one graph serves every decode step
    assert all(c[0]["input_ids"].shape == (4, 1) for c in calls[1:])
    # the mask has the cache's fixed length at every step, so it can be copied in
    assert len({c[0]["attention_mask"].shape for c in calls[1:]}) == 1


def test_dynamic_cache_calls_cannot_replay() -> None:
    model = make_model("qwen3_moe")
    ids, mask = prompts(4)
    calls = record_calls(model)
    greedy(model, ids, mask)  # DynamicCache: it grows by reallocating
    assert [c[1] for c in calls[1:]] == [None] * (NEW_TOKENS - 1)


def test_another_cache_or_batch_gets_another_key() -> None:
    model = make_model("mixtral")
    keys = []
    for batch in (4, 4, 6):
        calls = record_calls(model)
        greedy(model, *prompts(batch, seed=batch), cache_implementation="static")
        keys.append(calls[-1][1].key)
        del model.forward
    assert keys[2] != keys[0]
    # a cache transformers kept between the calls keeps its key; a new one gets a new key
    same_cache = keys[0] == keys[1]
    fp = [k for k in keys[0] if isinstance(k, tuple) and k and k[0] == "state"]
    assert len(fp) == 1
    assert same_cache == (fp[0] in keys[1])


#: Families beyond the three of ``test_hf_models`` whose static-cache decode steps replay:
#: shared experts (Qwen2-MoE, GLM-4-MoE) and hybrids whose linear-attention layers keep
#: convolution and recurrent states (ZAYA: both in one layer; Qwen3-Next, Jamba,
#: Granite-MoE-Hybrid: beside attention layers).
GRAPH_FAMILIES = ("qwen2_moe", "glm4_moe", "zaya", "qwen3_next", "jamba", "granitemoehybrid")


def family_static_calls(model_type: str, device: str = "cpu"):
    model = build(hf_family(model_type)).to(device)
    ids, mask = (t.to(device) for t in hf_prompts())
    calls = record_calls(model)
    greedy(model, ids, mask, cache_implementation="static")
    return [c[1] for c in calls]


@pytest.mark.parametrize("model_type", ["zaya", "qwen3_next", "jamba"])
def test_hybrid_static_cache_decode_steps_share_one_key(model_type: str) -> None:
    """Linear-attention states are updated in place: once the prefill initialised them,
    every decode step has one key (the graph path's), and it names those states."""
    calls = family_static_calls(model_type)
    assert calls[0] is None and all(c is not None for c in calls[1:])
    assert len({c.key for c in calls[1:]}) == 1
    assert "recurrent_states" in repr(calls[-1].key)


def test_a_cache_that_reallocates_every_step_gets_a_new_key_every_step() -> None:
    """Qwen4-Exp's cache keeps position ids that grow by one column a step: no two decode
    steps share a key, which the runner turns into eager steps (GPU test below)."""
    calls = family_static_calls("qwen4_exp_text")
    keys = [c.key for c in calls[1:]]
    assert len(set(keys)) == len(keys)


def last_decode_call(batch: int):
    """A Qwen3-MoE model and the kwargs of its last static-cache decode step (the cache has
    room for more steps)."""
    model = make_model("qwen3_moe")
    calls = record_calls(model)
    ids, mask = prompts(batch)
    greedy(model, ids, mask,
           past_key_values=StaticCache(model.config, max_cache_len=ids.shape[1] + 2 * NEW_TOKENS))
    del model.forward
    return model, calls[-1][0]


def test_padding_a_decode_call_writes_the_callers_rows_and_scratch_rows_only() -> None:
    model, kwargs = last_decode_call(6)
    cache = kwargs["past_key_values"]
    ref_cache = copy.deepcopy(cache)
    ref = model(**{**kwargs, "past_key_values": ref_cache})

    call = DefaultSplitter().plan((), kwargs).static_call(8)
    assert call is not None and call.rows == 8
    assert [tuple(t.shape) for t in call.tensors] == [
        (8, *t.shape[1:]) if t.dim() and t.shape[0] == 6 else tuple(t.shape)
        for t in DefaultSplitter().plan((), kwargs).static_call().tensors]
    args, padded_kwargs = call.rebuild(call.tensors)
    padded = padded_kwargs["past_key_values"]
    assert padded is not cache and type(padded) is type(cache)
    layer, big = cache.layers[0], padded.layers[0]
    assert big.keys.shape[0] == 8 and layer.keys.shape[0] == 6
    assert layer.keys.data_ptr() == big.keys.data_ptr()  # the caller's rows come first
    assert layer.cumulative_length is big.cumulative_length  # counters are shared
    scratch_before = big.keys[6:].clone()

    out = call.finish(model(*args, **padded_kwargs))
    assert out.past_key_values is cache  # the caller's cache, not the padded one
    assert out.logits.shape == ref.logits.shape
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(cache.layers, ref_cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)
        assert int(mine.cumulative_length) == int(theirs.cumulative_length)
    assert not torch.equal(big.keys[6:], scratch_before)  # the padding rows wrote scratch

    again = DefaultSplitter().plan((), kwargs).static_call(8)
    assert again.key == call.key  # the next step replays the same graph
    assert again.rebuild(again.tensors)[1]["past_key_values"] is padded


def test_what_a_padded_step_assigns_on_the_cache_reaches_the_callers_cache() -> None:
    """Qwen4-Exp's cache gets a new, longer ``position_ids`` tensor at every step. Every
    decode step run padded (rebuilt from ``static_call(8)``, as a graph replay runs it)
    still gives the tokens of unpadded steps, and the caller's cache ends as theirs."""
    model = build(hf_family("qwen4_exp_text"))
    ids, mask = hf_prompts()  # batch 6
    ref = greedy(model, ids, mask, cache_implementation="static")
    theirs = ref.past_key_values.position_ids.clone()  # generate may reuse the cache object
    original = model.forward

    @functools.wraps(original)  # generate reads the signature
    def padded_forward(*args, **kwargs):
        call = DefaultSplitter().plan(args, kwargs).static_call(8)
        if kwargs["input_ids"].shape[1] != 1 or call is None:
            return original(*args, **kwargs)
        args, kwargs = call.rebuild(call.tensors)
        return call.finish(original(*args, **kwargs))

    model.forward = padded_forward
    out = greedy(model, ids, mask, cache_implementation="static")
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mine = out.past_key_values.position_ids
    assert mine.shape == theirs.shape == (3, 6, ids.shape[1] + NEW_TOKENS - 1)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen4_exp_text"])
def test_a_padded_cache_is_freed_with_its_last_reference(model_type: str) -> None:
    """The padding memo is keyed weakly and holds nothing that refers back to the cache,
    also for a cache with tensors of its own beside its layers (Qwen4-Exp's
    ``position_ids``)."""
    import gc
    import weakref

    model = build(hf_family(model_type))
    caches = []
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1 and not caches:
            assert DefaultSplitter().plan(args, kwargs).static_call(8) is not None
            caches.append(weakref.ref(kwargs["past_key_values"]))
        return original(*args, **kwargs)

    model.forward = forward
    greedy(model, *hf_prompts(), cache_implementation="static")
    del model
    gc.collect()
    assert caches[0]() is None


def test_a_dynamic_caches_fingerprint_keeps_none_of_its_tensors() -> None:
    """A dynamic cache has no fingerprint (it reallocates at every step), and nothing of
    it is kept for one: a step's old keys are freed."""
    import gc
    import weakref

    model = make_model("qwen3_moe")
    alive: list[int] = []
    original = model.forward

    @functools.wraps(original)
    def dynamic(*args, **kwargs):
        cache = kwargs["past_key_values"]
        if kwargs["input_ids"].shape[1] != 1:
            return original(*args, **kwargs)
        assert DefaultSplitter().plan(args, kwargs).static_call() is None
        old = [weakref.ref(layer.keys) for layer in cache.layers]
        out = original(*args, **kwargs)
        gc.collect()
        alive.append(sum(r() is not None for r in old))
        return out

    model.forward = dynamic
    greedy(model, *prompts(6))  # DynamicCache: its keys are reallocated at every step
    assert alive == [0] * (NEW_TOKENS - 1)


def test_what_cannot_be_padded() -> None:
    model = make_model("qwen3_moe")
    calls = record_calls(model)
    greedy(model, *prompts(6))  # DynamicCache: no graph, padded or not
    assert DefaultSplitter().plan((), calls[-1][0]).static_call(8) is None
    _, kwargs = last_decode_call(6)
    with pytest.raises(ValueError, match=r"static_call\(rows=4\): a call of 6 rows can only "
                                         r"be padded to more rows\."):
        DefaultSplitter().plan((), kwargs).static_call(4)


def test_rebuild_puts_new_tensors_in_place_and_keeps_the_cache() -> None:
    model = make_model("qwen3_moe")
    calls = record_calls(model)
    greedy(model, *prompts(4), cache_implementation="static")
    kwargs, call = calls[-1]
    new = [t.clone() + 0 for t in call.tensors]
    args2, kwargs2 = call.rebuild(new)
    assert args2 == ()
    assert kwargs2.keys() == kwargs.keys()
    assert kwargs2["past_key_values"] is kwargs["past_key_values"]
    placed = [v for v in kwargs2.values() if isinstance(v, torch.Tensor)]
    assert len(placed) == len(new) and all(any(p is n for n in new) for p in placed)
    assert {k: v for k, v in kwargs2.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}


def test_snapshot_restores_what_a_step_advances_in_place() -> None:
    model = make_model("qwen3_moe")
    ids, _ = prompts(4)
    cache = StaticCache(model.config, max_cache_len=32)
    assert cache_fingerprint(cache) is None  # not allocated before the first step
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    fingerprint = cache_fingerprint(cache)
    assert fingerprint is not None
    counters = [layer.cumulative_length for layer in cache.layers]
    before = [int(c) for c in counters]
    assert before == [ids.shape[1]] * len(counters)
    restore = cache_snapshot(cache)
    model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    assert [int(c) for c in counters] == [b + 1 for b in before]
    restore()
    assert [int(c) for c in counters] == before
    assert all(a is b for a, b in zip(counters, [la.cumulative_length for la in cache.layers]))
    assert cache_fingerprint(cache) == fingerprint  # same tensors: a graph stays valid


def test_a_kept_fingerprint_follows_every_change_of_the_cache() -> None:
    """The fingerprint is kept per cache between steps and recomputed when anything on
    its walk was replaced, moved, added or removed."""
    model = make_model("qwen3_moe")
    ids, _ = prompts(4)
    cache = StaticCache(model.config, max_cache_len=32)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    fp = cache_fingerprint(cache)
    assert fp is not None and cache_fingerprint(cache) == fp
    layer = cache.layers[0]
    keys = layer.keys
    layer.keys = keys.clone()  # replaced
    assert cache_fingerprint(cache) != fp
    layer.keys = keys
    assert cache_fingerprint(cache) == fp
    keys.set_(keys.clone())  # the same tensor object, moved to new memory
    moved = cache_fingerprint(cache)
    assert moved is not None and moved != fp
    layer.is_initialized = False  # a flag
    assert cache_fingerprint(cache) is None
    layer.is_initialized = True
    assert cache_fingerprint(cache) == moved
    layer.scratch = torch.zeros(4)  # an attribute added
    assert cache_fingerprint(cache) != moved
    del layer.scratch
    cache.layers.append(copy.copy(cache.layers[-1]))  # a layer added
    assert len(cache_fingerprint(cache)) > len(moved)
    cache.layers.pop()
    assert cache_fingerprint(cache) == moved
    layer.extra = 1
    cache_fingerprint(cache)
    del layer.extra  # an attribute swapped for another: the same count of attributes
    layer.other = 1
    assert cache_fingerprint(cache) != moved
    del layer.other
    layer.keys = layer.keys.detach()  # (resize_ refuses tensors that require grad)
    detached = cache_fingerprint(cache)
    layer.keys.resize_(2, *layer.keys.shape[1:])  # the same memory, another shape
    resized = cache_fingerprint(cache)
    assert resized != detached
    assert resized != moved and (2, *keys.shape[1:]) in [e[2] for e in resized if len(e) == 4]
    counter = layer.cumulative_length  # one element: == with a copy is True
    layer.cumulative_length = counter.clone()
    copied = cache_fingerprint(cache)
    assert copied != resized
    layer.cumulative_length = int(counter)  # == with the tensor is tensor(True)
    assert cache_fingerprint(cache) != copied
    layer.cumulative_length = counter
    assert cache_fingerprint(cache) == resized
    layer.keys.unsqueeze_(0)  # the same object, memory and element count; another shape
    assert cache_fingerprint(cache) != resized
    layer.keys.squeeze_(0)
    assert cache_fingerprint(cache) == resized


def test_wrap_forward_turns_off_generate_compile_and_unwrap_restores_it() -> None:
    model = make_model("mixtral")
    model.generation_config.disable_compile = False
    runner = wrap_forward(model)
    assert model.generation_config.disable_compile is True
    runner.unwrap()
    assert model.generation_config.disable_compile is False


# -- the runner's whole-call graph path on the CPU, with a stand-in for CallGraph -----------

@pytest.fixture
def graphs_on_the_cpu(monkeypatch):
    """Calls look like CUDA calls to the runner, and their graphs are stand-ins."""
    stand_in_graphs(functools.partial(monkeypatch.setattr, raising=False))

    def wrap(model, sizes: list[int], steps: list):
        runner = wrap_forward(model, decide="always", on_step=steps.append)
        runner.graph_sizes = sizes  # (cuda_graph_sizes= itself needs CUDA)
        return runner
    return wrap


def test_a_padded_cache_that_moves_every_step_stops_capturing(graphs_on_the_cpu,
                                                              caplog) -> None:
    """Qwen4-Exp's cache grows its position ids at every step, so every padded decode
    step brings a new key: three captures over the same cache, then eager for good, with
    one warning, and the tokens of eager DBO throughout."""
    model = build(hf_family("qwen4_exp_text"))
    install_moe_hooks(model)
    ids, mask = hf_prompts()  # batch 6
    ref_steps: list = []
    runner = graphs_on_the_cpu(model, [], ref_steps)
    ref = greedy(model, ids, mask, cache_implementation="static")
    runner.unwrap()
    steps: list = []
    graphs_on_the_cpu(model, [8], steps)
    with caplog.at_level(logging.WARNING, logger="coop_dbo.runner"):
        out = greedy(model, ids, mask, cache_implementation="static")
    assert [s.path for s in steps] == (["eager-dbo"] + ["graph:8"] * 3
                                       + ["eager-dbo"] * (NEW_TOKENS - 4))
    assert torch.equal(out.sequences, ref.sequences)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reallocated every step" in warnings[0]


def test_short_generates_with_new_caches_keep_capturing(graphs_on_the_cpu) -> None:
    """One decode step per generate, a new cache each time: every capture is replayed only
    once, but over another cache, so capturing goes on."""
    model = make_model("qwen3_moe")
    install_moe_hooks(model)
    ids, mask = prompts(6)
    steps: list = []
    graphs_on_the_cpu(model, [8], steps)
    for new_tokens in (2, 2, 2, 2, 4):
        steps.clear()
        cache = StaticCache(model.config, max_cache_len=ids.shape[1] + new_tokens)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert [s.path for s in steps] == ["eager-dbo"] + ["graph:8"] * (new_tokens - 1)


def test_a_capture_interrupted_by_ctrl_c_is_captured_again_later(graphs_on_the_cpu,
                                                                  monkeypatch) -> None:
    """``KeyboardInterrupt`` during a capture reaches the caller, and marks nothing: the
    same call (same cache, same key) captures and replays on the next generate."""
    made = []

    class InterruptedOnce(StandInCallGraph):
        def __init__(self, *args, **kwargs) -> None:
            made.append(self)
            if len(made) == 1:
                raise KeyboardInterrupt
            super().__init__(*args, **kwargs)

    model = make_model("qwen3_moe")
    install_moe_hooks(model)
    ids, mask = prompts(8)
    steps: list = []
    graphs_on_the_cpu(model, [8], steps)
    stand_in_graphs(functools.partial(monkeypatch.setattr, raising=False), InterruptedOnce)
    cache = StaticCache(model.config, max_cache_len=ids.shape[1] + 4)
    with pytest.raises(KeyboardInterrupt):
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                       max_new_tokens=3, min_new_tokens=3, do_sample=False)
    cache.reset()
    steps.clear()
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                   max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert [s.path for s in steps] == ["eager-dbo", "graph:8", "graph:8"]
    assert len(made) == 2


def test_a_call_that_does_not_microbatch_leaves_the_cache_unpadded(graphs_on_the_cpu) -> None:
    model = make_model("qwen3_moe")
    install_moe_hooks(model)
    ids, mask = prompts(6)
    steps: list = []
    runner = graphs_on_the_cpu(model, [8], steps)
    runner.enabled = False
    cache = StaticCache(model.config, max_cache_len=ids.shape[1] + 4)
    model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                   max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert {s.path for s in steps} == {"plain"}
    keys = cache.layers[0].keys
    assert keys.untyped_storage().nbytes() == keys.numel() * keys.element_size()


# -- GPU: generate through the graph path ----------------------------------------------------

def gpu_model(family: str):
    model = make_model(family).to("cuda")
    install_moe_hooks(model)
    return model


def eager_dbo(model, ids, mask, **kw):
    """Static-cache ``generate`` with every step eager DBO (the graph path's reference)."""
    steps: list = []
    runner = wrap_forward(model, decide="always", on_step=steps.append)
    out = greedy(model, ids, mask, cache_implementation="static", **kw)
    runner.unwrap()
    assert {s.path for s in steps} == {"eager-dbo"}
    return out


def graph_vs_eager(model, ids, mask, sizes: list[int]):
    """``(graph output, eager DBO output, graph path's steps)`` of static-cache generate."""
    ref = eager_dbo(model, ids, mask)
    steps: list = []
    runner = wrap_forward(model, decide="always", cuda_graph_sizes=sizes, on_step=steps.append)
    out = greedy(model, ids, mask, cache_implementation="static")
    runner.unwrap()
    return out, ref, steps


def check_graph_path(model, ids, mask) -> None:
    """Every decode step replays the graph of its batch, with eager DBO's tokens."""
    batch = ids.shape[0]
    out, ref, steps = graph_vs_eager(model, ids, mask, [batch])
    assert [s.path for s in steps] == ["eager-dbo"] + [f"graph:{batch}"] * (NEW_TOKENS - 1)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def with_a_failing_capture(model, ids, mask, hook, caplog):
    """Static-cache ``generate`` with ``hook`` as a forward pre-hook of the first layer
    (to make the capture fail): ``(output, steps, runner, warning messages)``; every step
    ran eager DBO."""
    handle = model.model.layers[0].register_forward_pre_hook(hook)
    steps: list = []
    runner = wrap_forward(model, decide="always", cuda_graph_sizes=[ids.shape[0]],
                          on_step=steps.append)
    try:
        with caplog.at_level(logging.WARNING, logger="coop_dbo.runner"):
            out = greedy(model, ids, mask, cache_implementation="static")
    finally:
        handle.remove()
    assert {s.path for s in steps} == {"eager-dbo"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return out, steps, runner, warnings


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_graph_path_equals_eager_dbo_gpu(family: str) -> None:
    check_graph_path(gpu_model(family), *prompts(8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_graphs_at_mixed_batch_sizes_gpu() -> None:
    model = gpu_model("qwen3_moe")
    inputs = {b: prompts(b, seed=b, device="cuda") for b in (4, 6, 8)}
    refs = {b: eager_dbo(model, *inputs[b]).sequences for b in inputs}
    steps: list = []
    wrap_forward(model, decide="always", cuda_graph_sizes=[4, 8], on_step=steps.append)
    for b in [4, 8, 6, 4, 8, 4, 8, 6, 8, 4]:
        out = greedy(model, *inputs[b], cache_implementation="static")
        assert torch.equal(out.sequences, refs[b]), f"batch {b}"
        assert out.past_key_values.layers[0].keys.shape[0] == b
    replays = sum(s.path.startswith("graph:") for s in steps)
    assert replays == 10 * (NEW_TOKENS - 1)
    # batch 6 replays the graph of 8, padded with scratch rows
    assert {s.path for s in steps if s.batch_size == 6} == {"eager-dbo", "graph:8"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_failed_capture_falls_back_to_eager_gpu(caplog) -> None:
    model = gpu_model("mixtral")
    ids, mask = prompts(8, device="cuda")
    ref = eager_dbo(model, ids, mask)

    def refuse_capture(module, args):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this layer cannot be captured")

    torch.cuda.synchronize()
    out, _, runner, warnings = with_a_failing_capture(model, ids, mask, refuse_capture,
                                                      caplog)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(warnings) == 1
    assert warnings[0].startswith("coop_dbo: capturing the dbo step of batch 8 failed "
                                  "(RuntimeError: this layer cannot be captured)")
    assert list(runner._call_graphs.values()) == [None]  # nothing of the graph is kept


@pytest.mark.parametrize("model_type", GRAPH_FAMILIES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_added_families_generate_graph_path_equals_eager_dbo_gpu(model_type: str) -> None:
    model = build(hf_family(model_type)).to("cuda")
    install_moe_hooks(model)
    check_graph_path(model, *(t.to("cuda") for t in hf_prompts()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cache_that_moves_every_step_stops_capturing_gpu(caplog) -> None:
    """A cache whose tensors move at every step (here a hook reallocates one layer's keys
    before each call, as Qwen4-Exp's cache does with its position ids) gets a new key at
    every step: three captures, then eager for good, with one warning."""
    model = gpu_model("mixtral")
    ids, mask = prompts(8, device="cuda")

    moved = []  # kept alive, so that no later copy lands at an earlier address

    def move_keys(module, args, kwargs):
        layer = kwargs["past_key_values"].layers[0]
        if getattr(layer, "is_initialized", False):
            moved.append(layer.keys)
            layer.keys = layer.keys.clone()

    model.register_forward_pre_hook(move_keys, with_kwargs=True)
    with caplog.at_level(logging.WARNING, logger="coop_dbo.runner"):
        out, ref, steps = graph_vs_eager(model, ids, mask, [8])
    assert torch.equal(out.sequences, ref.sequences)
    assert [s.path for s in steps] == (["eager-dbo"] + ["graph:8"] * 3
                                       + ["eager-dbo"] * (NEW_TOKENS - 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reallocated every step" in warnings[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_capture_the_step_invalidated_leaves_later_captures_working_gpu(caplog) -> None:
    """A host sync inside the capture invalidates it: that call runs eagerly, and the next
    cache is captured (into a new memory pool) and replays."""
    model = gpu_model("mixtral")
    ids, mask = prompts(8, device="cuda")
    ref = eager_dbo(model, ids, mask)

    def sync_in_capture(module, args):
        if torch.cuda.is_current_stream_capturing():
            torch.ones(1, device="cuda").item()  # a host sync: illegal while capturing

    out, steps, _, warnings = with_a_failing_capture(model, ids, mask, sync_in_capture,
                                                     caplog)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(warnings) == 1
    assert warnings[0].startswith("coop_dbo: capturing the dbo step of batch 8 failed (")
    steps.clear()
    cache = StaticCache(model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)
    out = greedy(model, ids, mask, past_key_values=cache)
    assert [s.path for s in steps] == ["eager-dbo"] + ["graph:8"] * (NEW_TOKENS - 1)
    assert torch.equal(out.sequences, ref.sequences)


# -- 2 GPUs: expert-parallel generate through the graph path -------------------------------

@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 or more CUDA GPUs")
@pytest.mark.timeout(600)
def test_expert_parallel_generate_graph_path_nccl(tmp_path) -> None:
    """2 GPUs, NCCL all-to-all inside the graphs: each rank's tokens equal one GPU running
    every expert."""
    from test_hf_models import check_ep_generate

    check_ep_generate(tmp_path, "qwen3_moe", graphs=True)
