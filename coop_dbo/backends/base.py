"""The backend contract: what ``moe_exchange`` asks of a communication backend.

A backend moves routed tokens from the ranks that hold them to the ranks that own their
experts (the **dispatch**) and the expert outputs back (the **combine**), each split into
a send and a receive so that a microbatch can yield in between. ``moe_exchange``
(``coop_dbo.moe_hooks``) drives it; see there for where the yields go.

Terms used in every docstring below:

* ``num_tokens``: tokens of one microbatch on this rank; ``hidden``: the model width;
  ``top_k``: experts per token; ``num_experts``: routed experts over all ranks;
  ``num_local_experts = num_experts // world_size``, owned by this rank.
* **compute stream**: the stream the step runs on (the caller's current stream).
  **comm stream**: the scheduler's one communication stream. A method documented as
  running on a stream is called with that stream current.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch

__all__ = ["ExpertBatch", "MoEBackend", "validate_routing", "check_count", "SAME_STREAM"]

#: Dataclass field metadata for backend state that one stream makes and reads (e.g. a
#: handle used by pack and unpack, both on the compute stream): the exchange's lifetime
#: rule does not mark such a field for the other stream.
SAME_STREAM = {"coop_dbo_same_stream": True}


@dataclasses.dataclass
class ExpertBatch:
    """The tokens this rank's experts must process, as a backend delivers them.

    Two layouts:

    * ``"flat"``: ``x`` is ``[num_rows, hidden]``, rows sorted by local expert;
      ``expert_offsets`` ``[num_local_experts]`` int32 holds the end row of each expert
      (cumulative counts). Rows at or beyond ``expert_offsets[-1]`` are padding: whatever
      is computed there is ignored by combine.
    * ``"padded"`` (deep_ep low-latency): ``x`` is
      ``[num_local_experts, num_max_rows_per_expert, hidden]``; ``recv_count``
      ``[num_local_experts]`` int32 holds the valid rows of each expert; rows beyond it are
      ignored by combine.

    ``handle`` is backend-private state that ``combine_send`` needs.
    """

    x: torch.Tensor
    layout: Literal["flat", "padded"]
    num_local_experts: int
    expert_offsets: torch.Tensor | None = None
    recv_count: torch.Tensor | None = None
    handle: Any = None

    def linear(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-expert matmul: row r of expert e becomes ``h[r] @ weight[e]``.

        Args:
            h: activations in this batch's layout (``[rows, in]`` or ``[E, rows, in]``).
            weight: ``[num_local_experts, in, out]``, same dtype as ``h``.
        Returns:
            ``[rows, out]`` or ``[E, rows, out]``.

        The flat layout uses ``torch._grouped_mm``, which needs ``in`` and ``out`` rows of
        a multiple of 16 bytes (8 bf16 or 4 fp32 values); on CUDA for dtypes other than
        bf16 (which ``_grouped_mm`` cannot capture) a masked per-expert matmul instead.
        """
        if h.dtype != weight.dtype or h.device != weight.device:
            raise ValueError(
                f"the experts' weights are {weight.dtype} on {weight.device} but the tokens "
                f"they get are {h.dtype} on {h.device}: pass MoE activations of the "
                "weights' dtype, on their device.")
        if self.layout == "padded":
            return torch.bmm(h, weight)
        assert self.expert_offsets is not None
        if h.is_cuda and h.dtype != torch.bfloat16:
            return _masked_expert_mm(h, weight, self.expert_offsets)
        return torch._grouped_mm(h, weight, offs=self.expert_offsets)


def _masked_expert_mm(h: torch.Tensor, weight: torch.Tensor,
                      offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert matmul without host syncs, for CUDA dtypes ``torch._grouped_mm`` lacks.

    ``_grouped_mm`` on CUDA takes bf16 only; its fallback for other dtypes reads the
    offsets on the host, which a CUDA graph cannot capture. This computes every expert
    over all rows and keeps each row's own expert: ``num_local_experts`` times the work,
    fine for fp32 tests, not meant for speed. Padding rows come out as zeros.
    """
    rows = torch.arange(h.shape[0], device=h.device)
    row_expert = torch.searchsorted(offsets.to(torch.int64), rows, right=True)
    out = h.new_zeros(h.shape[0], weight.shape[2])
    for e in range(weight.shape[0]):
        out += (row_expert == e).unsqueeze(1).to(h.dtype) * (h @ weight[e])
    return out


class MoEBackend(ABC):
    """Moves routed tokens to the experts and back, with a split send / receive.

    Two ways to implement it, one per yield schedule (``schedule``):

    * ``"hook"``: implement the four abstract methods. ``moe_exchange`` calls
      ``dispatch_send``, yields, calls ``dispatch_recv``; runs the experts; calls
      ``combine_send``, yields, calls ``combine_recv``. Everything runs on the compute
      stream: the send must only issue the transfer and return, the receive completes it.
    * ``"switch"``: ``moe_exchange`` calls the six phase methods instead, switching
      streams between them::

          dispatch_pack      compute stream   lay out what is sent
          dispatch_transfer  comm stream      the all-to-all
          dispatch_unpack    compute stream   -> ExpertBatch
          (experts)
          combine_pack       compute stream
          combine_transfer   comm stream      the all-to-all back
          combine_unpack     compute stream   -> [num_tokens, hidden]

      Their defaults compose the four abstract methods (the whole send and receive on
      the comm stream); override them to keep routing and permutation kernels off the
      comm stream, so that the other microbatch has to hide only the transfer itself.

    Rules every backend keeps:

    * Every call issues the same collective operations whatever the routing (a rank or
      expert that gets no token still exchanges a zero count), so that ranks and
      microbatches stay in step. A microbatch may yield only inside ``moe_exchange``.
    * **Lifetimes** (switch schedule). ``moe_exchange`` keeps the object a ``*_pack``
      returns referenced until the compute stream has waited for the transfer that reads
      it, keeps the object ``dispatch_transfer`` returns referenced until the comm stream
      has waited for the compute work issued before the combine's switch, and marks the
      object ``combine_transfer`` returns with ``record_stream`` for the compute stream.
      So a backend must (1) reach every tensor a transfer reads from its ``packed``
      argument (or from objects alive until the exchange ends), (2) not drop references
      inside the objects it is handed (no ``received.x = None``), and (3) return from
      ``combine_transfer`` every comm-stream tensor the compute stream reads afterwards.
      Tensors, tuples, lists and dataclasses are walked; a dataclass field whose
      metadata is ``SAME_STREAM`` is skipped (state one stream makes and reads).
    * Graph capture: a backend that reads device values on the host (exact split sizes)
      cannot be captured and should raise ``CaptureError`` while capturing.

    Attributes:
        schedule: ``"switch"`` or ``"hook"`` (class attribute).
        num_experts: routed experts over all ranks.
        world_size / rank: the expert-parallel group; rank ``r`` owns experts
            ``local_expert_range``.
    """

    schedule: ClassVar[Literal["switch", "hook"]]
    num_experts: int
    world_size: int
    rank: int

    @property
    def num_local_experts(self) -> int:
        """Experts owned by this rank: ``num_experts // world_size``."""
        return self.num_experts // self.world_size

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """``(first, end)`` global ids of this rank's experts."""
        n = self.num_local_experts
        return self.rank * n, (self.rank + 1) * n

    # -- the four-method contract (the hook schedule calls these directly) -------------

    @abstractmethod
    def dispatch_send(self, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor) -> Any:
        """Start the dispatch of one microbatch's tokens.

        Args:
            x: ``[num_tokens, hidden]`` activations (the model's dtype, e.g. bf16).
            topk_idx: ``[num_tokens, top_k]`` int64 global expert ids in
                ``[0, num_experts)``.
            topk_weights: ``[num_tokens, top_k]`` floating routing weights.
        Returns:
            an opaque pending object for ``dispatch_recv``. It may hold backend
            resources (deep_ep holds a receive buffer until the receive): the exchange
            always calls ``dispatch_recv`` on it, also when the step is unwound.
        """

    @abstractmethod
    def dispatch_recv(self, pending: Any) -> ExpertBatch:
        """Complete the dispatch started by ``dispatch_send``.

        Returns:
            the ``ExpertBatch`` of tokens this rank's experts must process (rows from
            every rank, this microbatch only).
        """

    @abstractmethod
    def combine_send(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any:
        """Start sending the expert outputs back to the ranks their tokens came from.

        Args:
            expert_out: the experts' outputs in ``batch``'s layout: ``[num_rows, hidden]``
                (flat) or ``[num_local_experts, num_max_rows_per_expert, hidden]``
                (padded), the dtype of ``batch.x``.
            batch: the ``ExpertBatch`` that ``dispatch_recv`` returned.
        Returns:
            an opaque pending object for ``combine_recv``.
        """

    @abstractmethod
    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Complete the combine.

        Returns:
            ``[num_tokens, hidden]``, for each token of this rank's microbatch the sum
            over its ``k`` of ``topk_weights[t, k] * expert_output[t, k]``.
        """

    # -- the switch schedule's phases (defaults compose the four methods) --------------

    def dispatch_pack(self, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor) -> Any:
        """Compute stream, before the transfer: lay out what is sent.

        Arguments as for ``dispatch_send``. Returns the object ``dispatch_transfer``
        reads (kept alive by the exchange until the compute stream waited for it).
        """
        return (x, topk_idx, topk_weights)

    def dispatch_transfer(self, packed: Any) -> Any:
        """Comm stream: move ``dispatch_pack``'s output; returns what arrived."""
        return self.dispatch_recv(self.dispatch_send(*packed))

    def dispatch_unpack(self, received: Any) -> ExpertBatch:
        """Compute stream, after the transfer: the ``ExpertBatch`` for the experts."""
        if not isinstance(received, ExpertBatch):
            raise TypeError(f"{type(self).__name__}.dispatch_transfer returned "
                            f"{type(received).__name__}; override dispatch_unpack to turn "
                            "it into an ExpertBatch.")
        return received

    def combine_pack(self, expert_out: torch.Tensor, batch: ExpertBatch) -> Any:
        """Compute stream, before the transfer: lay out the expert outputs to send back.

        Arguments as for ``combine_send``.
        """
        return (expert_out, batch)

    def combine_transfer(self, packed: Any) -> Any:
        """Comm stream: move ``combine_pack``'s output back; returns what arrived."""
        return self.combine_recv(self.combine_send(*packed))

    def combine_unpack(self, received: Any) -> torch.Tensor:
        """Compute stream, after the transfer: ``[num_tokens, hidden]`` weighted sums."""
        if not isinstance(received, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.combine_transfer returned "
                            f"{type(received).__name__}; override combine_unpack to turn "
                            "it into the [num_tokens, hidden] tensor.")
        return received


def check_count(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else a clear error.

    Args:
        owner: the class or function taking it, for the message.
        name: the argument's name and what it counts, e.g. ``"num_experts (routed
            experts over all ranks)"``.
    Raises:
        TypeError: not an int (a string, a float, a bool).
        ValueError: an int below ``minimum``.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} "
                        f"{value!r}.")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}.")
    return value


def validate_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                     num_experts: int, hidden: int | None = None) -> None:
    """Raise a clear error for inputs a backend cannot route.

    Checks shapes, dtypes, devices, ``top_k <= num_experts`` and, on CPU tensors (where it
    costs no device sync), that expert ids are in range.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {tuple(x.shape)}.")
    if hidden is not None and x.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[1]} but the experts expect {hidden}: "
                         "pass activations of the model's hidden size.")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx must be [num_tokens={x.shape[0]}, top_k], got "
                         f"{tuple(topk_idx.shape)}.")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have the shape of "
                         f"topk_idx {tuple(topk_idx.shape)}.")
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be int64 expert ids, got {topk_idx.dtype}.")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}.")
    if topk_idx.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_idx.shape[1]} is larger than num_experts="
                         f"{num_experts}: each token picks top_k distinct experts.")
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move all "
                             "MoE inputs to one device.")
    if x.device.type == "cpu" and topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert ids must be in [0, {num_experts}), got ids from {lo} "
                             f"to {hi}.")


