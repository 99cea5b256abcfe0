"""Test double of ``deep_ep.Buffer``'s low-latency API (the one double the project allows).

Real deep_ep needs NVSHMEM with InfiniBand GPUDirect Async, which our hosts lack. This
double enforces the contract the adapter relies on, for expert-parallel size 1:

* ``low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, *,
  use_fp8, async_finish, return_recv_hook)`` returns ``(recv_x, recv_count, handle, event,
  hook)``; ``recv_x`` is ``[num_local_experts, num_max * num_ranks, hidden]``,
  ``recv_count`` ``[num_local_experts]`` int32.
* ``low_latency_combine(x, topk_idx, topk_weights, handle, *, async_finish,
  return_recv_hook)`` returns ``(combined_x, event, hook)``.
* With ``return_recv_hook=True`` the call only "sends": the returned tensors hold NaN
  until ``hook()`` runs, which delivers the data in place.
* ``async_finish`` and ``return_recv_hook`` cannot both be set.
* At most two results may be held at once (a result is held from its send until its
  hook runs); a third raises.
"""

from __future__ import annotations

import torch


class FakeLowLatencyBuffer:
    MAX_HELD = 2

    def __init__(self) -> None:
        self.group_size = 1
        self.rank = 0
        self.num_held = 0
        self.calls: list[str] = []  # "dispatch_send", "dispatch_hook", ...

    def _check_flags(self, async_finish: bool, return_recv_hook: bool) -> None:
        if async_finish and return_recv_hook:
            raise AssertionError("deep_ep: async_finish and return_recv_hook cannot both "
                                 "be set")

    def _hold(self) -> None:
        if self.num_held >= self.MAX_HELD:
            raise RuntimeError("deep_ep double: a third low-latency result would be held; "
                               "only two buffers exist")
        self.num_held += 1

    def _finish(self, deliver, return_recv_hook: bool, name: str):
        if not return_recv_hook:
            deliver()
            self.num_held -= 1
            return None
        done = [False]

        def hook() -> None:
            if done[0]:
                raise RuntimeError("deep_ep double: a receive hook was called twice")
            done[0] = True
            self.calls.append(name + "_hook")
            deliver()
            self.num_held -= 1
        return hook

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             use_fp8=True, async_finish=False, return_recv_hook=False):
        self._check_flags(async_finish, return_recv_hook)
        if use_fp8:
            raise NotImplementedError("the double models use_fp8=False only")
        assert x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float32, torch.float16)
        assert topk_idx.dtype == torch.int64
        num_tokens, hidden = x.shape
        assert num_tokens <= num_max_dispatch_tokens_per_rank
        self._hold()
        self.calls.append("dispatch_send")
        rows = num_max_dispatch_tokens_per_rank * self.group_size
        recv_x = torch.full((num_experts, rows, hidden), float("nan"), dtype=x.dtype,
                            device=x.device)
        recv_count = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
        # handle: for every (token, k) its (expert, row)
        slot = torch.full(topk_idx.shape, -1, dtype=torch.int64)
        x_sent = x.clone()  # the send reads x now; later changes to x must not matter
        idx = topk_idx.cpu()
        counts = [0] * num_experts
        for t in range(num_tokens):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                if e < 0:
                    continue
                slot[t, k] = counts[e]
                counts[e] += 1

        def deliver() -> None:
            recv_x.zero_()
            for t in range(num_tokens):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    if e >= 0:
                        recv_x[e, slot[t, k]] = x_sent[t]
            recv_count.copy_(torch.tensor(counts, dtype=torch.int32))

        hook = self._finish(deliver, return_recv_hook, "dispatch")
        handle = (slot, num_tokens, hidden)
        return recv_x, recv_count, handle, None, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, async_finish=False,
                            return_recv_hook=False, zero_copy=False, out=None):
        self._check_flags(async_finish, return_recv_hook)
        slot, num_tokens, hidden = handle
        self._hold()
        self.calls.append("combine_send")
        combined = torch.full((num_tokens, hidden), float("nan"), dtype=x.dtype,
                              device=x.device)
        x_sent = x.clone()
        idx = topk_idx.cpu()

        def deliver() -> None:
            combined.zero_()
            for t in range(num_tokens):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    if e >= 0:
                        combined[t] += topk_weights[t, k].to(x.dtype) * x_sent[e, slot[t, k]]

        hook = self._finish(deliver, return_recv_hook, "combine")
        return combined, None, hook
