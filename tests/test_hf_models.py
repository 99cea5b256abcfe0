"""Drop-in proof on transformers' own Mixtral, Qwen3-MoE and DeepSeek-V3 (tiny random configs).

Each test builds a 2-MoE-layer model from a fixed seed (no downloads), runs the model's own
``generate()`` plainly, then again with ``install_moe_hooks`` + ``wrap_forward`` (so every
forward of ``generate`` goes through ``CoopDBORunner``), and checks the tokens are the same
and the trace shows both microbatches yielding at every MoE layer. Then how blocks are
found (by structure: the unified experts interface needs no adapter), the errors for a
block nobody knows and for an adapter that does not fit, and Llama 4's top-1 path. Every
other MoE family runs in ``test_hf_families``.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from fault_workers import end_group
from helpers import free_port, rendezvous_files
from hf_families import VOCAB, build, family
from hf_families import prompts as family_prompts
from test_runner import init_gloo, spawn
from torch import nn

from coop_dbo import (
    CoopDBORunner,
    UnsupportedModelError,
    dbo_current_ubatch_id,
    install_moe_hooks,
    remove_moe_hooks,
)
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.hf import (
    FusedExpertsAdapter,
    MoEAdapter,
    merge_caches,
    register_moe_adapter,
    split_cache,
    unregister_moe_adapter,
)
from coop_dbo.moe_hooks import YIELD_SITES
from coop_dbo.runner import wrap_forward

transformers = pytest.importorskip("transformers")
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    StaticCache,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
NEW_TOKENS = 16


def make_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-weight model of ``family`` in fp32, eval mode. 2 MoE layers, 8 experts."""
    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                            num_local_experts=8, num_experts_per_tok=2, **COMMON, **overrides)
        model = MixtralForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                             num_key_value_heads=2, head_dim=16, num_experts=8,
                             num_experts_per_tok=2, norm_topk_prob=True, **COMMON, **overrides)
        model = Qwen3MoeForCausalLM(cfg)
    elif family == "deepseek_v3":
        # 3 layers, the first dense (first_k_dense_replace=1), like the real model's layout
        cfg = DeepseekV3Config(intermediate_size=64, moe_intermediate_size=32,
                               num_hidden_layers=3, first_k_dense_replace=1,
                               num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                               num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
                               q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                               v_head_dim=16, **COMMON, **overrides)
        model = DeepseekV3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


MOE_BLOCKS = {
    "mixtral": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen3_moe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],
}
FAMILIES = list(MOE_BLOCKS)


def prompts(batch: int = 8, seed: int = 1, device: str = "cpu"):
    """``hf_families.prompts`` (left-padded, 2 to 9 tokens, with their attention mask) on
    ``device``."""
    assert COMMON["vocab_size"] == VOCAB
    ids, mask = family_prompts(batch, seed)
    assert mask.sum(1).unique().numel() > 1  # lengths differ: the padding is exercised
    return ids.to(device), mask.to(device)


def greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False,
                          return_dict_in_generate=True, output_logits=True, **kw)


# -- the drop-in proof ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_generate_through_runner_gives_the_same_tokens(family: str) -> None:
    model = make_model(family)
    ids, mask = prompts(8)
    ref = greedy(model, ids, mask)
    assert ref.sequences.shape == (8, ids.shape[1] + NEW_TOKENS)

    hooks = install_moe_hooks(model, record=True)
    assert list(hooks.blocks) == MOE_BLOCKS[family]
    steps = []
    runner = wrap_forward(model, trace=True, on_step=steps.append)
    out = greedy(model, ids, mask)

    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the KV cache generate kept is the merged one, equal to the plain run's
    for la, lb in zip(out.past_key_values.layers, ref.past_key_values.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-5)

    # every step (prefill + decode) ran eager DBO on 2 microbatches of 4 sequences
    assert len(steps) == NEW_TOKENS
    assert all(s.path == "eager-dbo" and s.sizes == [4, 4] for s in steps)
    n_moe = len(MOE_BLOCKS[family])
    for s in steps:
        per_ub = {0: [], 1: []}
        for e in s.trace:
            per_ub[e.ubatch].append(e.site)
        # the sites name each MoE block (its module path), so layers are told apart
        assert per_ub[0] == per_ub[1] == [f"{path}.{site}" for path in MOE_BLOCKS[family]
                                          for site in YIELD_SITES["switch"]]
        assert [e.ubatch for e in s.trace] == [0, 1] * (4 * n_moe)  # interleaved
    # and both microbatches entered every MoE layer once per step, in layer order
    assert hooks.calls == [(blk, ub) for _ in range(NEW_TOKENS)
                           for blk in MOE_BLOCKS[family] for ub in (0, 1)]

    runner.unwrap()
    assert remove_moe_hooks(model) == n_moe
    for path in MOE_BLOCKS[family]:
        assert "forward" not in model.get_submodule(path).experts.__dict__
    again = greedy(model, ids, mask)
    assert torch.equal(again.sequences, ref.sequences)
    assert remove_moe_hooks(model) == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_static_cache_and_odd_batch(family: str) -> None:
    """StaticCache (written in place through views) and 9 prompts (microbatches of 5 and 4)."""
    model = make_model(family)
    ids, mask = prompts(9, seed=3)
    ref = greedy(model, ids, mask, cache_implementation="static")
    install_moe_hooks(model)
    steps = []
    wrap_forward(model, on_step=steps.append)
    out = greedy(model, ids, mask, cache_implementation="static")
    assert torch.equal(out.sequences, ref.sequences)
    assert all(s.path == "eager-dbo" and s.sizes == [5, 4] for s in steps)
    for la, lb in zip(out.past_key_values.layers, ref.past_key_values.layers):
        torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-5)


def test_hooked_forward_equals_unhooked_and_batch_of_one_is_plain() -> None:
    model = make_model("qwen3_moe")
    ids, mask = prompts(3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        install_moe_hooks(model)
        hooked = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-6)
        runner = CoopDBORunner(model)
        one = runner(input_ids=ids[:1], attention_mask=mask[:1])
        assert runner.last_path == "plain"
        assert runner.last_reason == ("batch of 1 is smaller than num_ubatches=2: a "
                                      "microbatch would be empty")
        torch.testing.assert_close(one.logits, ref[:1], rtol=1e-5, atol=1e-6)
        three = runner(input_ids=ids, attention_mask=mask)
        assert runner.last_path == "eager-dbo" and runner.last_step.sizes == [2, 1]
        torch.testing.assert_close(three.logits, ref, rtol=1e-5, atol=1e-6)


# -- KV-cache split / merge ----------------------------------------------------------------

def test_dynamic_cache_split_merge_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(5, 2, 3, 4, generator=g), torch.randn(5, 2, 3, 4, generator=g),
                     layer)
    keys0 = [layer.keys.clone() for layer in cache.layers]
    parts = split_cache(cache, [3, 2], 5)
    assert [p.layers[0].keys.shape[0] for p in parts] == [3, 2]
    assert parts[0].layers[0].keys.data_ptr() == cache.layers[0].keys.data_ptr()  # views
    new = [torch.full((n, 2, 1, 4), float(i)) for i, n in enumerate([3, 2])]
    for p, k in zip(parts, new):
        for layer in range(2):
            p.update(k, k, layer)
    assert cache.get_seq_length() == 3  # the caller's cache is untouched until the merge
    merged = merge_caches(parts, cache)
    assert merged is cache and cache.get_seq_length() == 4
    for layer in range(2):
        assert torch.equal(cache.layers[layer].keys[:, :, :3], keys0[layer])
        assert torch.equal(cache.layers[layer].keys[:, :, 3:], torch.cat(new))


def test_cache_of_another_batch_is_refused() -> None:
    from coop_dbo.errors import SplitError

    cache = DynamicCache()
    cache.update(torch.zeros(4, 2, 3, 4), torch.zeros(4, 2, 3, 4), 0)
    with pytest.raises(SplitError, match=re.escape(
            "the DynamicCache passed to CoopDBORunner holds a batch of 4 sequences but the "
            "inputs have 6: pass the cache that belongs to these inputs.")):
        split_cache(cache, [3, 3], 6)


# -- blocks found by structure, unrecognised blocks, adapters ---------------------------------

class ToyMoEBlock(nn.Module):
    """A Mixtral-style block under another class name: its experts module uses the unified
    experts interface, so it is hooked without an adapter."""

    def __init__(self, cfg) -> None:
        super().__init__()
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralTopKRouter

        self.gate = MixtralTopKRouter(cfg)
        self.experts = MixtralExperts(cfg)
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, w, idx = self.gate(x)
        return self.experts(x, idx, w)


class StackedExperts(nn.Module):
    """Experts as two stacked weights ``[E, H, 2I]`` / ``[E, I, H]``, without the unified
    interface: ``forward(x, idx, w)`` loops over the tokens' experts."""

    def __init__(self, num_experts: int = 8, hidden: int = 64, inter: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w_in = nn.Parameter(torch.randn(num_experts, hidden, 2 * inter, generator=g) * 0.1)
        self.w_out = nn.Parameter(torch.randn(num_experts, inter, hidden, generator=g) * 0.1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for k in range(idx.shape[1]):
            gate, up = torch.bmm(x[:, None], self.w_in[idx[:, k]])[:, 0].chunk(2, dim=-1)
            y = torch.bmm((F.silu(gate) * up)[:, None], self.w_out[idx[:, k]])[:, 0]
            out = out + w[:, k, None] * y
        return out


class StackedMoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(64, 8, bias=False)
        self.experts = StackedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, idx, w)


class ToyModel(nn.Module):
    def __init__(self, block: type[nn.Module] = ToyMoEBlock) -> None:
        super().__init__()
        cfg = make_model("mixtral").config
        self.proj = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([block(cfg) if block is ToyMoEBlock else block()
                                     for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for b in self.blocks:
            x = x + b(x)
        return x


class StackedAdapter(MoEAdapter):
    """A user's adapter for ``StackedMoEBlock``: the block's forward routes through
    ``moe_exchange`` (what ``coop_dbo.hf.MoEAdapter`` asks of an adapter)."""

    def mismatch(self, block):
        if not isinstance(getattr(block, "experts", None), StackedExperts):
            return f"{type(block).__name__}.experts is not a StackedExperts"
        return None

    def num_experts(self, block):
        return block.experts.w_in.shape[0]

    def install(self, block, backend, *, site_prefix=""):
        from coop_dbo.hf.adapters import hook_forward
        from coop_dbo.moe_hooks import moe_exchange, swiglu_experts

        lo, hi = backend.local_expert_range
        half = block.experts.w_in.shape[2] // 2
        experts = swiglu_experts(block.experts.w_in[lo:hi, :, :half].detach(),
                                 block.experts.w_in[lo:hi, :, half:].detach(),
                                 block.experts.w_out[lo:hi].detach())

        def forward(x):
            w, idx = block.router(x).softmax(-1).topk(2, dim=-1)
            return moe_exchange(backend, x, idx, w, experts, site_prefix=site_prefix)

        return hook_forward(block, forward)


def toy_input() -> torch.Tensor:
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(0))


def test_unified_experts_are_hooked_without_an_adapter() -> None:
    model = ToyModel()
    x = toy_input()
    with torch.no_grad():
        ref = model(x)
        hooks = install_moe_hooks(model, SingleProcessBackend(8))
        runner = CoopDBORunner(model, trace=True)
        out = runner(x)
    assert list(hooks.blocks) == ["blocks.0", "blocks.1"]  # the experts' parents
    assert all("forward" in b.experts.__dict__ for b in model.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert [e.site for e in runner.last_trace if e.ubatch == 1] == [
        f"blocks.{i}.{site}" for i in range(2) for site in YIELD_SITES["switch"]]
    assert remove_moe_hooks(model) == 2
    assert all("forward" not in b.experts.__dict__ for b in model.blocks)


def test_unrecognised_block_names_class_reason_and_adapter() -> None:
    model = ToyModel(StackedMoEBlock)
    with pytest.raises(UnsupportedModelError, match=re.escape(
            "install_moe_hooks: ToyModel has MoE blocks that coop_dbo does not recognise: "
            "StackedMoEBlock at 'blocks.0', StackedMoEBlock at 'blocks.1' "
            "(StackedExperts.w_in [8, 64, 64] holds per-expert weights). Add an adapter for "
            "each block class: coop_dbo.hf.register_moe_adapter(StackedMoEBlock, adapter), "
            "where adapter is a coop_dbo.hf.MoEAdapter. Recognised: transformers' unified "
            "experts modules, Llama4TextMoe, DbrxFFN, AriaTextMoELayer, JetMoeMoE, "
            "JetMoeMoA, LongcatFlashMoE.")):
        install_moe_hooks(model)
    assert all("forward" not in b.__dict__ for b in model.blocks)  # untouched
    with pytest.raises(UnsupportedModelError, match=re.escape(
            "install_moe_hooks: found no MoE block in Sequential. Recognised: transformers' "
            "unified experts modules, Llama4TextMoe")):
        install_moe_hooks(nn.Sequential(nn.Linear(4, 4)))
    # what a user's adapter for the block needs, and that it is then used
    register_moe_adapter(StackedMoEBlock, StackedAdapter())
    try:
        x = toy_input()
        with torch.no_grad():
            ref = model(x)
            hooks = install_moe_hooks(model)
            runner = CoopDBORunner(model, trace=True)
            out = runner(x)
    finally:
        unregister_moe_adapter(StackedMoEBlock)
    assert list(hooks.blocks) == ["blocks.0", "blocks.1"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert len(runner.last_trace) == 2 * 2 * 4
    assert remove_moe_hooks(model) == 2


@pytest.mark.parametrize("model_type, cls", [("recurrent_gemma", "RecurrentGemmaForCausalLM"),
                                              ("xlnet", "XLNetLMHeadModel")])
def test_per_head_weights_are_not_moe_blocks(model_type: str, cls: str) -> None:
    """3-D per-head weights (block-diagonal gates, attention projections) have no router
    to as many outputs: no MoE block, nothing hooked."""
    from hf_families import tiny_config

    with torch.device("meta"):
        model = getattr(transformers, cls)(tiny_config(model_type))
    assert any(p.dim() == 3 for p in model.parameters())
    with pytest.raises(UnsupportedModelError, match=re.escape(
            f"install_moe_hooks: found no MoE block in {cls}. Recognised: transformers' "
            "unified experts modules, Llama4TextMoe")):
        install_moe_hooks(model)


def test_registered_adapter_is_checked_against_the_block_at_install() -> None:
    """FusedExpertsAdapter registered for Llama 4's block: its experts take only
    ``hidden_states``, which install says (before, this failed inside generate)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    model = build(family("llama4_text"))
    register_moe_adapter(Llama4TextMoe, FusedExpertsAdapter())
    try:
        with pytest.raises(UnsupportedModelError, match=re.escape(
                "install_moe_hooks: the FusedExpertsAdapter for Llama4TextMoe does not fit "
                "the block at 'model.layers.0.feed_forward': Llama4TextExperts.forward takes "
                "(hidden_states), but the hook calls it with (hidden_states, top_k_index, "
                "top_k_weights); FusedExpertsAdapter fits only transformers' unified experts "
                "interface: write a MoEAdapter for Llama4TextMoe.")):
            install_moe_hooks(model)
    finally:
        unregister_moe_adapter(Llama4TextMoe)
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing hooked
    hooks = install_moe_hooks(model)  # the built-in Llama 4 adapter
    assert list(hooks.blocks) == ["model.layers.0.feed_forward", "model.layers.1.feed_forward"]


def test_cohere2_norm_is_not_an_moe_block_and_jetmoe_attention_experts_stay_local() -> None:
    hooks = install_moe_hooks(build(family("cohere2_moe")))
    assert list(hooks.blocks) == [f"model.layers.{i}.mlp" for i in range(4)]
    assert all(type(a) is FusedExpertsAdapter and a.experts_attr == "experts"
               for a in hooks.adapters.values())
    hooks = install_moe_hooks(build(family("jetmoe")))
    assert list(hooks.blocks) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [type(a).__name__ for a in hooks.adapters.values()] == ["JetMoeAdapter"] * 2
    assert list(hooks.local) == ["model.layers.0.self_attention.experts",
                                 "model.layers.1.self_attention.experts"]


def test_llama4_top1_runs_the_shared_expert_beside_the_dispatch() -> None:
    """Llama 4 routes one expert per token: the shared expert then runs in the experts'
    stretch (``moe_exchange(shared_experts=)``); tokens equal the plain model's."""
    from hf_families import OVERRIDES
    top1 = dict(OVERRIDES["llama4_text"], num_experts_per_tok=1)
    fam = family("llama4_text")
    OVERRIDES["llama4_text"], saved = top1, OVERRIDES["llama4_text"]
    try:
        model = build(fam)
    finally:
        OVERRIDES["llama4_text"] = saved
    ids, mask = prompts(6)
    ref = greedy(model, ids, mask)
    calls = []
    shared = model.model.layers[0].feed_forward.shared_expert
    shared.register_forward_pre_hook(lambda *_: calls.append(dbo_current_ubatch_id()))
    install_moe_hooks(model)
    steps = []
    wrap_forward(model, on_step=steps.append)
    out = greedy(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(s.path == "eager-dbo" for s in steps)
    assert calls == [0, 1] * NEW_TOKENS  # inside the microbatches, once each per step


def test_adapter_errors() -> None:
    model = make_model("mixtral")
    with pytest.raises(ValueError, match=re.escape(
            "the backend routes 4 experts but block 'model.layers.0.mlp' has 8: make the "
            "backend with num_experts=8.")):
        install_moe_hooks(model, SingleProcessBackend(4))
    assert "_coop_dbo_moe_hooks" not in model.__dict__

    class NotFused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match=re.escape(
            "NotFused.experts does not fit FusedExpertsAdapter: ModuleList lacks the "
            "experts-interface attributes ['has_gate', 'has_bias', 'is_transposed', "
            "'is_concatenated', 'num_experts'] (@use_experts_implementation sets them). Write "
            "a MoEAdapter for NotFused and register it with register_moe_adapter.")):
        FusedExpertsAdapter().num_experts(NotFused())
    with pytest.raises(TypeError, match="adapter must be a coop_dbo.hf.MoEAdapter"):
        register_moe_adapter(NotFused, object())  # type: ignore[arg-type]
    assert issubclass(FusedExpertsAdapter, MoEAdapter)


# -- expert parallelism over gloo (2 processes) ----------------------------------------------

def ep_generate_worker(rank: int, world: int, rendezvous: str, family: str,
                       out_dir: str) -> None:
    """Attention data-parallel, experts sharded: each rank generates for its own prompts."""
    import torch.distributed as dist

    from coop_dbo.backends import TorchDistributedBackend

    init_gloo(rank, world, rendezvous)
    try:
        model = make_model(family)  # same seed: same weights on every rank
        ids, mask = prompts(8 - 2 * rank, seed=5 + rank)  # 8 and 6 prompts
        hooks = install_moe_hooks(model, TorchDistributedBackend(8), record=True)
        steps = []
        wrap_forward(model, process_group=dist.group.WORLD, trace=True, on_step=steps.append)
        out = greedy(model, ids, mask)
        torch.save({"ids": ids, "mask": mask, "sequences": out.sequences,
                    "paths": [s.path for s in steps],
                    "sites": [[e.site for e in s.trace if e.ubatch == 1] for s in steps],
                    "calls": len(hooks.calls)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        end_group(out_dir, rank, world)


def test_expert_parallel_generate_gloo(tmp_path) -> None:
    family = "qwen3_moe"
    spawn(ep_generate_worker, (rendezvous_files(tmp_path, 1)[0], family, str(tmp_path)), 2)
    single = make_model(family)  # all experts, one process, no hooks
    n_moe = len(MOE_BLOCKS[family])
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        ref = greedy(single, r["ids"], r["mask"])
        assert torch.equal(r["sequences"], ref.sequences)
        assert r["paths"] == ["eager-dbo"] * NEW_TOKENS
        expected = [f"{path}.{site}" for path in MOE_BLOCKS[family]
                    for site in YIELD_SITES["switch"]]
        assert all(s == expected for s in r["sites"])
        assert r["calls"] == NEW_TOKENS * n_moe * 2


# -- GPU (the lead runs these on the H100 hosts) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_bf16_gpu(family: str) -> None:
    """bf16 on one GPU: tokens identical, or the first divergence is a bf16 near-tie."""
    model = make_model(family).to("cuda", torch.bfloat16)
    ids, mask = prompts(8, device="cuda")
    ref = greedy(model, ids, mask)
    install_moe_hooks(model, SingleProcessBackend(8, dispatch_us=20, combine_us=20))
    steps = []
    wrap_forward(model, trace=True, on_step=steps.append, decide="always")
    out = greedy(model, ids, mask)
    assert all(s.path == "eager-dbo" for s in steps)
    assert all({e.stream for e in s.trace} == {"compute", "comm"} for s in steps)
    same = out.sequences == ref.sequences
    if not bool(same.all()):
        # first divergent step: the plain run's top-2 logits there must be a bf16 near-tie
        step = int((~same).any(0).nonzero()[0]) - ids.shape[1]
        logits = ref.logits[step].float()
        top2 = logits.topk(2, dim=-1).values
        row = int((~same[:, ids.shape[1] + step]).nonzero()[0])
        gap = float(top2[row, 0] - top2[row, 1])
        assert gap <= 0.05 * float(logits[row].abs().max()), (
            f"{family}: first divergence at new token {step}, row {row}, top-2 gap {gap}")
        torch.testing.assert_close(out.logits[step].float(), logits, rtol=0.05, atol=0.05)
    else:
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runner_cuda_graph_path_gpu() -> None:
    """Reference decoder on CUDA: captured sizes replay (padded), larger ones run eager DBO."""
    from helpers import decode_inputs

    from coop_dbo.models import MoEConfig, MoEDecoder

    cfg = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=2)
    model = MoEDecoder(cfg, SingleProcessBackend(8, num_max_tokens_per_rank=16),
                       device="cuda")
    eager = CoopDBORunner(model, decide="always")
    runner = CoopDBORunner(model, cuda_graph_sizes=[8, 16], decide="always")
    for batch, path in [(6, "graph:8"), (8, "graph:8"), (13, "graph:16"), (20, "eager-dbo")]:
        inputs = decode_inputs(cfg, batch, seed=batch, device="cuda")
        out = runner(*inputs)
        assert runner.last_path == path
        assert out.shape == (batch, cfg.vocab_size)
        torch.testing.assert_close(out, eager(*inputs), rtol=1e-4, atol=1e-4)
    # a call with a keyword argument replays as a whole-call graph, padded to the next
    # captured size, and runs eagerly above them
    tokens, positions, slots = decode_inputs(cfg, 8, device="cuda")
    out = runner(tokens, positions, slots=slots)
    assert runner.last_path == "graph:8"
    torch.testing.assert_close(out, eager(tokens, positions, slots), rtol=1e-4, atol=1e-4)
    tokens, positions, slots = decode_inputs(cfg, 6, seed=6, device="cuda")
    out = runner(tokens, positions, slots=slots)
    assert runner.last_path == "graph:8" and out.shape == (6, cfg.vocab_size)
    torch.testing.assert_close(out, eager(tokens, positions, slots), rtol=1e-4, atol=1e-4)
    tokens, positions, slots = decode_inputs(cfg, 20, seed=20, device="cuda")
    runner(tokens, positions, slots=slots)
    assert runner.last_path == "eager-dbo"


def ep_generate_worker_nccl(rank: int, world: int, port: int, family: str, out_dir: str,
                            graphs: bool = False) -> None:
    """One rank of expert-parallel ``generate`` over NCCL; ``graphs``: decode steps replay
    CUDA graphs (static cache, static all-to-all buffers with room for a prefill)."""
    import datetime

    import torch.distributed as dist

    from coop_dbo.backends import TorchDistributedBackend

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120),
                            device_id=torch.device("cuda", rank))
    try:
        dev = f"cuda:{rank}"
        model = make_model(family).to(dev, torch.bfloat16)
        ids, mask = prompts(8 - 2 * rank, seed=5 + rank, device=dev)
        install_moe_hooks(model, TorchDistributedBackend(
            8, num_max_tokens_per_rank=64 if graphs else None))
        steps = []
        runner = wrap_forward(model, process_group=dist.group.WORLD, on_step=steps.append,
                              decide="always", cuda_graph_sizes=[6, 8] if graphs else None)
        out = greedy(model, ids, mask, **ep_generate_kwargs(graphs))
        saved = {"ids": ids.cpu(), "mask": mask.cpu(), "sequences": out.sequences.cpu(),
                 "logits": [t.float().cpu() for t in out.logits],
                 "paths": [s.path for s in steps]}
        if graphs:
            # Again over one cache, rank 1's graphs dropped: its first decode step must
            # capture while rank 0 holds that step's graph, so rank 0 captures it again
            # (replaying instead would pair the warm-up's all-to-alls with the wrong step).
            cache = StaticCache(model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)
            first = greedy(model, ids, mask, past_key_values=cache)
            if rank == 1:
                runner.release_graphs()
            cache.reset()
            steps.clear()
            again = greedy(model, ids, mask, past_key_values=cache)
            saved.update(first_sequences=first.sequences.cpu(),
                         first_logits=[t.float().cpu() for t in first.logits],
                         again_sequences=again.sequences.cpu(),
                         again_paths=[s.path for s in steps])
        runner.unwrap()  # releases the graphs: destroy_process_group waits while they live
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ep_generate_kwargs(graphs: bool) -> dict:
    return {"cache_implementation": "static"} if graphs else {}


def check_ep_generate(tmp_path, family: str, graphs: bool) -> None:
    """Run ``ep_generate_worker_nccl`` on 2 GPUs; each rank's tokens must equal one GPU
    running every expert (bf16: a divergence may start only at a near-tie)."""
    spawn(ep_generate_worker_nccl, (free_port(), family, str(tmp_path), graphs), 2,
          timeout_s=500)
    single = make_model(family).to("cuda:0", torch.bfloat16)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        batch = r["ids"].shape[0]
        want = (["eager-dbo"] + [f"graph:{batch}"] * (NEW_TOKENS - 1) if graphs
                else ["eager-dbo"] * NEW_TOKENS)
        assert r["paths"] == want
        ref = greedy(single, r["ids"].cuda(0), r["mask"].cuda(0), **ep_generate_kwargs(graphs))
        same_tokens(r["sequences"], r["logits"], ref.sequences.cpu(),
                    [t.float().cpu() for t in ref.logits], r["ids"].shape[1])
        if graphs:
            assert r["again_paths"] == want
            same_tokens(r["again_sequences"], None, r["first_sequences"], r["first_logits"],
                        r["ids"].shape[1])


def same_tokens(sequences, logits, ref_sequences, ref_logits, prompt_len: int) -> None:
    """Tokens equal, or (bf16) the first divergent step's logits close to the reference's
    (``logits`` ``None``: the reference's top two are a near-tie there)."""
    same = sequences == ref_sequences
    if bool(same.all()):
        return
    step = int((~same).any(0).nonzero()[0]) - prompt_len
    if logits is not None:
        torch.testing.assert_close(logits[step], ref_logits[step], rtol=0.05, atol=0.05)
    else:
        top2 = ref_logits[step].topk(2, dim=-1).values
        assert float((top2[..., 0] - top2[..., 1]).min()) < 0.05, "not a near-tie"


@pytest.mark.multigpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 or more CUDA GPUs")
@pytest.mark.timeout(600)
def test_expert_parallel_generate_nccl_bf16(tmp_path) -> None:
    """2 GPUs, NCCL all-to-all: each rank's tokens equal one GPU running all experts."""
    check_ep_generate(tmp_path, "qwen3_moe", graphs=False)
