"""Adapter over deep_ep's low-latency kernels (imported lazily; the hook schedule)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from .base import ExpertBatch, MoEBackend, check_count, validate_routing

__all__ = ["DeepEPLowLatencyBackend"]


class DeepEPLowLatencyBackend(MoEBackend):
    """Adapter over ``deep_ep.Buffer.low_latency_dispatch / low_latency_combine``.

    Uses ``return_recv_hook=True`` (``async_finish=False``): the send kernels return at
    once, ``hook()`` launches the receive. Hook schedule: two yields per MoE layer.

    deep_ep holds at most two low-latency results at once (double buffering), so at most
    two microbatches may have a dispatch or combine in flight: this adapter counts held
    results and raises before a third would be taken.

    Expert batches arrive in deep_ep's padded layout:
    ``recv_x`` ``[num_local_experts, num_max_dispatch_tokens_per_rank * world_size,
    hidden]`` bf16 and ``recv_count`` ``[num_local_experts]`` int32.

    Not run against real deep_ep here (it needs NVSHMEM with InfiniBand GPUDirect Async);
    tested against a double that enforces the same contract.

    Args:
        buffer: a ``deep_ep.Buffer`` made with ``low_latency_mode=True`` (or a double).
        num_experts: total routed experts.
        num_max_dispatch_tokens_per_rank: the largest microbatch, in tokens.
        use_fp8: let deep_ep cast the dispatch payload to FP8 (the experts then receive a
            ``(fp8, scales)`` pair, which ``ExpertBatch.linear`` does not handle; off by
            default).
    """

    schedule: ClassVar[Literal["switch", "hook"]] = "hook"
    MAX_HELD: ClassVar[int] = 2

    def __init__(self, buffer: Any, num_experts: int, num_max_dispatch_tokens_per_rank: int,
                 *, use_fp8: bool = False) -> None:
        check_count(type(self).__name__, "num_experts (routed experts over all ranks)",
                    num_experts)
        check_count(type(self).__name__, "num_max_dispatch_tokens_per_rank",
                    num_max_dispatch_tokens_per_rank)
        self.buffer = buffer
        self.num_experts = num_experts
        group = getattr(buffer, "group", None)
        self.world_size = int(getattr(buffer, "group_size", None) or (
            group.size() if group is not None else 1))
        self.rank = int(getattr(buffer, "rank", 0))
        if num_experts % self.world_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the "
                             f"expert-parallel size {self.world_size}.")
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.use_fp8 = use_fp8
        self.num_held = 0  # dispatch/combine results sent and not yet received

    @staticmethod
    def load_buffer_class() -> Any:
        """``deep_ep.Buffer``, imported on demand with a clear error when missing."""
        try:
            import deep_ep
        except ImportError as e:
            raise ImportError("deep_ep is not installed: pip install 'coop-dbo[deepep]' "
                              "(needs NVSHMEM with InfiniBand GPUDirect Async).") from e
        return deep_ep.Buffer

    def _take(self, what: str) -> None:
        if self.num_held >= self.MAX_HELD:
            raise RuntimeError(
                f"deep_ep low-latency holds at most {self.MAX_HELD} results at once; a "
                f"third {what} was started while {self.num_held} were still held. Run at "
                "most two microbatches with this backend, and call each receive hook "
                "before the microbatch sends again.")
        self.num_held += 1

    def dispatch_send(self, x, topk_idx, topk_weights):
        validate_routing(x, topk_idx, topk_weights, self.num_experts)
        if x.shape[0] > self.num_max_dispatch_tokens_per_rank:
            raise ValueError(f"{x.shape[0]} tokens exceed num_max_dispatch_tokens_per_rank="
                             f"{self.num_max_dispatch_tokens_per_rank}.")
        self._take("dispatch")
        try:
            recv_x, recv_count, handle, _event, hook = self.buffer.low_latency_dispatch(
                x, topk_idx, self.num_max_dispatch_tokens_per_rank, self.num_experts,
                use_fp8=self.use_fp8, async_finish=False, return_recv_hook=True)
        except BaseException:
            self.num_held -= 1
            raise
        return (recv_x, recv_count, (handle, topk_idx, topk_weights), hook)

    def dispatch_recv(self, pending):
        recv_x, recv_count, handle, hook = pending
        try:
            hook()
        finally:
            self.num_held -= 1
        return ExpertBatch(x=recv_x, layout="padded",
                           num_local_experts=self.num_local_experts,
                           recv_count=recv_count, handle=handle)

    def combine_send(self, expert_out, batch):
        handle, topk_idx, topk_weights = batch.handle
        self._take("combine")
        try:
            combined, _event, hook = self.buffer.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, async_finish=False,
                return_recv_hook=True)
        except BaseException:
            self.num_held -= 1
            raise
        return combined, hook

    def combine_recv(self, pending):
        combined, hook = pending
        try:
            hook()
        finally:
            self.num_held -= 1
        return combined
