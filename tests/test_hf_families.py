"""Every MoE family of the installed transformers, through DBO (``hf_families``).

The families are enumerated from transformers' causal-LM mapping, not listed here. Each
runs greedy ``generate`` (batch 6, left padding, 10 tokens) plainly and with
``install_moe_hooks`` + ``wrap_forward``: the tokens must be identical, the logits and
the final cache equal within ``LOGIT_ATOL``, and every step must have run DBO with both
microbatches yielding at every hooked MoE block. A family that cannot run under DBO must
fail with a clear error, listed in ``NOT_IDENTICAL`` with its exact message, never with
different tokens. The README's family table comes from the same runs
(``python3 -m tests.hf_families --markdown``).
"""

from __future__ import annotations

import pytest
import torch
from hf_families import NEW_TOKENS, Family, build, family, greedy, moe_families, prompts, run_family

from coop_dbo import install_moe_hooks
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.runner import wrap_forward

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

pytest.importorskip("transformers")

FAMILIES = moe_families()

#: The families that do not give identical tokens under DBO: (status, exact message).
NOT_IDENTICAL: dict[str, tuple[str, str]] = {
    # DogeCDMoE returns (output, router_logits), which DogeDecoderLayer hands to dropout.
    "doge": ("upstream", "TypeError: dropout(): argument 'input' (position 1) must be "
                         "Tensor, not tuple"),
}


def test_the_families_are_enumerated_from_transformers() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [f.model_type for f in FAMILIES]
    assert len(set(types)) == len(types) == len({f.class_name for f in FAMILIES})
    assert all(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[f.model_type] == f.class_name
               for f in FAMILIES)
    # the three families the hooks knew before, and ones they were refused or wrong on
    for t in ("mixtral", "qwen3_moe", "deepseek_v3", "zaya", "minimax", "inkling_text",
              "jamba", "cohere2_moe", "llama4_text"):
        assert t in types
    assert "llama" not in types and "bamba" not in types  # no experts: not a family
    assert len(FAMILIES) >= 52


def test_at_least_47_families_are_identical_and_none_differs_silently() -> None:
    assert set(NOT_IDENTICAL) <= {f.model_type for f in FAMILIES}
    assert len(FAMILIES) - len(NOT_IDENTICAL) >= 47
    assert {status for status, _ in NOT_IDENTICAL.values()} <= {"refused", "upstream"}


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.model_type for f in FAMILIES])
def test_family_generates_the_same_tokens_under_dbo(fam: Family) -> None:
    result = run_family(fam)
    if fam.model_type in NOT_IDENTICAL:
        assert (result.status, result.detail) == NOT_IDENTICAL[fam.model_type]
    else:
        assert result.status == "identical", result.detail
        assert result.blocks >= 1


# -- GPU (the lead runs these on the GPU hosts) ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen2_moe"])
def test_family_generate_bf16_gpu(model_type: str) -> None:
    """A hybrid family (Qwen3-Next: gated linear attention beside attention, its recurrent
    and convolution states split per microbatch) and one with shared experts (Qwen2-MoE),
    on CUDA in bf16, DBO on two streams with simulated transfers: the tokens of the
    unhooked model, or a first departure at a bf16 near-tie of the unhooked logits."""
    model = build(family(model_type)).to("cuda", torch.bfloat16)
    ids, mask = (t.cuda() for t in prompts())
    ref = greedy(model, ids, mask)
    hooks = install_moe_hooks(model, SingleProcessBackend(8, dispatch_us=20, combine_us=20))
    steps = []
    wrap_forward(model, trace=True, on_step=steps.append, decide="always")
    out = greedy(model, ids, mask)
    assert [s.path for s in steps] == ["eager-dbo"] * NEW_TOKENS
    assert all(len(s.trace) == 2 * 4 * len(hooks.blocks) for s in steps)
    assert all({e.stream for e in s.trace} == {"compute", "comm"} for s in steps)
    same = out.sequences == ref.sequences
    if bool(same.all()):
        for a, b in zip(out.logits, ref.logits):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
        return
    step = int((~same).any(0).nonzero()[0]) - ids.shape[1]
    row = int((~same[:, ids.shape[1] + step]).nonzero()[0])
    logits = ref.logits[step].float()
    top2 = logits[row].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap <= 0.05 * float(logits[row].abs().max()), (
        f"{model_type}: first departure at new token {step}, row {row}, top-2 gap {gap}")
    torch.testing.assert_close(out.logits[step].float(), logits, rtol=0.05, atol=0.05)
