"""Worker functions for multi-process tests (gloo on CPU); importable by spawned children."""

from __future__ import annotations

import os

import torch


def ep_decoder_worker(rank: int, world: int, rendezvous: str, static: bool,
                      out_dir: str) -> None:
    """EP over gloo: DBO output == sequential microbatches; == one-process full model."""
    from fault_workers import end_group
    from helpers import decode_inputs, init_group, run_dbo, run_sequential

    from coop_dbo import UBatchScheduler
    from coop_dbo.backends import TorchDistributedBackend
    from coop_dbo.models import MoEConfig, MoEDecoder

    init_group("gloo", rank, world, rendezvous)
    try:
        cfg = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=3)
        batch = 10 + 3 * rank  # ranks bring different token counts
        backend = TorchDistributedBackend(
            cfg.num_experts, num_max_tokens_per_rank=16 if static else None)
        model = MoEDecoder(cfg, backend)
        inputs = decode_inputs(cfg, batch, seed=100 + rank)
        sched = UBatchScheduler(2, trace=True)
        dbo = run_dbo(model, inputs, sched)
        seq = run_sequential(model, inputs, 2)
        full = model(*inputs)
        sites = [e.site for e in sched.last_trace if e.ubatch == 0]
        torch.save({"dbo": dbo, "seq": seq, "full": full, "inputs": inputs,
                    "sites": sites}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        end_group(out_dir, rank, world)
