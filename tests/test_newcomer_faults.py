"""Faults found by trying the library as a new user would, one group per case.

Each group states what went wrong before the fix; every overlapped result is compared
with the same model run without DBO.
"""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import routed_tokens

from coop_dbo import (
    CoopDBORunner,
    SplitError,
    UBatchScheduler,
    dbo_current_ubatch_id,
    dbo_yield,
    install_moe_hooks,
    remove_moe_hooks,
)
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.moe_hooks import moe_exchange, swiglu_experts

# -- 2. what merges and splits per row is decided by a stated rule -----------------------
# Before: every output tensor was concatenated along dim 0 (a [5] output came back [10]), a
# list of per-row tensors was merged item by item (4 x [3] became 2 x [6]), and an argument
# whose dim 0 only happened to equal the batch (a [4, 4] weight at batch 4) was split.


def test_outputs_that_are_not_per_row_are_not_concatenated() -> None:
    bias = torch.arange(5.0)

    def model(x):
        dbo_yield("a")
        return x * 2, bias * 3, list(x.unbind(0)), {"rows": x.sum(1), "n": 7, "pair": (bias,)}

    for batch in (4, 5, 7):
        x = torch.randn(batch, 3)
        runner = CoopDBORunner(model)
        out = runner(x)
        assert runner.last_path == "eager-dbo"
        ref = model(x)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert len(out[2]) == batch and all(torch.equal(a, b) for a, b in zip(out[2], ref[2]))
        assert out[3]["n"] == 7 and torch.equal(out[3]["rows"], ref[3]["rows"])
        assert out[3]["pair"][0] is bias  # the same in every microbatch


def test_a_list_of_per_row_tensors_is_merged_item_by_item() -> None:
    def model(x):
        dbo_yield("a")
        return [x + 1, x * 2, x.sum(1)]  # three per-row tensors, whatever the batch

    for batch in (4, 6):  # 6: three items of three rows per microbatch
        x = torch.randn(batch, 3)
        out = CoopDBORunner(model)(x)
        assert len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out, model(x)))


def test_an_output_that_differs_per_microbatch_and_is_not_per_row_names_the_fix() -> None:
    def model(x):
        dbo_yield("a")
        return {"logits": x * 2, "stats": (x.mean(0), x.max())}

    with pytest.raises(SplitError) as e:
        CoopDBORunner(model)(torch.arange(12.0).reshape(4, 3))
    assert str(e.value) == (
        "cannot merge output['stats'][0]: in the microbatches (rows [2, 2]) it has shapes "
        "[(3,), (3,)], so it is not per row (dim 0 = the microbatch's rows), and it differs "
        "between microbatches, so it is not one value for the whole batch either (a loss, a "
        "statistic of the rows?): pass merge=<fn(outputs) -> output> to CoopDBORunner "
        "(outputs: one per microbatch, in order).")

    def uneven(x):
        dbo_yield("a")
        return [1] * (3 if dbo_current_ubatch_id() == 0 else 1)

    with pytest.raises(SplitError) as e:
        CoopDBORunner(uneven)(torch.ones(4, 3))
    assert str(e.value) == (
        "cannot merge the output: a list of [3, 1] items in the microbatches (rows [2, 2]), "
        "neither one item per row nor one length in every microbatch: pass merge=<fn("
        "outputs) -> output> to CoopDBORunner (outputs: one per microbatch, in order).")


def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    dbo_yield("a")
    return x @ w


def test_an_argument_whose_dim0_equals_the_batch_by_chance_is_stated_per_argument() -> None:
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    for rule, call in (({"w": False}, lambda r: r(x, w)), ({1: False}, lambda r: r(x, w)),
                       ({"w": False}, lambda r: r(x, w=w))):
        runner = CoopDBORunner(_project, per_row=rule)
        out = call(runner)
        assert runner.last_path == "eager-dbo" and runner.last_step.sizes == [2, 2]
        assert torch.equal(out, torch.cat([x[:2] @ w, x[2:] @ w]))
    # Model state is never per row: an nn.Parameter needs no rule.
    p = torch.nn.Parameter(w.clone())
    with torch.no_grad():
        assert torch.equal(CoopDBORunner(_project)(x, p), torch.cat([x[:2] @ p, x[2:] @ p]))


def test_the_per_argument_rule_is_checked() -> None:
    with pytest.raises(ValueError) as e:
        CoopDBORunner(_project, per_row={"weight": False})
    assert str(e.value) == ("CoopDBORunner: per_row names 'weight', but the model takes no "
                            "such argument; its signature is (x: 'torch.Tensor', w: "
                            "'torch.Tensor') -> 'torch.Tensor'.")
    with pytest.raises(TypeError) as e:
        CoopDBORunner(_project, per_row={"w": "no"})
    assert str(e.value) == ("CoopDBORunner: per_row['w'] must be True (per row) or False "
                            "(passed whole), got 'no'.")
    with pytest.raises(ValueError) as e:
        CoopDBORunner(_project, per_row={"w": False}, split=lambda a, k, s: [])
    assert str(e.value) == ("per_row applies to the default splitter, but split= replaces "
                            "it: state per-row arguments in your split function instead.")
    runner = CoopDBORunner(_project, per_row={"x": True, "w": True})
    with pytest.raises(SplitError) as e:
        runner(torch.ones(4, 4), torch.ones(3, 4))
    assert str(e.value) == (
        "CoopDBORunner(per_row=...) marks positional argument 1 as per row, but it holds a "
        "tensor of shape (3, 4), whose dim 0 is not the batch 4 (from positional argument "
        "0): give it the batch as dim 0, or mark it False (passed whole to every "
        "microbatch).")


# -- 4. an experts callable that returns the wrong shape ---------------------------------
# Before: an IndexError deep in index_copy_, or a [rows, 1] output silently broadcast to a
# [tokens, 1] result.


def _expert_weights(hidden: int = 8, inter: int = 8, experts: int = 8):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(experts, hidden, inter, generator=g),
            torch.randn(experts, hidden, inter, generator=g),
            torch.randn(experts, inter, hidden, generator=g))


@pytest.mark.parametrize("bad", ["wide", "one_column", "fewer_rows", "not_a_tensor"])
def test_experts_output_of_the_wrong_shape_is_a_clear_error(bad) -> None:
    backend = SingleProcessBackend(8)
    x, idx, w = routed_tokens(6, 8)
    good = swiglu_experts(*_expert_weights())

    def experts(batch):
        y = good(batch)
        return {"wide": torch.cat([y, y], 1), "one_column": y[:, :1],
                "fewer_rows": y[1:], "not_a_tensor": y.tolist()}[bad]

    rows = 6 * 2  # every (token, expert) pair, one rank
    got = {"wide": f"shape ({rows}, 16)", "one_column": f"shape ({rows}, 1)",
           "fewer_rows": f"shape ({rows - 1}, 8)", "not_a_tensor": "list"}[bad]
    message = (f"moe_exchange: the experts callable returned {got} for an ExpertBatch "
               f"whose x is ({rows}, 8) (flat layout): it must return one output row per "
               f"row of batch.x, as wide as the tokens' hidden size 8, i.e. a tensor of "
               f"shape ({rows}, 8).")
    with pytest.raises(ValueError) as plain:
        moe_exchange(backend, x, idx, w, experts)
    assert str(plain.value) == message
    sched = UBatchScheduler(2)
    with pytest.raises(ValueError) as dbo:
        sched.run([lambda: moe_exchange(backend, x[:3], idx[:3], w[:3], experts),
                   lambda: moe_exchange(backend, x[3:], idx[3:], w[3:], experts)])
    assert str(dbo.value) == message.replace(str(rows), "6").replace(str(rows - 1), "5")
    assert dbo.value.ubatch_id == 0  # type: ignore[attr-defined]
    # The right experts still give the plain result, overlapped.
    out = sched.run([lambda: moe_exchange(backend, x[:3], idx[:3], w[:3], good),
                     lambda: moe_exchange(backend, x[3:], idx[3:], w[3:], good)])
    assert torch.equal(torch.cat(out), torch.cat([moe_exchange(backend, x[:3], idx[:3],
                                                               w[:3], good),
                                                  moe_exchange(backend, x[3:], idx[3:],
                                                               w[3:], good)]))


# -- 5. tensors inside dicts, lists and namedtuples find the batch ------------------------
# Before: runner({"a": x}) said it found no tensor argument with a batch dimension.

Pair = collections.namedtuple("Pair", "x y")


def test_batch_tensors_nested_in_containers_are_split_and_merged() -> None:
    seen: list[tuple] = []

    def model(d, pair, items, scale=1.0):
        seen.append((dbo_current_ubatch_id(), tuple(d["a"].shape), tuple(pair.y.shape),
                     tuple(items[0].shape), items[1]))
        dbo_yield("mid")
        return {"out": d["a"] * scale + pair.x, "rows": items[0].sum(1), "kept": items[1]}

    x = torch.arange(20.0).reshape(5, 4)
    args = ({"a": x}, Pair(x + 1, torch.ones(5, 3)), [torch.ones(5, 2), "tag"])
    runner = CoopDBORunner(model)
    out = runner(*args, scale=2.0)
    assert runner.last_path == "eager-dbo"
    assert seen == [(0, (3, 4), (3, 3), (3, 2), "tag"), (1, (2, 4), (2, 3), (2, 2), "tag")]
    ref = model(*args, scale=2.0)
    assert out.keys() == ref.keys() and out["kept"] == "tag"
    assert torch.equal(out["out"], ref["out"]) and torch.equal(out["rows"], ref["rows"])
    assert CoopDBORunner(lambda d: d["a"] * 3)({"a": x}).shape == (5, 4)


# -- 6. constructors and hook installers check their arguments ---------------------------
# Before: SingleProcessBackend(0) / (-1) were accepted and failed later, ("4") failed with
# a string formatting error, CoopDBORunner(on_step=3) failed only after the model ran,
# enabled="no" counted as true, install_moe_hooks(m, backend=3) and remove_moe_hooks(None)
# raised AttributeError.


@pytest.mark.parametrize("value, exc, message", [
    (0, ValueError, "SingleProcessBackend: num_experts (routed experts over all ranks) "
                    "must be >= 1, got 0."),
    (-1, ValueError, "SingleProcessBackend: num_experts (routed experts over all ranks) "
                     "must be >= 1, got -1."),
    ("4", TypeError, "SingleProcessBackend: num_experts (routed experts over all ranks) "
                     "must be an int, got str '4'."),
    (True, TypeError, "SingleProcessBackend: num_experts (routed experts over all ranks) "
                      "must be an int, got bool True."),
])
def test_single_process_backend_checks_num_experts(value, exc, message) -> None:
    with pytest.raises(exc) as e:
        SingleProcessBackend(value)
    assert str(e.value) == message


def test_single_process_backend_checks_its_other_arguments() -> None:
    with pytest.raises(TypeError) as e:
        SingleProcessBackend(8, num_max_tokens_per_rank=2.5)  # type: ignore[arg-type]
    assert str(e.value) == ("SingleProcessBackend: num_max_tokens_per_rank (None: exact "
                            "mode) must be an int, got float 2.5.")
    with pytest.raises(ValueError) as e:
        SingleProcessBackend(8, dispatch_us="5")  # type: ignore[arg-type]
    assert str(e.value) == ("SingleProcessBackend: dispatch_us must be a number of "
                            "microseconds >= 0, got '5'.")


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"on_step": 3}, TypeError, "CoopDBORunner: on_step must be a function or None, got "
                                "int 3."),
    ({"graph_example_inputs": "x"}, TypeError, "CoopDBORunner: graph_example_inputs must "
                                               "be a function or None, got str 'x'."),
    ({"enabled": "no"}, TypeError, "CoopDBORunner: enabled must be True or False, got str "
                                   "'no'."),
    ({"trace": 1}, TypeError, "CoopDBORunner: trace must be True or False, got int 1."),
    ({"min_tokens": True}, ValueError, "min_tokens must be an int >= 0, got True."),
])
def test_runner_checks_its_arguments_at_construction(kwargs, exc, message) -> None:
    ran: list[int] = []
    with pytest.raises(exc) as e:
        CoopDBORunner(lambda x: ran.append(1) or x, **kwargs)
    assert str(e.value) == message and not ran


def test_runner_flags_set_later_are_checked_too() -> None:
    runner = CoopDBORunner(lambda x: x * 2)
    for name in ("enabled", "trace"):
        with pytest.raises(TypeError) as e:
            setattr(runner, name, "no")
        assert str(e.value) == f"CoopDBORunner: {name} must be True or False, got str 'no'."
    runner.enabled = False
    x = torch.ones(4, 2)
    assert torch.equal(runner(x), x * 2) and runner.last_path == "plain"
    assert runner.last_reason == "disabled"


def test_moe_hook_installers_check_their_arguments() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with pytest.raises(TypeError) as e:
        install_moe_hooks(model, backend=3)  # type: ignore[arg-type]
    assert str(e.value) == (
        "install_moe_hooks: backend must be a coop_dbo.backends.MoEBackend (e.g. "
        "SingleProcessBackend(num_experts)), or None for one single-process backend per "
        "expert count; got int 3.")
    with pytest.raises(TypeError) as e:
        remove_moe_hooks(None)  # type: ignore[arg-type]
    assert str(e.value) == ("remove_moe_hooks needs the nn.Module given to "
                            "install_moe_hooks, got NoneType.")
    assert remove_moe_hooks(model) == 0  # nothing was installed by the failed call
