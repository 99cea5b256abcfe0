"""Does compute on one stream run under a simulated transfer on another? (CUDA only)

Kernel-level check of the 1-GPU bench's comm stand-ins, without the model or the
scheduler: a chain of bf16 GEMMs of the reference model's expert and attention shapes on
the compute stream, and on a second stream a simulated transfer of about the same length,
spent either in ``torch.cuda._sleep`` (one block spinning on one SM) or in a pinned
host-to-device copy (a copy engine, no SM). For each: compute alone, transfer alone, both
launched together, and the share of the shorter one that ran hidden under the other:
``(t_compute + t_transfer - t_both) / min(t_compute, t_transfer)`` (1 = fully hidden).
Each variant is timed as a CUDA graph replay, as the DBO step runs.

    python3 -m bench.probes.overlap_probe
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import calibrate_spin, capture_plain, median, time_cuda
from coop_dbo.backends import SingleProcessBackend


def _graph_ms(fn: Callable[[], object]) -> float:
    """Median GPU time of ``fn`` captured in a CUDA graph (host launch cost taken out)."""
    return median(time_cuda(capture_plain(fn, torch.device("cuda")).replay, 20))


def _gemm_chain(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, n: int = 40
                ) -> Callable[[], None]:
    """``n`` SwiGLU MLPs of the expert's shapes, one after the other."""
    def compute() -> None:
        h = x
        for _ in range(n):
            a, b = (h @ w1).chunk(2, dim=-1)
            h = (torch.nn.functional.silu(a) * b) @ w2
    return compute


def main() -> None:
    """Print, per size and transfer kind, how much of the shorter stretch ran hidden."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    side = torch.cuda.Stream()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    calibrate_spin(dev)
    for tokens in (128, 512, 4096):
        x = torch.randn(tokens, 2048, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(2048, 2816, device=dev, dtype=torch.bfloat16) / 50
        w2 = torch.randn(1408, 2048, device=dev, dtype=torch.bfloat16) / 50

        compute = _gemm_chain(x, w1, w2)
        t_c = _graph_ms(compute)
        us = t_c * 1e3
        spin = SingleProcessBackend(16, dispatch_us=us, transfer="spin")
        copy = SingleProcessBackend(16, dispatch_us=us, transfer="copy_engine")
        for name, be in (("spin", spin), ("copy_engine", copy)):
            def transfer(be: SingleProcessBackend = be) -> None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    be._after_exchange("dispatch", dev, 0)
                torch.cuda.current_stream().wait_stream(side)

            def both(be: SingleProcessBackend = be,
                     compute: Callable[[], None] = compute) -> None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    be._after_exchange("dispatch", dev, 0)
                compute()
                torch.cuda.current_stream().wait_stream(side)

            t_t = _graph_ms(transfer)
            t_b = _graph_ms(both)
            hidden = (t_c + t_t - t_b) / min(t_c, t_t)
            print(f"tokens {tokens:5d} {name:12s}: compute {t_c:.3f} ms, transfer "
                  f"{t_t:.3f} ms, together {t_b:.3f} ms -> {hidden:.0%} of the shorter "
                  "hidden")


if __name__ == "__main__":
    main()
