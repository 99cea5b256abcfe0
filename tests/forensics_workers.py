"""The gloo worker of the cross-rank forensics tests (``test_forensics.py``).

``forensics_worker`` runs every scenario in one process group session per rank (one
spawn per world size keeps the test short): ranks that differ in their schedule, before
and during a step, and a rank stuck in a transfer or failing under the watchdog. The
last rank is the odd one. After each scenario that breaks the group, the ranks meet at a
file barrier and re-create it on the next rendezvous file; the next step must be exact.
Every call's outcome is saved per rank for the test to check.
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from fault_workers import (
    SMALL_CFG_KW,
    FaultyTorchDistributedBackend,
    _error_record,
    _init,
    end_group,
    wait_for_peers,
)

from coop_dbo import CoopDBORunner
from coop_dbo.models import MoEConfig, MoEDecoder

#: Steps of ``forensics_worker``: (name, whether the group is re-created after it).
STEPS: list[tuple[str, bool]] = [
    ("good", False),
    ("odd rank skips layer 1's exchange", False),
    ("call on the broken group", True),
    ("good after a new group", False),
    ("fresh runners, odd rank renames its sites", False),
    ("same runners, next step", False),
    ("verify_schedule, odd rank renames its sites", False),
    ("odd rank has 3 microbatches", False),
    ("watchdog: good", False),
    ("watchdog: odd rank stuck inside a transfer", True),
    ("watchdog: good after a new group", False),
    ("watchdog: odd rank's send raises", True),
    ("watchdog: good at the end", False),
]

CFG = MoEConfig.tiny(**SMALL_CFG_KW)


def step_inputs(step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """Decode inputs of 3 or 4 rows whose KV-cache slots no other step or rank uses, so
    that a one-process model is the reference of every rank's every step."""
    assert 4 * world * len(STEPS) <= CFG.max_batch
    batch = 4 - rank % 2
    g = torch.Generator().manual_seed(500 + 10 * step + rank)
    tokens = torch.randint(0, CFG.vocab_size, (batch,), generator=g)
    positions = torch.randint(0, CFG.max_seq_len, (batch,), generator=g)
    return tokens, positions, torch.arange(batch) + 4 * (world * step + rank)


def skippable(model: MoEDecoder, layer: int) -> Callable[[bool], None]:
    """Let ``model`` skip ``layer``'s MoE exchange (no yields, no collectives); returns
    the switch."""
    moe_layer = model.layers[layer]
    real = moe_layer.moe
    state = {"skip": False}

    def moe(self: Any, x: torch.Tensor, shared_experts: Any) -> torch.Tensor:
        if state["skip"]:
            return x * 0.5
        return real(x, shared_experts)

    moe_layer.moe = types.MethodType(moe, moe_layer)

    def switch(on: bool) -> None:
        state["skip"] = on
    return switch


def forensics_worker(rank: int, world: int, rendezvous: list[str], timeout_s: float,
                     limit_s: float, out_dir: str) -> None:
    import torch.distributed as dist

    odd = rank == world - 1
    results: list[dict[str, Any]] = []
    groups = iter(rendezvous)
    _init(rank, world, next(groups), timeout_s)
    try:
        backend = FaultyTorchDistributedBackend(CFG.num_experts)
        backend.arm_fault(None)
        model = MoEDecoder(CFG, backend)
        skip = skippable(model, 1)
        dumps = os.path.join(out_dir, "dumps")
        runner = CoopDBORunner(model, process_group=dist.group.WORLD, trace=True,
                               dump_dir=dumps)

        def renamed(**kw: Any) -> CoopDBORunner:
            """A fresh runner over a decoder whose odd rank names its sites otherwise."""
            m = MoEDecoder(CFG, backend)
            if odd:
                for layer in m.layers:
                    layer.site_prefix = layer.site_prefix.replace("L", "X")
            return CoopDBORunner(m, process_group=dist.group.WORLD, **kw)

        def one(step: int, name: str, r: CoopDBORunner,
                model_fn: Callable[..., Any] | None = None) -> None:
            inputs = step_inputs(step, rank, world)
            rec: dict[str, Any] = {"step": step, "name": name, "inputs": inputs}
            t0 = time.monotonic()
            try:
                out = r(*inputs)
                rec.update(path=r.last_path, out=out)
            except BaseException as exc:
                rec.update(path="error", error=_error_record(exc),
                           attrs={k: getattr(exc, k) for k in
                                  ("index", "sites", "step", "dump", "rank", "limit_s")
                                  if hasattr(exc, k)})
            rec["elapsed"] = time.monotonic() - t0
            results.append(rec)

        fresh: CoopDBORunner | None = None
        for step, (name, regroup) in enumerate(STEPS):
            if name == "odd rank skips layer 1's exchange":
                skip(odd)
                one(step, name, runner)
                skip(False)
            elif name == "fresh runners, odd rank renames its sites":
                fresh = renamed()
                one(step, name, fresh)
            elif name == "same runners, next step":
                assert fresh is not None
                one(step, name, fresh)
            elif name == "verify_schedule, odd rank renames its sites":
                one(step, name, renamed(verify_schedule=True))
            elif name == "odd rank has 3 microbatches":
                one(step, name, CoopDBORunner(model, process_group=dist.group.WORLD,
                                              num_ubatches=3 if odd else 2))
            elif name == "watchdog: good":
                runner = CoopDBORunner(model, process_group=dist.group.WORLD, trace=True,
                                       watchdog_s=limit_s, dump_dir=dumps)
                one(step, name, runner)
            elif name == "watchdog: odd rank stuck inside a transfer":
                if odd:  # microbatch 1's first payload exchange of layer 0
                    backend.arm_fault("_exchange", ubatch=1, call=0, kind="stuck")
                one(step, name, runner)
                backend.arm_fault(None)
            elif name == "watchdog: odd rank's send raises":
                if odd:
                    backend.arm_fault("_exchange", ubatch=0, call=2)  # layer 0's combine
                one(step, name, runner)
                backend.arm_fault(None)
            else:
                one(step, name, runner)
            if regroup:  # the group is broken: every rank makes a new one
                wait_for_peers(out_dir, f"regroup{step}", rank, world, 60.0)
                dist.destroy_process_group()
                _init(rank, world, next(groups), timeout_s)
                runner.process_group = dist.group.WORLD
    finally:
        torch.save(results, os.path.join(out_dir, f"forensics{rank}.pt"))
        end_group(out_dir, rank, world)
