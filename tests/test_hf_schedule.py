"""Shared experts of transformers blocks placed by a schedule (``install_moe_hooks(...,
schedule=)``): beside the dispatch where the policy says so and the block calls them after
the routed experts, with the block's results unchanged."""

from __future__ import annotations

import inspect

import pytest
import torch
from hf_families import build, family
from test_hf_models import greedy, make_model, prompts

from coop_dbo import install_moe_hooks, remove_moe_hooks
from coop_dbo.hf import shared_experts_of
from coop_dbo.runner import wrap_forward
from coop_dbo.schedule import SchedulePolicy

BESIDE = SchedulePolicy(shared_after_dispatch_min_tokens=0)  # every size: beside
BEFORE = SchedulePolicy(shared_after_dispatch_min_tokens=10**9)  # every size: the block's


def count_shared_runs(model) -> list[bool]:
    """Make every shared-experts module record, per run, whether it ran inside the
    exchange (beside the dispatch) or in the block's own code."""
    runs: list[bool] = []
    for block in model.modules():
        shared = shared_experts_of(block) if block is not model else None
        if shared is None or "forward" in shared.__dict__:
            continue
        own = shared.forward

        def forward(*args, own=own, **kwargs):
            runs.append(any(f.function == "moe_exchange" for f in inspect.stack()))
            return own(*args, **kwargs)

        shared.forward = forward
    return runs


def moe_blocks(model) -> int:
    return sum(1 for m in model.modules() if shared_experts_of(m) is not None and m is not model)


def run_with_schedule(model, schedule: SchedulePolicy):
    """``(tokens and logits hooked without a schedule, the same through DBO with
    ``schedule``, the shared experts' runs of the second)``."""
    ids, mask = prompts(6)
    install_moe_hooks(model)
    ref = greedy(model, ids, mask)
    remove_moe_hooks(model)
    runs = count_shared_runs(model)
    install_moe_hooks(model, schedule=schedule)
    runner = wrap_forward(model, decide="always")
    out = greedy(model, ids, mask)
    runner.unwrap()
    assert torch.equal(out.sequences, ref.sequences)
    return ref, out, runs


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_shared_experts_run_beside_the_dispatch_and_results_stay(model_type: str) -> None:
    model = (make_model("deepseek_v3") if model_type == "deepseek_v3"
             else build(family(model_type)))
    ref, out, runs = run_with_schedule(model, BESIDE)
    for a, b in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # once per block call and microbatch, always beside the dispatch, never twice
    calls = len(ref.logits) * moe_blocks(model) * 2
    assert runs == [True] * calls

    remove_moe_hooks(model)
    runs.clear()
    install_moe_hooks(model, schedule=BEFORE)
    out = greedy(model, *prompts(6))
    assert torch.equal(out.sequences, ref.sequences)
    assert runs == [False] * (len(ref.logits) * moe_blocks(model))  # where the block runs them


def test_a_block_that_runs_its_shared_expert_first_keeps_it_there() -> None:
    """Qwen2-MoE calls its shared expert before the routed experts: it already runs before
    the dispatch, and a schedule that says "beside" does not run it a second time."""
    model = build(family("qwen2_moe"))
    ref, _, runs = run_with_schedule(model, BESIDE)
    assert runs and not any(runs)
    assert len(runs) == len(ref.logits) * moe_blocks(model) * 2


def test_the_schedule_is_checked() -> None:
    model = make_model("deepseek_v3")
    with pytest.raises(TypeError, match=r"install_moe_hooks: schedule must be a coop_dbo\."
                                        r"schedule\.SchedulePolicy \(e\.g\. SchedulePlan\."
                                        r"load\(path\)\.policy\(\)\), got int 3\."):
        install_moe_hooks(model, schedule=3)
