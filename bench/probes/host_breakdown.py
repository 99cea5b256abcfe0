"""Where an eager DBO step's extra host time goes (CUDA only).

Host CPU time of one eager step of the reference decoder (``GPU_SHAPE``, bf16, two
microbatches of 128 tokens, no simulated comm): the two microbatches one after the other,
greenlet DBO, and greenlet DBO with the ``record_stream`` hand-over of ``moe_exchange``
switched off (unsafe: for this measurement only). Then torch.profiler's CPU table of five
DBO steps.

    python3 -m bench.probes.host_breakdown
"""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import GPU_SHAPE, decode_inputs, host_times, make_config, make_model, median
from coop_dbo import UBatchScheduler, moe_hooks
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.split import split_tensors


def main() -> None:
    """Print the three variants' host CPU time and the profiler's CPU table."""
    torch.set_grad_enabled(False)
    tokens = 128
    cfg = make_config(GPU_SHAPE, max_batch=2 * tokens)
    model = make_model(cfg, SingleProcessBackend(cfg.num_experts,
                                                 num_max_tokens_per_rank=tokens),
                       dtype=torch.bfloat16, device="cuda")
    chunks = split_tensors(decode_inputs(cfg, 2 * tokens, device="cuda"), 2)
    sched = UBatchScheduler(2)

    def sequential() -> Any:
        return [model(*c) for c in chunks]

    def dbo() -> Any:
        return sched.run([lambda c=c: model(*c) for c in chunks])

    def dbo_without_marks() -> Any:
        hand_over = moe_hooks._hand_over
        moe_hooks._hand_over = lambda obj, to: None
        try:
            return dbo()
        finally:
            moe_hooks._hand_over = hand_over

    t = host_times({"sequential": sequential, "greenlet_dbo": dbo,
                    "greenlet_dbo_without_record_stream": dbo_without_marks},
                   repeats=60, warmup=3, sync=torch.cuda.synchronize)
    med = {k: median(v["cpu_ms"]) for k, v in t.items()}
    for k, v in med.items():
        print(f"{k:36s} {v:8.3f} ms CPU  {v / med['sequential']:.3f}x sequential")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            dbo()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
