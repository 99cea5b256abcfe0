"""Expert parallelism of size 1 with a simulated transfer time (spin kernel or copy engine)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from ..errors import CaptureError
from .flat import FlatAllToAllBackend

__all__ = ["SingleProcessBackend", "calibrate_sleep_cycles_per_us", "calibrate_h2d_bytes_per_us"]


def calibrate_sleep_cycles_per_us(device: torch.device) -> float:
    """Clock cycles of ``torch.cuda._sleep`` per microsecond on this GPU (measured)."""
    cycles = 1_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e3)


def calibrate_h2d_bytes_per_us() -> float:
    """Pinned host-to-device copy bandwidth of this GPU, bytes per microsecond."""
    nbytes = 64 << 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return nbytes / (start.elapsed_time(end) * 1e3)


class SingleProcessBackend(FlatAllToAllBackend):
    """Expert parallelism of size 1 in one process, with simulated transfer time.

    It performs the exact data movement of an expert-parallel all-to-all of size 1 (rows
    gathered per expert, sent, received, sent back, weighted sum) and, on a GPU, spends
    ``dispatch_us`` / ``combine_us`` microseconds on the comm stream in a kernel that
    spins on one SM (``torch.cuda._sleep``, calibrated once per process). That stands in
    for an RDMA-style transfer (DeepEP low-latency over InfiniBand): time passes on the
    comm stream while the compute stream keeps almost every SM. It does **not** model
    NVLink copy engines or NCCL kernels that occupy SMs. On CPU the simulated time is 0.

    ``transfer="copy_engine"`` spends the time in a pinned-host-to-device copy instead,
    sized from a measured bandwidth: a DMA engine moves bytes over PCIe into GPU memory
    and no SM is held at all, as when a NIC writes an RDMA transfer into GPU memory. The
    1-GPU benchmark uses it, since the spin kernel's one SM measurably slows the other
    microbatch's compute (``bench/RESULTS.md``). It needs one eager call
    at each size before a capture (the copy buffers grow outside capture only).

    Args:
        num_experts: total routed experts.
        dispatch_us / combine_us: simulated transfer time per call, microseconds.
        num_max_tokens_per_rank: static (graph-capturable) padded mode; ``None`` = exact.
        transfer: ``"spin"`` (default) or ``"copy_engine"``, how the time is spent.
        us_per_tokens: ``None`` (default): ``dispatch_us`` / ``combine_us`` per call,
            whatever its size. ``n``: they are the time of ``n`` tokens, and a call of
            ``t`` tokens spends ``t / n`` of it, as a transfer of ``t`` tokens' bytes
            would; so a whole batch and its two microbatches move the same total.
    """

    _cycles_per_us: ClassVar[float | None] = None
    _copy_bytes_per_us: ClassVar[float | None] = None
    # One pinned source and one device target per device, grown on eager calls (warm-up
    # runs them before any capture with the same sizes).
    _copy_buffers: ClassVar[dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def __init__(self, num_experts: int, *, dispatch_us: float = 0.0, combine_us: float = 0.0,
                 num_max_tokens_per_rank: int | None = None,
                 transfer: Literal["spin", "copy_engine"] = "spin",
                 us_per_tokens: int | None = None) -> None:
        super().__init__(num_experts, 1, 0, num_max_tokens_per_rank)
        if us_per_tokens is not None and (not isinstance(us_per_tokens, int)
                                          or us_per_tokens < 1):
            raise ValueError(f"us_per_tokens must be None or an int >= 1, got "
                             f"{us_per_tokens!r}.")
        self.us_per_tokens = us_per_tokens
        for name, us in (("dispatch_us", dispatch_us), ("combine_us", combine_us)):
            if not isinstance(us, (int, float)) or isinstance(us, bool) or not us >= 0:
                raise ValueError(f"SingleProcessBackend: {name} must be a number of "
                                 f"microseconds >= 0, got {us!r}.")
        if transfer not in ("spin", "copy_engine"):
            raise ValueError(f"transfer must be 'spin' or 'copy_engine', got {transfer!r}.")
        self.dispatch_us = dispatch_us
        self.combine_us = combine_us
        self.transfer = transfer

    def _exchange(self, send, send_splits, recv_splits):
        return send.clone()  # the transfer: a real copy into a receive buffer

    def _after_exchange(self, kind: Literal["dispatch", "combine"],
                        device: torch.device, num_tokens: int) -> None:
        us = self.dispatch_us if kind == "dispatch" else self.combine_us
        if self.us_per_tokens is not None:
            us *= num_tokens / self.us_per_tokens
        if us > 0 and device.type == "cuda":
            cls = SingleProcessBackend
            if self.transfer == "copy_engine":
                cls._copy_for_us(us)
                return
            if cls._cycles_per_us is None:
                cls._cycles_per_us = calibrate_sleep_cycles_per_us(torch.device("cuda"))
            torch.cuda._sleep(int(us * cls._cycles_per_us))

    @classmethod
    def _copy_for_us(cls, us: float) -> None:
        """A host-to-device copy on the current stream that takes about ``us``."""
        if cls._copy_bytes_per_us is None:
            cls._copy_bytes_per_us = calibrate_h2d_bytes_per_us()
        nbytes = max(4096, int(us * cls._copy_bytes_per_us) // 4096 * 4096)
        dev = torch.cuda.current_device()
        bufs = cls._copy_buffers.get(dev)
        if bufs is None or bufs[0].numel() < nbytes:
            if torch.cuda.is_current_stream_capturing():
                raise CaptureError("SingleProcessBackend(transfer='copy_engine') needs an "
                                   "eager run at this size before capture (warm-up).")
            bufs = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
                    torch.empty(nbytes, dtype=torch.uint8, device=dev))
            cls._copy_buffers[dev] = bufs
        bufs[1][:nbytes].copy_(bufs[0][:nbytes], non_blocking=True)
