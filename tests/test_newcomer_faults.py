"""Faults found by trying the library as a new user would, one group per case.

Each group states what went wrong before the fix; every overlapped result is compared
with the same model run without DBO.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import sys
import threading
import warnings
from typing import Any

import greenlet
import pytest
import torch
from helpers import decode_inputs, routed_tokens

from coop_dbo import (
    CoopDBORunner,
    SchedulerStateError,
    SplitError,
    UBatchScheduler,
    YieldAsymmetryError,
    dbo_current_ubatch_id,
    dbo_yield,
    dbo_yield_and_switch,
    install_moe_hooks,
    remove_moe_hooks,
)
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.moe_hooks import moe_exchange, swiglu_experts

# -- 1. torch's per-thread modes follow each microbatch ----------------------------------
# Before: torch.inference_mode() or torch.autocast(...) entered inside a microbatch and still
# active at a yield held in the other microbatch too and leaked out of run(); only grad
# mode was carried.

W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))


def _modes() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack())


def test_inference_mode_entered_in_a_microbatch_stays_there_and_never_leaks() -> None:
    """Both microbatches enter inference mode across a yield, exiting in the other order
    than they entered: before, the second exit restored the first one's inference mode
    in the caller."""
    seen: dict[int | None, list] = {0: [], 1: []}

    def mb(x: torch.Tensor, enter: bool) -> torch.Tensor:
        me = dbo_current_ubatch_id()
        if enter:
            with torch.inference_mode():
                y = x @ W
                dbo_yield("a")
                seen.setdefault(me, []).append((torch.is_inference_mode_enabled(),
                                                y.is_inference()))
                out = (y + 1) @ W
                dbo_yield("b")
                seen.setdefault(me, []).append((torch.is_inference_mode_enabled(),
                                                out.is_inference()))
                return out
        y = x @ W
        for site in ("a", "b"):
            dbo_yield(site)
            z = torch.ones(1)
            seen.setdefault(me, []).append((torch.is_inference_mode_enabled(),
                                            z.is_inference()))
        return (y + 1) @ W

    x = torch.randn(4, 8)
    sched = UBatchScheduler(2)
    for enter in ([True, True], [True, False], [False, True]):
        before = _modes()
        for v in seen.values():
            v.clear()
        outs = sched.run([lambda e=enter: mb(x[:2], e[0]), lambda e=enter: mb(x[2:], e[1])])
        assert _modes() == before and not torch.ones(1).is_inference()
        for i in (0, 1):
            assert seen[i] == [(enter[i], enter[i])] * 2
            assert torch.equal(outs[i], mb(x[2 * i:2 * i + 2], enter[i]))  # no scheduler


def test_autocast_entered_in_a_microbatch_stays_there_and_never_leaks() -> None:
    dtypes: dict[int, list] = {0: [], 1: []}

    def mb(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        me = dbo_current_ubatch_id()
        if dtype is None:
            h = x @ W
            dbo_yield("a")
            out = h @ W
            dtypes[me if me is not None else 0].append(out.dtype)
            return out
        with torch.autocast("cpu", dtype=dtype):
            h = x @ W
            dbo_yield("a")
            out = h @ W  # still under this microbatch's autocast
            dtypes[me if me is not None else 0].append(out.dtype)
            return out

    x = torch.randn(4, 8)
    sched = UBatchScheduler(2)
    for kinds in ([torch.bfloat16, None], [None, torch.bfloat16],
                  [torch.bfloat16, torch.float16]):
        for v in dtypes.values():
            v.clear()
        outs = sched.run([lambda k=kinds: mb(x[:2], k[0]), lambda k=kinds: mb(x[2:], k[1])])
        assert not torch.is_autocast_enabled("cpu") and (x @ W).dtype == torch.float32
        assert [dtypes[0][0], dtypes[1][0]] == [k or torch.float32 for k in kinds]
        for i in (0, 1):
            assert torch.equal(outs[i], mb(x[2 * i:2 * i + 2], kinds[i]))
    # A caller under autocast: every microbatch starts under it, and keeps it after.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = sched.run([lambda: mb(x[:2], None), lambda: mb(x[2:], torch.float16)])
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert [o.dtype for o in outs] == [torch.bfloat16, torch.float16]
    assert not torch.is_autocast_enabled("cpu")


def test_a_mode_left_entered_by_a_microbatch_does_not_reach_the_caller() -> None:
    """A microbatch that enters modes and never leaves them (no ``with``)."""
    def leaky() -> int:
        torch.autocast("cpu", dtype=torch.bfloat16).__enter__()
        torch.inference_mode().__enter__()
        torch.set_grad_enabled(False)
        torch.device("meta").__enter__()
        dbo_yield("a")
        return 0

    def plain() -> tuple:
        dbo_yield("a")
        return _modes(), torch.ones(1).device

    before = _modes()
    _, (other, device) = UBatchScheduler(2).run([leaky, plain])
    assert other == before and device == torch.device("cpu")
    assert _modes() == before and torch.ones(1).device == torch.device("cpu")


def test_function_and_dispatch_modes_follow_their_microbatch() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counter = CountOps()

    def counted(x):
        with counter:
            h = x @ W
            dbo_yield("a")
            return torch.relu(h @ W)

    def on_meta(x):
        with torch.device("meta"):
            dbo_yield("a")
            return torch.zeros(2).device, (x @ W) @ W

    def bystander(x):
        dbo_yield("a")
        h = (x @ W) @ W  # neither counted nor on meta
        return torch.zeros(2).device, h

    x = torch.randn(4, 8)
    outs = UBatchScheduler(3).run([lambda: counted(x[:2]), lambda: on_meta(x[2:3]),
                                   lambda: bystander(x[3:])])
    assert counter.ops == 3  # two matmuls and the relu of its own microbatch
    assert outs[1][0] == torch.device("meta")
    assert outs[2][0] == torch.device("cpu") and torch.equal(outs[2][1], (x[3:] @ W) @ W)
    assert torch.equal(outs[0], torch.relu((x[:2] @ W) @ W))
    assert torch._C._len_torch_function_stack() == 0
    assert torch._C._len_torch_dispatch_stack() == 0


def test_a_microbatch_unwound_inside_a_mode_cleans_up_in_that_mode() -> None:
    cleanup: list[bool] = []

    def inside():
        with torch.inference_mode():
            try:
                dbo_yield("a")
                dbo_yield("b")
            finally:
                cleanup.append(torch.is_inference_mode_enabled())

    def fails():
        dbo_yield("a")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        UBatchScheduler(2).run([inside, fails])
    assert cleanup == [True] and not torch.is_inference_mode_enabled()


def test_the_dbo_runner_under_inference_mode_or_no_grad_equals_the_plain_model() -> None:
    cfg = MoEConfig.tiny(num_layers=2)
    model = MoEDecoder(cfg)
    inputs = decode_inputs(cfg, 6)
    runner = CoopDBORunner(model)
    for ctx in (torch.inference_mode, torch.no_grad):
        with ctx():
            out = runner(*inputs)
            assert runner.last_path == "eager-dbo"
            ref = torch.cat([model(*(t[:3] for t in inputs)), model(*(t[3:] for t in inputs))])
        assert torch.equal(out, ref)
    assert _modes()[:3] == (True, False, False)


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


# -- 3. a greenlet started inside a microbatch cannot yield -----------------------------
# Before: a user greenlet that called dbo_yield inside a microbatch was abandoned
# mid-function and run() returned results with no error.


def test_a_yield_from_a_greenlet_the_microbatch_started_is_an_error() -> None:
    after: list[int] = []

    def mb():
        def inner():
            dbo_yield("x")
            after.append(1)  # never reached: the yield raises
            return "inner"

        g = greenlet.greenlet(inner)
        g.gr_context = contextvars.copy_context()  # sees the microbatch, as gevent would
        return g.switch()

    sched = UBatchScheduler(2)
    with pytest.raises(SchedulerStateError) as e:
        sched.run([mb, mb])
    assert str(e.value) == (
        "dbo_yield (site 'x') was called from a greenlet that microbatch 0 started (or that "
        "runs a copy of its context), not from the microbatch's own greenlet: the scheduler "
        "could not resume that greenlet, which would be abandoned mid-function. Call "
        "dbo_yield / dbo_yield_and_switch in the microbatch's own code, not inside "
        "greenlets it runs.")
    assert e.value.ubatch_id == 0 and after == []  # type: ignore[attr-defined]

    def swallowing():  # the model swallows the error: the step still fails
        try:
            return mb()
        except SchedulerStateError:
            dbo_yield("x")
            return "swallowed"

    with pytest.raises(SchedulerStateError):
        sched.run([swallowing, swallowing])
    assert sched.run([lambda: (dbo_yield("x"), 1)[1], lambda: (dbo_yield("x"), 2)[1]]) == [1, 2]


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


# -- 7. every microbatch gets the caller's recursion depth -------------------------------
# Before: each new microbatch greenlet started at the depth of the microbatch that yielded
# to it, so with 8 microbatches of moderate depth the last one raised RecursionError.


def _depth() -> int:
    f, n = sys._getframe(), 0
    while f is not None:
        n, f = n + 1, f.f_back
    return n


def test_eight_deep_microbatches_do_not_add_up_their_recursion_depth() -> None:
    budget = sys.getrecursionlimit() // 4  # 8 x this is twice the limit

    def deep(n: int) -> int:
        if n == 0:
            dbo_yield("bottom")
            return _depth()
        return deep(n - 1)

    sched = UBatchScheduler(8)
    depths = sched.run([lambda: deep(budget)] * 8)
    assert len(set(depths)) == 1  # every microbatch as deep as the others
    assert sched.run([lambda: deep(budget)] * 8) == depths  # and the same next step


# -- 8. a yield in another thread that runs a microbatch's context -----------------------
# Before: dbo_yield in a worker thread that runs a copied microbatch context
# (asyncio.to_thread) failed with greenlet's "Cannot switch to a different thread".


def test_a_yield_from_another_thread_is_a_clear_error() -> None:
    names: list[str] = []

    def helper() -> None:
        names.append(threading.current_thread().name)
        dbo_yield("x")

    def mb() -> None:
        async def main() -> None:
            await asyncio.to_thread(helper)
        asyncio.run(main())

    with pytest.raises(SchedulerStateError) as e:
        UBatchScheduler(2).run([mb, mb])
    assert str(e.value) == (
        f"dbo_yield (site 'x') was called in thread {names[0]!r}, but microbatch 0 runs in "
        "another thread: the microbatch's context was carried into this one "
        "(asyncio.to_thread, run_in_executor or a copied context run here). A yield can "
        "only hand over the thread the scheduler runs on: call dbo_yield / "
        "dbo_yield_and_switch in the microbatch itself, not in work it sends to other "
        "threads.")
    assert e.value.ubatch_id == 0  # type: ignore[attr-defined]


# -- 9. one scheduler, two threads; a microbatch that switches out of run() --------------
# Before: the running check was not atomic (865 of about 16k steps ran at once) and its
# refusal blamed a callback; a microbatch that switched past run()'s caller left the
# scheduler "already running" for good.


def test_a_scheduler_refuses_a_second_thread_while_running_and_serves_it_after() -> None:
    sched = UBatchScheduler(2)
    started, release = threading.Event(), threading.Event()
    out: list = []

    def slow(i: int) -> int:
        if i == 0:
            started.set()
            assert release.wait(30)
        dbo_yield("a")
        return i

    t = threading.Thread(target=lambda: out.append(sched.run([lambda: slow(0),
                                                              lambda: slow(1)])))
    t.start()
    assert started.wait(30)
    with pytest.raises(SchedulerStateError) as e:
        sched.run([lambda: 0, lambda: 1])
    assert str(e.value) == (
        f"This UBatchScheduler is running a step in another thread, and run() was called in "
        f"thread {threading.current_thread().name!r} meanwhile. A scheduler runs one step "
        "at a time, on one thread: make one scheduler per thread that runs steps.")
    release.set()
    t.join(30)
    assert out == [[0, 1]]
    assert sched.run([lambda: slow(1), lambda: slow(2)]) == [1, 2]  # this thread, after


def test_two_threads_hammering_one_scheduler_never_run_at_once() -> None:
    sched = UBatchScheduler(2)
    active, most, results, refused = [0], [0], [], [0]
    lock = threading.Lock()

    def mb(i: int) -> int:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        dbo_yield("a")
        with lock:
            active[0] -= 1
        return i

    def hammer() -> None:
        for _ in range(300):
            try:
                results.append(sched.run([lambda: mb(0), lambda: mb(1)]))
            except SchedulerStateError:
                refused[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] <= 2  # the two microbatches of one step, never two steps
    assert len(results) + refused[0] == 600 and all(r == [0, 1] for r in results)


def test_a_microbatch_that_switches_past_runs_caller_is_unwound_at_the_next_run() -> None:
    main = greenlet.getcurrent()
    cleaned: list[int] = []

    def escapes() -> int:
        try:
            dbo_yield("a")
            main.switch("escaped")  # past run()'s greenlet, straight to the test
            return 0
        finally:
            cleaned.append(0)

    def other() -> int:
        try:
            dbo_yield("a")
            return 1
        finally:
            cleaned.append(1)

    sched = UBatchScheduler(2)
    owner = greenlet.greenlet(lambda: sched.run([escapes, other]))
    assert owner.switch() == "escaped"
    with pytest.raises(SchedulerStateError) as e:
        sched.run([lambda: 0, lambda: 1])
    assert str(e.value) == (
        "This UBatchScheduler's previous step never finished: microbatch 0 switched to "
        "another greenlet (a greenlet switch other than dbo_yield, e.g. gevent I/O) and "
        "control never came back to the greenlet that called run(). That step is "
        "abandoned: its microbatches were unwound now (their finally blocks ran) and it "
        "returns nothing. Inside a microbatch hand the thread over only with dbo_yield / "
        "dbo_yield_and_switch. This call did not run a step; call run() again.")
    assert sorted(cleaned) == [0, 1]
    x = torch.randn(4, 3)
    out = sched.run([lambda: (dbo_yield("a"), x[:2] * 2)[1], lambda: (dbo_yield("a"),
                                                                      x[2:] * 2)[1]])
    assert torch.equal(torch.cat(out), x * 2)
    with pytest.raises(SchedulerStateError, match="This step was abandoned"):
        owner.switch()  # the owner, resumed, learns its step has no result


def test_a_microbatch_that_switches_to_runs_greenlet_is_an_error() -> None:
    def sneaky() -> int:
        greenlet.getcurrent().parent.switch()  # type: ignore[union-attr]
        return 0

    sched = UBatchScheduler(2)
    with pytest.raises(SchedulerStateError) as e:
        sched.run([sneaky, lambda: 1])
    assert str(e.value) == (
        "Microbatch 0 switched to the greenlet that called run() (a greenlet switch, not "
        "dbo_yield) before it finished, so the scheduler cannot resume it. Inside a "
        "microbatch hand the thread over only with dbo_yield / dbo_yield_and_switch.")
    assert sched.run([lambda: 0, lambda: 1]) == [0, 1]


# -- 10. async functions, unordered microbatches, reused exceptions, CPU stream kinds ----
# Before: async def microbatches returned coroutine objects; run(set(...)) was accepted in
# arbitrary order; notes piled up on a reused exception object; on CPU a switch to "comm"
# and one to "compute" at the same index counted as symmetric (on CUDA they did not).


def test_async_microbatches_are_refused() -> None:
    async def mb() -> int:
        return 1

    with pytest.raises(TypeError) as e:
        UBatchScheduler(2).run([mb, mb])
    assert str(e.value) == (
        "fns[0] is an async function ('test_async_microbatches_are_refused.<locals>.mb'): "
        "a microbatch cannot await (microbatches are greenlets on one thread, not asyncio "
        "tasks). Pass a plain function that runs the model; await asyncio code outside "
        "run().")

    class AsyncCall:  # not visibly async until called
        async def __call__(self) -> int:
            return 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine left unawaited would warn
        with pytest.raises(TypeError) as e:
            UBatchScheduler(2).run([AsyncCall(), AsyncCall()])
    assert str(e.value) == (
        "microbatch 0's function returned a coroutine (test_async_microbatches_are_refused."
        "<locals>.AsyncCall.__call__): it is an async function, and a microbatch cannot "
        "await (microbatches are greenlets on one thread, not asyncio tasks). Pass a plain "
        "function that runs the model; await asyncio code outside run().")


def test_unordered_microbatches_are_refused() -> None:
    for fns in ({lambda: 0, lambda: 1}, frozenset({lambda: 0, lambda: 1}),
                {"a": lambda: 0, "b": lambda: 1}):
        with pytest.raises(TypeError) as e:
            UBatchScheduler(2).run(fns)  # type: ignore[arg-type]
        assert str(e.value) == (
            f"run() takes the microbatches in order, a list or tuple of callables; got a "
            f"{type(fns).__name__}, whose order is not the microbatch order.")
    assert UBatchScheduler(2).run(iter([lambda: 0, lambda: 1])) == [0, 1]


def test_a_reused_exception_object_gets_one_note_per_step() -> None:
    err = ValueError("the same object every time")

    def fails():
        dbo_yield("a")
        raise err

    sched = UBatchScheduler(2)
    for _ in range(3):
        with pytest.raises(ValueError) as e:
            sched.run([lambda: (dbo_yield("a"), 0)[1], fails])
        assert e.value is err
        assert err.__notes__ == [
            "coop_dbo: raised in microbatch 1 of 2; the other microbatches were unwound."]


def test_switches_to_different_streams_are_asymmetric_on_the_cpu_too() -> None:
    def to_comm():
        dbo_yield_and_switch("comm", "dispatch")

    def to_compute():
        dbo_yield_and_switch("compute", "dispatch")

    with pytest.raises(YieldAsymmetryError) as e:
        UBatchScheduler(2).run([to_comm, to_compute])
    assert str(e.value).startswith(
        "Microbatch 1 yielded at index 0 (site 'dispatch') with a stream switch to compute, "
        "but the microbatch that reached index 0 first yielded there with a stream switch "
        "to comm. Yield counts so far: [1, 0].")


# -- 11. the host overhead of a step ------------------------------------------------------
# A microbatch running in a new greenlet per step was measurably slower than the same code
# outside (a new greenlet starts on fresh memory for its Python frames): the scheduler
# keeps one greenlet per microbatch slot, per thread, for as long as it lives.


def test_the_same_greenlets_run_every_step_and_a_new_thread_gets_its_own() -> None:
    sched = UBatchScheduler(2)

    def step() -> list:
        return sched.run([greenlet.getcurrent, greenlet.getcurrent])

    first = step()
    assert first[0] is not first[1] and step() == first and step() == first
    other: list = []
    t = threading.Thread(target=lambda: other.extend(step()))
    t.start()
    t.join(30)
    assert len(other) == 2 and not {id(g) for g in other} & {id(g) for g in first}
    assert step() != first  # back in this thread: new ones again (the old thread's are gone)


# -- GPU: the same with CUDA streams -------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_and_inference_mode_follow_their_microbatch_across_stream_switches(
        ) -> None:
    dev = torch.device("cuda")
    w = W.to(dev)

    def mb(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, str]:
        ctx: Any = (torch.autocast("cuda", dtype=torch.bfloat16) if mode == "autocast" else
                    torch.inference_mode() if mode == "inference" else contextlib.nullcontext())
        with ctx:
            h = x @ w
            dbo_yield_and_switch("comm", "dispatch")
            h = h * 2
            dbo_yield_and_switch("compute", "experts")
            out = h @ w
            return out, f"{out.dtype}/{out.is_inference()}/{torch.is_autocast_enabled('cuda')}"

    x = torch.randn(6, 8, device=dev)
    caller_stream = torch.cuda.current_stream()
    sched = UBatchScheduler(3)
    outs = sched.run([lambda: mb(x[:2], "autocast"), lambda: mb(x[2:4], "inference"),
                      lambda: mb(x[4:], "plain")])
    torch.cuda.synchronize()
    assert [o[1] for o in outs] == ["torch.bfloat16/False/True", "torch.float32/True/False",
                                    "torch.float32/False/False"]
    for (out, _), part, mode in zip(outs, (x[:2], x[2:4], x[4:]),
                                    ("autocast", "inference", "plain"), strict=True):
        assert torch.equal(out, mb(part, mode)[0])  # no scheduler: yields do nothing
    assert torch.cuda.current_stream() == caller_stream
    assert not torch.is_autocast_enabled("cuda") and not torch.is_inference_mode_enabled()
