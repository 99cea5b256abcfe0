"""Expert parallelism over a ``torch.distributed`` process group (NCCL, gloo)."""

from __future__ import annotations

from typing import Any

import torch

from .flat import FlatAllToAllBackend

__all__ = ["TorchDistributedBackend"]


class TorchDistributedBackend(FlatAllToAllBackend):
    """Expert parallelism over a ``torch.distributed`` process group (NCCL, gloo).

    Rank ``r`` owns experts ``[r * E / W, (r + 1) * E / W)``. Dispatch exchanges the row
    counts per rank (``all_to_all_single`` of ``[W]`` int64), then the payload rows and
    their local expert ids; combine sends the expert outputs back with the reverse split.
    Runs on the comm stream in the ``"switch"`` schedule.

    Args:
        num_experts: total routed experts (divisible by the group size).
        group: the expert-parallel process group (default: the world).
        num_max_tokens_per_rank: static padded mode for CUDA graph capture (see
            ``FlatAllToAllBackend``); ``None`` = exact splits, eager only.
    """

    def __init__(self, num_experts: int, group: Any = None, *,
                 num_max_tokens_per_rank: int | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedBackend needs torch.distributed to be "
                               "initialised (dist.init_process_group, e.g. under torchrun).")
        self.group = group
        self._dist = dist
        super().__init__(num_experts, dist.get_world_size(group), dist.get_rank(group),
                         num_max_tokens_per_rank)

    def _exchange_counts(self, send_counts):
        recv = torch.empty_like(send_counts)
        self._dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv

    def _exchange(self, send, send_splits, recv_splits):
        if recv_splits is None:
            out = torch.empty_like(send)
        else:
            out = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        self._dist.all_to_all_single(out, send.contiguous(), recv_splits, send_splits,
                                     group=self.group)
        return out
