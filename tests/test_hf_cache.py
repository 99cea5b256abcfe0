"""The cache split of ``coop_dbo.hf.cache`` on every cache layer type transformers ships.

The check for each type: a cache of 5 sequences and the same cache copied; three steps
(a 4-token prefill into the empty cache, then two 1-token steps) go once into the whole
copy and once into the cache split into microbatches of 3 and 2 rows, each microbatch
given its rows of the step's inputs through the layer's own update methods, then merged.
After every step the two must hold the same state, tensor for tensor and flag for flag;
and each microbatch must have been handed views of exactly its own rows of every
per-sequence tensor (keys, values, indexer keys, convolution and recurrent states,
compressor buffers, MiniMax's linear-attention list).
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hf_families import (
    NEW_TOKENS,
    build,
    family,
    greedy,
    prompts,
    state_tensors,
    tiny_config,
)

transformers = pytest.importorskip("transformers")
from transformers import cache_utils as cu

from coop_dbo import SplitError
from coop_dbo.hf.cache import cache_fingerprint, cache_snapshot, merge_caches, split_cache
from coop_dbo.runner import wrap_forward

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

B, SIZES, ROWS = 5, [3, 2], [(0, 3), (3, 5)]
HEADS, DIM, CONV, KERNEL = 2, 4, 6, 3


def _minimax_m3(static: bool) -> Any:
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m

    return m.MiniMaxM3VLSparseStaticCacheLayer(8) if static else m.MiniMaxM3VLSparseCacheLayer()


def _deepseek_v4(kind: str) -> Any:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    cfg = tiny_config("deepseek_v4")
    cfg.compress_rates = {"heavily_compressed_attention": 2, "compressed_sparse_attention": 2}
    return (m.DeepseekV4CSACache if kind == "csa" else m.DeepseekV4HCACache)(cfg)


def _recording() -> Any:
    layer = cu.LinearAttentionLayer(number_of_states=2)
    layer.activate_past_recording()
    return layer


#: layer type -> (its factory, the updates it takes)
LAYERS: dict[str, tuple[Callable[[], Any], set[str]]] = {
    "dynamic": (cu.DynamicLayer, {"kv"}),
    "sliding": (lambda: cu.DynamicSlidingWindowLayer(sliding_window=4), {"kv"}),
    "indexed": (cu.DynamicIndexedLayer, {"kv", "indexer"}),
    "static": (lambda: cu.StaticLayer(max_cache_len=8), {"kv"}),
    "static_sliding": (lambda: cu.StaticSlidingWindowLayer(max_cache_len=8, sliding_window=4),
                       {"kv"}),
    "static_indexed": (lambda: cu.StaticIndexedLayer(max_cache_len=8), {"kv", "indexer"}),
    "linear": (lambda: cu.LinearAttentionLayer(number_of_states=2), {"conv", "recurrent"}),
    "linear_recording": (_recording, {"conv", "recurrent"}),
    "conv_only": (cu.LinearAttentionLayer, {"conv"}),
    "hybrid": (cu.LinearAttentionAndFullAttentionLayer, {"kv", "conv", "recurrent"}),
    "hybrid_sliding": (lambda: cu.LinearAttentionAndSlidingWindowAttentionLayer(
        sliding_window=4), {"kv", "conv", "recurrent"}),
    "hybrid_static": (lambda: cu.LinearAttentionAndStaticFullAttentionLayer(max_cache_len=8),
                      {"kv", "conv", "recurrent"}),
    "hybrid_static_sliding": (lambda: cu.LinearAttentionAndStaticSlidingWindowAttentionLayer(
        max_cache_len=8, sliding_window=4), {"kv", "conv", "recurrent"}),
    "minimax_m3_sparse": (lambda: _minimax_m3(False), {"kv", "index"}),
    "minimax_m3_sparse_static": (lambda: _minimax_m3(True), {"kv", "index"}),
    "deepseek_v4_hca": (lambda: _deepseek_v4("hca"), {"kv", "compressor"}),
    "deepseek_v4_csa": (lambda: _deepseek_v4("csa"), {"kv", "compressor", "overlap"}),
}


def step_inputs(tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One step's inputs for all ``B`` sequences."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {"k": r(B, HEADS, tokens, DIM), "v": r(B, HEADS, tokens, DIM),
            "conv0": r(B, CONV, tokens), "conv1": r(B, CONV + 2, tokens),
            "recurrent": r(B, HEADS, DIM, DIM), "indexer": r(B, tokens, DIM),
            "index": r(B, 1, tokens, DIM), "ckv": r(B, tokens, DIM), "gate": r(B, tokens, DIM),
            "chunk": r(B, 2, 2, 2 * DIM), "linear": r(B, HEADS, DIM, DIM)}


def apply_step(cache: Any, ops: set[str], x: dict[str, torch.Tensor], lo: int, hi: int) -> None:
    """Rows ``lo:hi`` of the step's inputs into ``cache`` (layer 0, and MiniMax's list)."""
    rows = {k: v[lo:hi] for k, v in x.items()}
    layer = cache.layers[0]
    if "kv" in ops:
        cache.update(rows["k"], rows["v"], 0)
    if "conv" in ops:
        states = layer.number_of_states
        for s, c in enumerate((rows["conv0"], rows["conv1"])[:states]):
            cache.update_conv_state(c, 0, state_idx=s, conv_kernel_size=KERNEL)
    if "recurrent" in ops:
        cache.update_recurrent_state(rows["recurrent"], 0)
    if "indexer" in ops:
        cache.update_indexer(rows["indexer"], 0)
    if "index" in ops:
        layer.update_index(rows["index"])
    if "compressor" in ops:
        kv, gate, _ = layer.store_compression_weights("compressor", rows["ckv"], rows["gate"])
        layer.update_compressor_states("compressor", kv[:, ::2] + gate[:, ::2])
    if "overlap" in ops:
        layer.update_overlap_state("indexer", rows["chunk"], rows["chunk"] * 2, DIM)
    if isinstance(cache, _minimax_cache_cls()):
        held = cache.linear_cache[1] if len(cache.linear_cache) > 1 else []
        cache.set_linear_cache(1, rows["linear"] + (held if len(held) else 0))


def _minimax_cache_cls() -> type:
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    return MiniMaxCache


def state(obj: Any) -> dict[str, Any]:
    """Every tensor and plain value of a cache's state, by path."""
    out: dict[str, Any] = dict(state_tensors(obj))

    def plain(v: Any, path: str) -> None:
        if isinstance(v, (bool, int, float, str, type(None))):
            out[path] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                plain(x, f"{path}[{k!r}]")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                plain(x, f"{path}[{i}]")
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("transformers"):
            for k, x in vars(v).items():
                if not k.startswith("_coop_dbo"):
                    plain(x, f"{path}.{k}")

    plain(obj, "")
    return out


def assert_same_state(got: Any, want: Any) -> None:
    a, b = state(got), state(want)
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k, v in b.items():
        if isinstance(v, torch.Tensor):
            assert isinstance(a[k], torch.Tensor) and a[k].shape == v.shape, k
            assert torch.equal(a[k], v), k
        else:
            assert a[k] == v, k


def assert_rows_handed_out(parts: list[Any], cache: Any) -> None:
    """Each part holds views of its own rows of every per-sequence tensor."""
    whole = dict(state_tensors(cache))
    for part, (lo, hi) in zip(parts, ROWS):
        for path, t in state_tensors(part):
            full = whole[path]
            dim = 1 if path.endswith("position_ids") and full.dim() == 3 else 0
            if full.dim() > dim and full.shape[dim] == B:
                assert torch.equal(t, full.narrow(dim, lo, hi - lo)), path
                assert t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
            else:
                assert t is not full, path  # counters and placeholders: the part's own


def make_cache(kind: str) -> tuple[Any, set[str]]:
    if kind == "minimax_cache":
        cache = _minimax_cache_cls()()
        cache.layers.append(cu.DynamicLayer())
        return cache, {"kv"}
    factory, ops = LAYERS[kind]
    return cu.Cache(layers=[factory()]), ops


@pytest.mark.parametrize("kind", [*LAYERS, "minimax_cache"])
def test_split_merge_equals_the_whole_batch(kind: str) -> None:
    cache, ops = make_cache(kind)
    whole = copy.deepcopy(cache)
    for i, tokens in enumerate([4, 1, 1]):
        x = step_inputs(tokens, seed=i)
        apply_step(whole, ops, x, 0, B)
        parts = split_cache(cache, SIZES, B)
        assert_rows_handed_out(parts, cache)
        for part, (lo, hi) in zip(parts, ROWS):
            apply_step(part, ops, x, lo, hi)
        assert merge_caches(parts, cache) is cache
        assert_same_state(cache, whole)
    if "conv" in ops:  # flags a layer mutates are each microbatch's own
        a, b = split_cache(cache, SIZES, B)
        assert a.layers[0].has_previous_state is not b.layers[0].has_previous_state


def test_encoder_decoder_cache_splits_both_caches() -> None:
    cache = cu.EncoderDecoderCache(cu.DynamicCache(), cu.DynamicCache())
    whole = copy.deepcopy(cache)
    for i, tokens in enumerate([3, 1]):
        x = step_inputs(tokens, seed=i)
        whole.self_attention_cache.update(x["k"], x["v"], 0)
        parts = split_cache(cache, SIZES, B)
        for part, (lo, hi) in zip(parts, ROWS):
            part.self_attention_cache.update(x["k"][lo:hi], x["v"][lo:hi], 0)
        merge_caches(parts, cache)
        assert_same_state(cache, whole)


def test_caches_the_microbatches_made_merge_into_a_new_one() -> None:
    x = step_inputs(3, seed=0)
    parts = [cu.DynamicCache() for _ in SIZES]
    for part, (lo, hi) in zip(parts, ROWS):
        part.update(x["k"][lo:hi], x["v"][lo:hi], 0)
    merged = merge_caches(parts, None)
    assert type(merged) is cu.DynamicCache and merged is not parts[0]
    assert torch.equal(merged.layers[0].keys, x["k"])


# -- what cannot be split raises, naming it ---------------------------------------------------

HINT = ("pass split=/merge= to CoopDBORunner that give each microbatch its own cache (or use "
        "DynamicCache / StaticCache).")


def test_state_that_cannot_be_split_is_refused_by_name() -> None:
    class PerHeadLayer(cu.DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.ones(4, 2)

    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner cannot split a Cache: layers[0].scale is a tensor of shape (4, 2) "
            "whose dim 0 is not the batch (5), so its rows cannot be given to the "
            f"microbatches; {HINT}")):
        split_cache(cu.Cache(layers=[PerHeadLayer()]), SIZES, B)

    layer = cu.DynamicLayer()
    layer.extra = types.SimpleNamespace(t=torch.zeros(B, 2))
    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner cannot split a Cache: layers[0].extra is a SimpleNamespace holding "
            f"tensors, which the cache split does not know; {HINT}")):
        split_cache(cu.Cache(layers=[layer]), SIZES, B)

    offloaded = cu.DynamicCache()
    offloaded.offloading = True
    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner cannot split an offloaded DynamicCache: its layers move between "
            "devices on a side stream while the microbatches run; make the cache without "
            "offloading.")):
        split_cache(offloaded, SIZES, B)

    class Quantized(cu.QuantizedLayer):
        def _quantize(self, tensor, axis):
            return tensor

        def _dequantize(self, q_tensor):
            return q_tensor

    with pytest.raises(SplitError, match=re.escape(
            "CoopDBORunner cannot split layer 0 of a Cache: test_state_that_cannot_be_split_"
            "is_refused_by_name.<locals>.Quantized keeps its keys quantized, and its rows "
            f"cannot be cut; {HINT}")):
        split_cache(cu.Cache(layers=[Quantized()]), SIZES, B)


def test_microbatches_that_leave_shared_state_unlike_are_refused_at_merge() -> None:
    cache = cu.Cache(layers=[cu.LinearAttentionLayer()])
    parts = split_cache(cache, SIZES, B)
    parts[0].layers[0].has_previous_state[0] = True
    with pytest.raises(SplitError, match=re.escape(
            "the microbatches' caches disagree on layers[0].has_previous_state[0] "
            "([True, False]); it is not per-sequence state, so every microbatch must leave "
            "it alike.")):
        merge_caches(parts, cache)


# -- CUDA graph helpers see the whole state ---------------------------------------------------

def test_snapshot_restores_recurrent_states_and_flags_in_place() -> None:
    cache, ops = make_cache("hybrid_static")
    apply_step(cache, ops, step_inputs(4, seed=0), 0, B)
    layer = cache.layers[0]
    conv, rec = layer.conv_states[0], layer.recurrent_states[0]
    before = (conv.clone(), rec.clone(), int(layer.cumulative_length))
    fingerprint = cache_fingerprint(cache)
    assert fingerprint is not None
    assert any("conv_states" in entry[0] for entry in fingerprint)  # dict-held state too
    restore = cache_snapshot(cache)
    apply_step(cache, ops, step_inputs(1, seed=1), 0, B)
    assert not torch.equal(rec, before[1])
    restore()
    assert layer.conv_states[0] is conv and layer.recurrent_states[0] is rec
    assert torch.equal(conv, before[0]) and torch.equal(rec, before[1])
    assert int(layer.cumulative_length) == before[2]
    assert cache_fingerprint(cache) == fingerprint


def test_a_python_position_keeps_a_cache_off_graphs() -> None:
    """A static sliding window branches on a Python int that each step advances (the
    window fills up): a replayed graph would not follow, so no fingerprint."""
    cache, ops = make_cache("static_sliding")
    apply_step(cache, ops, step_inputs(2, seed=0), 0, B)
    assert cache_fingerprint(cache) is None
    cache, ops = make_cache("static")
    apply_step(cache, ops, step_inputs(2, seed=0), 0, B)
    assert cache_fingerprint(cache) is not None


# -- hybrid models through the runner alone ---------------------------------------------------

@pytest.mark.parametrize("model_type", ["zaya", "minimax", "inkling_text", "qwen3_next"])
def test_hybrid_caches_through_the_runner_alone(model_type: str) -> None:
    """No MoE hooks: only the split of the cache between the microbatches. The linear-
    attention state once stayed shared by both microbatches here (logits off from the
    first decode step)."""
    model = build(family(model_type))
    ids, mask = prompts()
    ref = greedy(model, ids, mask)
    steps = []
    runner = wrap_forward(model, on_step=steps.append)
    out = greedy(model, ids, mask)
    runner.unwrap()
    assert [s.path for s in steps] == ["eager-dbo"] * NEW_TOKENS
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
