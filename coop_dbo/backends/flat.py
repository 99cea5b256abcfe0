"""The flat all-to-all: (token, expert) rows grouped by destination rank, sent in one
all-to-all per direction. ``SingleProcessBackend`` and ``TorchDistributedBackend`` are
this layout with different ways of moving the bytes."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from ..errors import CaptureError
from .base import SAME_STREAM, ExpertBatch, MoEBackend, check_count, validate_routing

__all__ = ["FlatAllToAllBackend"]


@dataclasses.dataclass
class _FlatHandle:
    """What combine needs to send expert outputs home (per microbatch, per layer)."""

    token_of_pair: torch.Tensor  # [num_pairs] int64: source token of each sent row
    weight_of_pair: torch.Tensor  # [num_pairs] weight of each sent row
    num_tokens: int
    send_pos: torch.Tensor | None  # [num_pairs] int64 row in the padded send buffer
    # exact mode over several ranks: (send, recv) rows per rank, set by the transfer
    splits: tuple[list[int], list[int]] | None = None
    recv_perm: torch.Tensor | None = None  # [num_recv_rows] received -> sorted row (unpack)


@dataclasses.dataclass
class _FlatDispatch:
    """Rows of one dispatch, before (``dispatch_pack``) or after (``dispatch_transfer``)
    the all-to-all."""

    x: torch.Tensor  # [num_rows, hidden] rows grouped by rank (static: padded slots)
    local_expert: torch.Tensor  # [num_rows] int64 local expert id (padding: n_local)
    # [world_size] int64 rows sent to each rank: exact mode over several ranks, pack only
    counts: torch.Tensor | None
    # made by pack and unpack, read by combine's pack and unpack: compute stream only
    handle: _FlatHandle = dataclasses.field(metadata=SAME_STREAM)


@dataclasses.dataclass
class _FlatCombine:
    """Expert outputs of one combine, before or after the all-to-all back."""

    y: torch.Tensor  # [num_rows, hidden] in received (before) / sent (after) row order
    handle: _FlatHandle = dataclasses.field(metadata=SAME_STREAM)


def _stable_order(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``argsort(ids, stable=True)`` for ids in ``[0, n)``: the indices that group equal ids,
    keeping their order within a group.

    The keys are narrowed to the smallest integer type that holds ``n - 1`` first: a radix
    sort makes one pass per key byte, so uint8 keys sort in a fraction of the time of int64
    ones (``bench/RESULTS.md``), and it runs once in each compute stretch of a layer.
    """
    key_dtype = torch.uint8 if n <= 256 else torch.int16 if n <= 32_768 else torch.int32
    return torch.sort(ids.to(key_dtype), stable=True).indices


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """``bincount(ids, minlength=n)`` for ids < n, without the host sync bincount does on
    CUDA (it reads the max id to size its output), so it can be captured."""
    counts = torch.zeros(n, dtype=torch.int64, device=ids.device)
    return counts.index_add_(0, ids, torch.ones_like(ids))


class FlatAllToAllBackend(MoEBackend):
    """Dispatch by all-to-all of (token, expert) rows, grouped by destination rank.

    Exact mode (``num_max_tokens_per_rank=None``): counts are exchanged first, the host
    reads them, and the payload moves with exact split sizes. Eager only (the host read
    cannot be captured).

    Static mode (``num_max_tokens_per_rank=N``): every rank sends a fixed
    ``[world_size, N * min(top_k, num_local_experts), hidden]`` buffer whose unused rows
    are padding; the counts travel as a tensor. No host sync, so it can be captured in a
    CUDA graph. Padding rows are computed and ignored.
    """

    schedule: ClassVar[Literal["switch", "hook"]] = "switch"

    def __init__(self, num_experts: int, world_size: int, rank: int,
                 num_max_tokens_per_rank: int | None) -> None:
        owner = type(self).__name__
        check_count(owner, "num_experts (routed experts over all ranks)", num_experts)
        check_count(owner, "the expert-parallel size", world_size)
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"{owner}: rank must be an int in [0, {world_size}), got "
                             f"{rank!r}.")
        if num_max_tokens_per_rank is not None:
            check_count(owner, "num_max_tokens_per_rank (None: exact mode)",
                        num_max_tokens_per_rank)
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the "
                             f"expert-parallel size {world_size}.")
        self.num_experts = num_experts
        self.world_size = world_size
        self.rank = rank
        self.num_max_tokens_per_rank = num_max_tokens_per_rank

    # hooks for subclasses: the actual data movement
    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _exchange(self, send: torch.Tensor, send_splits: list[int] | None,
                  recv_splits: list[int] | None) -> torch.Tensor:
        raise NotImplementedError

    def _after_exchange(self, kind: Literal["dispatch", "combine"],
                        device: torch.device, num_tokens: int) -> None:
        """Called once per dispatch and per combine of ``num_tokens`` tokens (this rank's
        microbatch), after the payload moved."""

    # The four-method contract, composed of the switch schedule's phases.
    def dispatch_send(self, x, topk_idx, topk_weights):
        return self.dispatch_transfer(self.dispatch_pack(x, topk_idx, topk_weights))

    def dispatch_recv(self, pending: Any) -> ExpertBatch:
        return self.dispatch_unpack(pending)

    def combine_send(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any:
        return self.combine_transfer(self.combine_pack(expert_out, batch))

    def combine_recv(self, pending: Any) -> torch.Tensor:
        return self.combine_unpack(pending)

    def dispatch_pack(self, x, topk_idx, topk_weights) -> _FlatDispatch:
        """Rows grouped by destination rank (static mode: in their padded slots)."""
        validate_routing(x, topk_idx, topk_weights, self.num_experts)
        num_tokens, top_k = topk_idx.shape
        world, n_local = self.world_size, self.num_local_experts
        static = self.num_max_tokens_per_rank is not None
        if static and num_tokens > self.num_max_tokens_per_rank:
            raise ValueError(f"{num_tokens} tokens exceed num_max_tokens_per_rank="
                             f"{self.num_max_tokens_per_rank} of this backend: construct "
                             "it with num_max_tokens_per_rank >= the largest (micro)batch "
                             "it will see.")
        if (not static and world > 1 and torch.cuda.is_available()
                and torch.cuda.is_current_stream_capturing()):
            raise CaptureError(
                "TorchDistributedBackend in exact mode reads the token counts on the host, "
                "which cannot be captured in a CUDA graph: construct it with "
                "num_max_tokens_per_rank=<largest tokens per rank> for capture.")
        expert = topk_idx.reshape(-1)
        order = _stable_order(expert, self.num_experts)  # pairs grouped by expert, so by rank
        expert_sorted = expert[order]
        token_of_pair = torch.div(order, top_k, rounding_mode="floor")
        weight_of_pair = topk_weights.reshape(-1)[order]
        dest = torch.div(expert_sorted, n_local, rounding_mode="floor")
        send_counts = _count(dest, world)
        send_x = x.index_select(0, token_of_pair)
        send_le = expert_sorted - dest * n_local  # local expert id at the destination
        send_pos = None
        if static:
            cap = self.num_max_tokens_per_rank * min(top_k, n_local)
            start = torch.cumsum(send_counts, 0) - send_counts
            send_pos = (torch.arange(expert.numel(), device=x.device) - start[dest]
                        + dest * cap)
            buf = x.new_zeros(world * cap, x.shape[1])
            buf.index_copy_(0, send_pos, send_x)
            le_buf = torch.full((world * cap,), n_local, dtype=torch.int64, device=x.device)
            le_buf.index_copy_(0, send_pos, send_le)
            send_x, send_le = buf, le_buf
        handle = _FlatHandle(token_of_pair, weight_of_pair, num_tokens, send_pos)
        exact_multi_rank = not static and world > 1
        return _FlatDispatch(send_x, send_le, send_counts if exact_multi_rank else None,
                             handle)

    def dispatch_transfer(self, packed: _FlatDispatch) -> _FlatDispatch:
        """The all-to-all (exact mode: counts first, read on the host)."""
        h = packed.handle
        if packed.counts is not None:  # exact mode over several ranks
            recv_counts = self._exchange_counts(packed.counts)
            h.splits = (packed.counts.tolist(), recv_counts.tolist())
            recv_x = self._exchange(packed.x, *h.splits)
            recv_le = self._exchange(packed.local_expert, *h.splits)
        else:
            recv_x = self._exchange(packed.x, None, None)
            recv_le = (self._exchange(packed.local_expert, None, None)
                       if self.world_size > 1 or h.send_pos is not None
                       else packed.local_expert)
        self._after_exchange("dispatch", packed.x.device, h.num_tokens)
        return _FlatDispatch(recv_x, recv_le, None, h)

    def dispatch_unpack(self, received: _FlatDispatch) -> ExpertBatch:
        """Received rows sorted by local expert; padding (id ``n_local``) sorts last."""
        n_local = self.num_local_experts
        perm = _stable_order(received.local_expert, n_local + 1)
        per_expert = _count(received.local_expert, n_local + 1)[:n_local]
        offsets = torch.cumsum(per_expert, 0).to(torch.int32)
        received.handle.recv_perm = perm
        return ExpertBatch(x=received.x.index_select(0, perm), layout="flat",
                           num_local_experts=n_local, expert_offsets=offsets,
                           handle=received.handle)

    def combine_pack(self, expert_out: torch.Tensor, batch: ExpertBatch) -> _FlatCombine:
        """Expert outputs back in received order."""
        h: _FlatHandle = batch.handle
        if h.recv_perm is None:
            raise RuntimeError("combine_pack got a batch that dispatch_unpack did not make: "
                               "pass the ExpertBatch of this exchange's dispatch.")
        y_recv = torch.empty_like(expert_out)
        y_recv.index_copy_(0, h.recv_perm, expert_out)
        return _FlatCombine(y_recv, h)

    def combine_transfer(self, packed: _FlatCombine) -> _FlatCombine:
        h = packed.handle
        if h.splits is not None:
            back = self._exchange(packed.y, h.splits[1], h.splits[0])
        else:
            back = self._exchange(packed.y, None, None)
        self._after_exchange("combine", back.device, h.num_tokens)
        return _FlatCombine(back, h)

    def combine_unpack(self, received: _FlatCombine) -> torch.Tensor:
        """For each token the weighted sum of its rows."""
        back, h = received.y, received.handle
        if h.send_pos is not None:
            back = back.index_select(0, h.send_pos)
        out = back.new_zeros(h.num_tokens, back.shape[1])
        out.index_add_(0, h.token_of_pair, back * h.weight_of_pair.to(back.dtype)[:, None])
        return out
