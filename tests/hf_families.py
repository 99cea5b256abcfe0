"""Every MoE family of the installed ``transformers``, as a tiny random model, with and
without DBO.

A **family** is a ``model_type`` of transformers' causal-LM auto mapping whose config (or a
sub-config) declares experts: a field whose name contains ``expert``. Model types that
map to the same class count once. Nothing here lists the families by hand: a new
transformers release brings its new families into the sweep by itself.

``tiny_config(model_type)`` shrinks the family's default config generically (hidden 64,
2 layers, 8 experts, 2 per token, ...: ``TINY``); ``OVERRIDES`` adds what a family needs
beyond that (a layer pattern that keeps a linear-attention and an attention layer in 2-4
layers, a knob that switches the MoE block on, sizes whose defaults ignore the hidden
size). ``run_family`` generates greedily from left-padded prompts, once plainly and once
with ``install_moe_hooks`` and ``wrap_forward`` (every forward through
``CoopDBORunner``), and reports what happened as a ``FamilyResult``.

``python3 -m tests.hf_families --markdown`` runs every family and prints the table of the
README; ``--family mixtral`` runs one and prints its result.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from coop_dbo import SplitError, UnsupportedModelError, install_moe_hooks, remove_moe_hooks
from coop_dbo.moe_hooks import YIELD_SITES
from coop_dbo.runner import StepInfo, wrap_forward

VOCAB = 128
BATCH = 6
NEW_TOKENS = 10

#: Generic tiny sizes, applied to every config field of that name the family has.
TINY: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "d_model": 64,
    "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "kv_channels": 16, "intermediate_size": 64, "ffn_hidden_size": 64,
    "intermediate_size_mlp": 64, "dense_intermediate_size": 64,
    "shared_intermediate_size": 32, "moe_intermediate_size": 32,
    "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2,
    "top_k_experts": 2, "moe_top_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "qk_head_dim": 24, "v_head_dim": 16, "n_group": 2, "num_expert_group": 2,
    "topk_group": 1, "first_k_dense_replace": 0, "num_dense_layers": 0,
    "max_position_embeddings": 256, "sliding_window": 8, "attention_chunk_size": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
#: Fields set even where the family's default is ``None`` (``None`` there means unset,
#: not "off"): the expert counts.
SET_WHEN_NONE = {"num_experts", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                 "moe_intermediate_size", "head_dim", "top_k_experts"}

_MAMBA = {"use_mamba_kernels": False}
#: What a family needs beyond ``TINY``, by model type: layer patterns that keep a
#: recurrent and an attention layer, switches that turn the MoE block on, and sizes that
#: ``TINY``'s names do not reach.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}},
    "doge": {"is_moe": True, "num_experts": 16, "keep_window_size": 8},
    "gemma4_text": {"enable_moe_block": True, "vocab_size_per_layer_input": VOCAB,
                    "hidden_size_per_layer_input": 8, "global_head_dim": 16},
    "gemma4": {"text_config": {"enable_moe_block": True, "vocab_size_per_layer_input": VOCAB,
                               "hidden_size_per_layer_input": 8, "global_head_dim": 16}},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"],
                         "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
                         "mamba_chunk_size": 16, **_MAMBA},
    "hunyuan_v1_moe": {"num_local_experts": 8},
    "inkling_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                     "swa_head_dim": 16, "sliding_window_size": 8},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1,
              "expert_layer_offset": 0, "mamba_dt_rank": 8, "mamba_d_state": 8, **_MAMBA},
    "kimi_linear": {"linear_head_dim": 16, "linear_num_heads": 4},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "llama4_text": {"moe_layers": [0, 1]},
    "longcat_flash": {"num_hidden_layers": 4, "zero_expert_num": 2},
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16,
                   "n_groups": 2, "chunk_size": 16, **_MAMBA},
    "qwen3_next": {"linear_key_head_dim": 8, "linear_value_head_dim": 8,
                   "linear_num_key_heads": 2, "linear_num_value_heads": 4},
    "qwen3_5_moe_text": {"linear_key_head_dim": 8, "linear_value_head_dim": 8,
                         "linear_num_key_heads": 2, "linear_num_value_heads": 4},
    "qwen4_exp_text": {"linear_key_head_dim": 8, "linear_value_head_dim": 8,
                       "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                       "num_hidden_layers": 2,
                       "layer_types": ["linear_attention", "qwen_sparse_attention"],
                       "hc_lowrank": 8, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                       "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},
}


@dataclasses.dataclass(frozen=True)
class Family:
    """One MoE family: its ``model_type`` and causal-LM class name."""

    model_type: str
    class_name: str


def _declares_experts(cfg: dict[str, Any]) -> bool:
    for key, value in cfg.items():
        if isinstance(value, dict) and _declares_experts(value):
            return True
        if "expert" in str(key):
            return True
    return False


@functools.cache
def moe_families() -> tuple[Family, ...]:
    """Every family of the installed transformers, in mapping order (see the module doc)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers = importlib.import_module("transformers")
    by_class: dict[str, list[str]] = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if model_type not in CONFIG_MAPPING:
            continue
        try:
            defaults = CONFIG_MAPPING[model_type]().to_dict()
        except Exception:  # a config that cannot be made from its defaults (musicgen)
            continue
        if _declares_experts(defaults):
            by_class.setdefault(class_name, []).append(model_type)
    out: list[Family] = []
    for class_name, types in by_class.items():
        # a class several model types map to: the one its own config class names
        own = types[0] if len(types) == 1 else getattr(
            getattr(transformers, class_name).config_class, "model_type", None)
        out.append(Family(own if own in types else types[0], class_name))
    return tuple(out)


def family(model_type: str) -> Family:
    """The enumerated family of ``model_type``."""
    found = [f for f in moe_families() if f.model_type == model_type]
    if not found:
        raise KeyError(f"{model_type!r} is not an MoE family of this transformers.")
    return found[0]


def _cover(values: list[Any], n: int) -> list[int]:
    """At least ``n`` indices into ``values``, in order: the first place of every
    distinct value, then the earliest others."""
    firsts: list[int] = []
    seen: list[Any] = []
    for i, v in enumerate(values):
        if v not in seen:
            seen.append(v)
            firsts.append(i)
    rest = [i for i in range(len(values)) if i not in firsts]
    return sorted(firsts + rest[:max(0, n - len(firsts))])


def _shrink(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a tiny config from the defaults ``to_dict()`` gave."""
    kw: dict[str, Any] = {}
    for key, value in TINY.items():
        if key in defaults and (defaults[key] is not None or key in SET_WHEN_NONE):
            kw[key] = value
    if "kv_lora_rank" in defaults:  # MLA: a key and value per query head, rope on head_dim
        kw["num_key_value_heads"] = TINY["num_attention_heads"]
        if "head_dim" in defaults:
            kw["head_dim"] = TINY["qk_rope_head_dim"]
    layers_key = next((k for k in ("num_hidden_layers", "num_layers", "n_layers")
                       if isinstance(defaults.get(k), int)), None)
    if layers_key is not None:
        old = defaults[layers_key]
        # per-layer patterns (layer types, flags): a few distinct values, one per layer
        lists = {k: v for k, v in defaults.items()
                 if isinstance(v, list) and len(v) == old and len(set(map(str, v))) <= 4}
        picked: list[int] = list(range(kw.get(layers_key, old)))
        for v in lists.values():
            picked = sorted(set(picked) | set(_cover(v, len(picked))))
        if lists:
            kw[layers_key] = len(picked)
            for k, v in lists.items():
                kw[k] = [v[i] for i in picked]
    subconfigs = {k for k, v in defaults.items() if isinstance(v, dict) and "model_type" in v}
    for key in subconfigs:
        kw[key] = _shrink(defaults[key], overrides.get(key, {}))
    kw.update({k: v for k, v in overrides.items() if k not in subconfigs})
    return kw


def tiny_config(model_type: str) -> Any:
    """The family's config, shrunk (``TINY``, then ``OVERRIDES[model_type]``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls(**_shrink(cls().to_dict(), OVERRIDES.get(model_type, {})))


def build(family: Family, seed: int = 0) -> nn.Module:
    """The family's tiny model with random weights from ``seed``, fp32, eval mode."""
    transformers = importlib.import_module("transformers")
    cfg = tiny_config(family.model_type)
    torch.manual_seed(seed)
    return getattr(transformers, family.class_name)(cfg).eval()


def prompts(batch: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 2 to 9 tokens and their attention mask, ``[batch, 9]`` int64."""
    g = torch.Generator().manual_seed(seed)
    lens = [2 + (i * 5 + seed) % 8 for i in range(batch)]
    width = max(lens)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """``generate`` of ``NEW_TOKENS`` greedy tokens, with the logits and the cache."""
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False,
                          return_dict_in_generate=True, output_logits=True)


#: Tolerance on the logits (fp32): the exchange sums the experts in another order.
LOGIT_ATOL = 1e-4


@dataclasses.dataclass
class FamilyResult:
    """What ``run_family`` found.

    Attributes:
        family: the family.
        status: ``"identical"`` (DBO ran every step, tokens identical, logits and cache
            within ``LOGIT_ATOL``), ``"refused"`` (``install_moe_hooks`` or the runner raised
            a coop_dbo error: ``detail``), ``"upstream"`` (the model fails without coop_dbo:
            ``detail``), ``"different"`` (DBO changed a result: ``detail``) or ``"error"``
            (anything else raised: ``detail``).
        detail: the error message or what differed.
        blocks: MoE blocks hooked; ``local``: blocks recognised but left local.
        hooked_by: how the blocks were hooked (the unified experts interface, or the
            adapter class).
        cache: the cache layer classes of the plain run's cache (after its class where
            that is not ``DynamicCache``).
        max_logit_diff: largest logit difference DBO vs plain.
        seconds: time of the whole run.
    """

    family: Family
    status: str
    detail: str = ""
    blocks: int = 0
    local: int = 0
    hooked_by: list[str] = dataclasses.field(default_factory=list)
    cache: list[str] = dataclasses.field(default_factory=list)
    max_logit_diff: float = 0.0
    seconds: float = 0.0


def state_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a cache's state with its path (attributes, dicts, lists)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from state_tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from state_tensors(v, f"{path}[{i}]")
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers"):
        for k, v in vars(obj).items():
            yield from state_tensors(v, f"{path}.{k}")


def _compare(out: Any, ref: Any) -> tuple[str, float]:
    """(what differs or ``""``, largest logit difference)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits))
    if not torch.equal(out.sequences, ref.sequences):
        rows = (out.sequences != ref.sequences).any(1).nonzero().flatten().tolist()
        return f"tokens differ in rows {rows} (logits by up to {diff:.2g})", diff
    if diff > LOGIT_ATOL:
        return f"logits differ by {diff:.2g}", diff
    got = dict(state_tensors(out.past_key_values))
    want = dict(state_tensors(ref.past_key_values))
    if got.keys() != want.keys():
        return f"the caches hold different state: {sorted(got.keys() ^ want.keys())}", diff
    for k, t in want.items():
        if t.shape != got[k].shape or not torch.allclose(got[k], t, atol=LOGIT_ATOL,
                                                           rtol=1e-4):
            return f"cache state {k} differs", diff
    return "", diff


def _check_steps(steps: list[StepInfo], calls: list[tuple[str, int | None]],
                 blocks: list[str]) -> str:
    """What is wrong with the runner's steps (``""``: every step ran DBO, both
    microbatches yielding at every hooked block, in order)."""
    if len(steps) != NEW_TOKENS:
        return f"{len(steps)} runner steps for {NEW_TOKENS} tokens"
    bad = [s.path for s in steps if s.path != "eager-dbo"]
    if bad:
        return f"steps ran {bad[0]} ({steps[[s.path for s in steps].index(bad[0])].reason})"
    sites = [f"{b}.{site}" for b in blocks for site in YIELD_SITES["switch"]]
    for i, s in enumerate(steps):
        per_ub: dict[int, list[str]] = {0: [], 1: []}
        for e in s.trace:
            per_ub[e.ubatch].append(e.site)
        if not per_ub[0] == per_ub[1] == sites:
            return f"step {i} yielded at {per_ub}, not {sites}"
    expected = [(b, ub) for _ in range(NEW_TOKENS) for b in blocks for ub in (0, 1)]
    if calls != expected:
        return "the hooked blocks were not called once per microbatch and step, in order"
    return ""


def run_family(family: Family) -> FamilyResult:
    """Greedy tokens of the family's tiny model, plainly and through DBO (module doc)."""
    t0 = time.perf_counter()
    result = FamilyResult(family, "error")
    try:
        model = build(family)
        ids, mask = prompts()
        ref = greedy(model, ids, mask)
    except Exception as e:
        result.status, result.detail = "upstream", f"{type(e).__name__}: {e}"
        result.seconds = time.perf_counter() - t0
        return result
    try:
        hooks = install_moe_hooks(model, record=True)
    except UnsupportedModelError as e:
        result.status, result.detail = "refused", str(e)
        result.seconds = time.perf_counter() - t0
        return result
    result.blocks, result.local = len(hooks.blocks), len(hooks.local)
    cache = ref.past_key_values
    result.cache = list(dict.fromkeys(type(layer).__name__.removesuffix("Layer")
                                      for layer in getattr(cache, "layers", [])))
    if type(cache).__name__ not in ("DynamicCache", "StaticCache"):
        result.cache.insert(0, f"{type(cache).__name__}:")
    adapters = [type(a).__name__ for a in hooks.adapters.values()]
    result.hooked_by = list(dict.fromkeys(
        "unified experts interface" if a == "FusedExpertsAdapter" else a for a in adapters))
    steps: list[StepInfo] = []
    runner = wrap_forward(model, trace=True, on_step=steps.append, decide="always")
    try:
        out = greedy(model, ids, mask)
    except (SplitError, UnsupportedModelError) as e:
        result.status, result.detail = "refused", str(e)
    except Exception as e:
        result.status, result.detail = "error", f"{type(e).__name__}: {e}"
    else:
        what, result.max_logit_diff = _compare(out, ref)
        what = what or _check_steps(steps, hooks.calls, list(hooks.blocks))
        if not what and dict(runner.path_counts) != {"eager-dbo": NEW_TOKENS}:
            what = f"the runner's path counts are {dict(runner.path_counts)}"
        result.status, result.detail = ("different", what) if what else ("identical", "")
    finally:
        runner.unwrap()
        remove_moe_hooks(model)
    result.seconds = time.perf_counter() - t0
    return result


def markdown(results: list[FamilyResult]) -> str:
    """The README's family table: one row per family, the reason where not supported."""
    import transformers

    rows = ["| family (`model_type`) | DBO, CPU fp32 | MoE blocks hooked, by | cache layers | "
            "why not |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        status = {"identical": "identical tokens", "upstream": "not supported",
                  "refused": "refused (clear error)"}.get(r.status, f"**{r.status}**")
        hooked = "" if not r.blocks else f"{r.blocks}: {', '.join(r.hooked_by)}"
        if r.local:
            hooked += f" (+{r.local} left local)"
        why = r.detail.replace("|", "\\|") if r.status != "identical" else ""
        if r.status == "upstream":
            why = f"fails without coop_dbo in transformers {transformers.__version__}: {why}"
        cache = ", ".join(r.cache).replace(":,", ":")
        rows.append(f"| {r.family.model_type} | {status} | {hooked} | {cache} | {why} |")
    ok = sum(r.status == "identical" for r in results)
    rows.append("")
    rows.append(f"{ok} of {len(results)} families identical under DBO (transformers "
                f"{transformers.__version__}, torch {torch.__version__}, batch {BATCH}, "
                f"{NEW_TOKENS} greedy tokens).")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Every MoE family of the installed transformers "
                                             "through DBO (see the module doc).")
    ap.add_argument("--family", nargs="*", help="model types to run (default: all)")
    ap.add_argument("--markdown", action="store_true", help="print the README's table")
    args = ap.parse_args()
    results = [run_family(f) for f in moe_families()
               if not args.family or f.model_type in args.family]
    if args.markdown:
        print(markdown(results))
    else:
        for r in results:
            print(f"{r.status:10s} {r.family.model_type:22s} blocks={r.blocks} "
                  f"local={r.local} diff={r.max_logit_diff:.1e} {r.seconds:5.2f}s "
                  f"{r.detail[:300]}")
