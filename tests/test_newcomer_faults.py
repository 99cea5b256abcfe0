"""Faults found by trying the library as a new user would, one group per case.

Each group states what went wrong before the fix; every overlapped result is compared
with the same model run without DBO.
"""

from __future__ import annotations

import pytest
import torch
from helpers import routed_tokens

from coop_dbo import UBatchScheduler
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.moe_hooks import moe_exchange, swiglu_experts

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
