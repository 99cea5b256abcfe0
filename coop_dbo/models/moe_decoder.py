"""A flat, readable MoE decoder for decode steps: the model the tests and benchmarks run.

embedding -> [RMSNorm -> attention over a KV cache -> RMSNorm -> router -> routed experts
(through a ``MoEBackend``, expert-parallel across ranks) + shared expert] x layers ->
RMSNorm -> LM head. Each layer's cached keys and values are gathered during the previous
layer's experts (``MoELayer.step`` says why).

One forward is one decode step: each sequence of the batch brings one new token, its
position, and the KV-cache slot it owns. Microbatches are slices of the batch; each
writes only its own cache rows, so microbatches never touch each other's state. The
routed experts go through ``moe_exchange``, which places the DBO yields; outside a
scheduler they are no-ops and this is a plain model.

All parameters are made from fixed seeds on the target device, so every rank of an
expert-parallel group holds the same attention / router / shared-expert weights and its
own slice of the routed experts, with no weight broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import MoEBackend, SingleProcessBackend
from ..moe_hooks import moe_exchange, swiglu_experts
from ..schedule import SchedulePolicy

__all__ = ["MoEConfig", "MoEDecoder"]


@dataclass(frozen=True)
class MoEConfig:
    """Model shape. ``num_experts`` must be divisible by the expert-parallel size."""

    vocab_size: int = 512
    hidden: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate: int = 32
    shared_intermediate: int = 32
    max_batch: int = 64  # KV-cache slots
    max_seq_len: int = 64
    rms_eps: float = 1e-6
    seed: int = 0

    @classmethod
    def tiny(cls, **kw) -> MoEConfig:
        return cls(**kw)

    @classmethod
    def deepseek_like(cls, num_layers: int = 4, **kw) -> MoEConfig:
        """DeepSeek-V3-like widths (hidden 7168, 256 experts top-8, expert MLP 2048)."""
        base = dict(vocab_size=32_000, hidden=7168, num_layers=num_layers, num_heads=56,
                    head_dim=128, num_experts=256, top_k=8, moe_intermediate=2048,
                    shared_intermediate=2048, max_batch=4096, max_seq_len=128)
        base.update(kw)
        return cls(**base)


class _Seeds:
    """Deterministic per-parameter generators (same values on every rank)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        self.count = 0

    def randn(self, *shape: int, std: float, dtype: torch.dtype, key: int | None = None
              ) -> torch.Tensor:
        if key is None:
            self.count += 1
            key = self.count
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + key)
        t = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
        return t.mul_(std).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused kernel on CUDA, against five for the written-out fp32 formula (measured by
    # bench/probes/kernel_probe.py); both norms of a layer sit in the stretch before the
    # dispatch, so their cost shows in the balance of a layer's stretches.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class MoELayer(nn.Module):
    k_cache: torch.Tensor  # [max_batch, heads, max_seq_len, head_dim], a buffer
    v_cache: torch.Tensor

    def __init__(self, cfg: MoEConfig, layer: int, backend: MoEBackend, seeds: _Seeds,
                 dtype: torch.dtype, schedule: SchedulePolicy) -> None:
        super().__init__()
        h, nh, hd = cfg.hidden, cfg.num_heads, cfg.head_dim
        dev = seeds.device
        self.cfg = cfg
        self.backend = backend
        self.schedule = schedule
        self.site_prefix = f"L{layer}."  # yield sites name the layer (symmetry checks)
        self.attn_norm = nn.Parameter(torch.ones(h, device=dev, dtype=dtype))
        self.wqkv = nn.Parameter(seeds.randn(h, 3 * nh * hd, std=h ** -0.5, dtype=dtype))
        self.wo = nn.Parameter(seeds.randn(nh * hd, h, std=(nh * hd) ** -0.5, dtype=dtype))
        self.moe_norm = nn.Parameter(torch.ones(h, device=dev, dtype=dtype))
        self.router = nn.Parameter(seeds.randn(h, cfg.num_experts, std=h ** -0.5,
                                               dtype=dtype))
        si = cfg.shared_intermediate
        self.shared_gate = nn.Parameter(seeds.randn(h, si, std=h ** -0.5, dtype=dtype))
        self.shared_up = nn.Parameter(seeds.randn(h, si, std=h ** -0.5, dtype=dtype))
        self.shared_down = nn.Parameter(seeds.randn(si, h, std=si ** -0.5, dtype=dtype))
        # Routed experts: only this rank's slice, each expert from its own seed.
        lo, hi = backend.local_expert_range
        mi = cfg.moe_intermediate
        base = 1_000 * (layer + 1) * 4
        self.w_gate = nn.Parameter(torch.stack([
            seeds.randn(h, mi, std=h ** -0.5, dtype=dtype, key=(base + e) * 4 + 1_000_000_000)
            for e in range(lo, hi)]))
        self.w_up = nn.Parameter(torch.stack([
            seeds.randn(h, mi, std=h ** -0.5, dtype=dtype, key=(base + e) * 4 + 1_000_000_001)
            for e in range(lo, hi)]))
        self.w_down = nn.Parameter(torch.stack([
            seeds.randn(mi, h, std=mi ** -0.5, dtype=dtype, key=(base + e) * 4 + 1_000_000_002)
            for e in range(lo, hi)]))
        # KV cache [slot, head, position, head_dim]: a slot's rows gather straight into
        # the [batch, heads, seq, head_dim] layout attention reads.
        self.register_buffer("k_cache", torch.zeros(cfg.max_batch, nh, cfg.max_seq_len, hd,
                                                    device=dev, dtype=dtype),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros_like(self.k_cache), persistent=False)

    def gather_kv(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cached keys and values of ``slots`` (``[batch]`` int64), each
        ``[batch, heads, seq, head_dim]``: a copy, in the layout attention reads.

        The copy does not depend on the layer's input, only on earlier steps' cache rows,
        so the decoder makes it one stretch early, next to the previous layer's experts
        (see ``step``). ``attention`` then adds the step's own key and value.
        """
        return self.gather_keys(slots), self.gather_values(slots)

    def gather_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """The keys half of ``gather_kv`` (``step`` may take it a stretch earlier)."""
        return self.k_cache.index_select(0, slots)

    def gather_values(self, slots: torch.Tensor) -> torch.Tensor:
        """The values half of ``gather_kv`` (``step`` may take it a stretch earlier)."""
        return self.v_cache.index_select(0, slots)

    def attention(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One query per sequence against its cache rows ``kv`` (from ``gather_kv``, taken
        before this step's write) and its own new key and value. Writes the new key and
        value into the cache and, in place, into ``kv``: a gathered copy serves one call."""
        cfg = self.cfg
        b = x.shape[0]
        q, k, v = (x @ self.wqkv).view(b, 3, cfg.num_heads, cfg.head_dim).unbind(1)
        self.k_cache[slots, :, positions] = k  # [b, heads, head_dim] at each (slot, pos)
        self.v_cache[slots, :, positions] = v
        keys, values = kv
        rows = torch.arange(b, device=x.device)
        keys[rows, :, positions] = k  # the gathered copy predates this step's write
        values[rows, :, positions] = v
        seq = torch.arange(cfg.max_seq_len, device=x.device)
        visible = (seq[None, :] <= positions[:, None])[:, None, None, :]  # [b, 1, 1, seq]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                             attn_mask=visible)  # [b, heads, 1, head_dim]
        return out.reshape(b, cfg.num_heads * cfg.head_dim) @ self.wo

    def moe(self, x: torch.Tensor, shared_experts: Callable[[torch.Tensor], torch.Tensor]
            ) -> torch.Tensor:
        """Router and expert exchange of ``x`` ``[batch, hidden]``; ``shared_experts`` goes
        to ``moe_exchange`` and must be called with this ``x`` (``step`` may have computed
        the shared expert from it already)."""
        cfg = self.cfg
        router_probs = (x @ self.router).float().softmax(-1)
        topk_weights, topk_idx = torch.topk(router_probs, cfg.top_k, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
        return moe_exchange(self.backend, x, topk_idx, topk_weights.to(x.dtype),
                            swiglu_experts(self.w_gate, self.w_up, self.w_down),
                            shared_experts=shared_experts, site_prefix=self.site_prefix)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.shared_gate) * (x @ self.shared_up)) @ self.shared_down

    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
                ) -> torch.Tensor:
        """The layer alone: ``[batch, hidden]`` in and out (it gathers its own cache)."""
        return self.step(x, positions, slots, None, [])

    def step(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             next_layer: MoELayer | None,
             kv_handover: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One layer inside the decoder, ``[batch, hidden]`` in and out.

        ``kv_handover`` passes gathered caches from layer to layer, one list per forward:
        ``step`` takes this layer's copy out of it (or gathers one when it is empty) and
        puts ``next_layer``'s copy in. A list the callee empties, not an argument and a
        return value, so that no caller holds a spent copy while the layer's MoE yields.
        (``MoEDecoder.forward`` calls ``step``, not the module: forward hooks registered on
        a layer do not run there.)

        What runs between the yields of a layer (the two compute stretches, which DBO
        overlaps with the other microbatch's transfers):

        * before the dispatch: attention (its QKV / output projections, the cache write,
          SDPA), the MoE norm and the router; and the movable pieces the
          ``schedule.placement`` of this microbatch's size puts there, in this order: the
          next layer's ``gather_keys``, its ``gather_values``, the shared expert;
        * between dispatch and combine (``shared_experts=`` of ``moe_exchange``, called
          before the routed experts): the other movable pieces (shared expert first, then
          the gathers; ``gather_kv`` when both gathers are here); then the routed experts.

        The shared expert and the gathers depend only on what is known before the
        dispatch, so they can go into either stretch; they go where the two stretches come
        out closest in length. With two microbatches a transfer can hide only the other
        microbatch's stretch, so the compute stream idles for the difference between the
        stretches in every layer (``coop_dbo.planner`` simulates it and chooses; figures in
        ``bench/RESULTS.md``). Where each piece goes is the ``SchedulePolicy``'s choice;
        no placement changes a result.
        """
        kv = kv_handover.pop() if kv_handover else self.gather_kv(slots)
        x = x + self.attention(rms_norm(x, self.attn_norm, self.cfg.rms_eps), positions,
                               slots, kv)
        del kv  # spent: not held through the MoE's yields (and a CUDA graph's pool)
        h = rms_norm(x, self.moe_norm, self.cfg.rms_eps)
        place = self.schedule.placement(h.shape[0])
        keys_early = (next_layer.gather_keys(slots)
                      if next_layer is not None and place.keys_before else None)
        values_early = (next_layer.gather_values(slots)
                        if next_layer is not None and place.values_before else None)
        shared_early = self.shared_expert(h) if place.shared_before else None

        def after_dispatch(moe_input: torch.Tensor) -> torch.Tensor:
            if shared_early is None:
                out = self.shared_expert(moe_input)
            elif moe_input is h:
                out = shared_early
            else:
                raise RuntimeError(
                    "MoELayer.moe called its shared_experts callable with another tensor "
                    "than the one step() passed it; the shared expert was already computed "
                    "from that one (its placement runs the shared expert before the "
                    "dispatch). Pass moe's own input x to shared_experts.")
            if next_layer is not None:
                if keys_early is None and values_early is None:
                    kv_handover[:] = [next_layer.gather_kv(slots)]
                else:
                    kv_handover[:] = [(
                        next_layer.gather_keys(slots) if keys_early is None else keys_early,
                        next_layer.gather_values(slots) if values_early is None
                        else values_early)]
            return out

        # A subclass's ``moe`` may skip the shared experts; the next layer then gathers its
        # own cache.
        return x + self.moe(h, after_dispatch)


def _check_schedule(schedule: object) -> None:
    if not isinstance(schedule, SchedulePolicy):
        raise TypeError(f"schedule must be a coop_dbo.schedule.SchedulePolicy, got "
                        f"{type(schedule).__name__}.")


class MoEDecoder(nn.Module):
    """The reference decoder. ``forward(tokens, positions, slots) -> logits``.

    Args:
        cfg: model shape.
        backend: MoE communication backend (default: ``SingleProcessBackend`` with no
            simulated transfer time).
        schedule: where movable work runs relative to the yields (``SchedulePolicy``;
            default ``SchedulePolicy()``; a planned one from
            ``coop_dbo.planner.SchedulePlan.policy()``). Never changes the result;
            ``set_schedule`` swaps it later.
        dtype / device: parameter dtype and device.

    ``forward`` arguments, all ``[batch]`` int64 on the model's device:
        tokens: the new token of each sequence.
        positions: its position (``< max_seq_len``).
        slots: the KV-cache slot of each sequence (``< max_batch``, distinct).
    Returns ``[batch, vocab_size]`` float32 logits.

    ``decode(tokens, positions, slots, num_steps)`` runs ``num_steps`` such steps with
    greedy sampling in between and returns the ``[batch, num_steps]`` int64 tokens.
    """

    def __init__(self, cfg: MoEConfig, backend: MoEBackend | None = None, *,
                 schedule: SchedulePolicy | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        device = torch.device(device)
        schedule = SchedulePolicy() if schedule is None else schedule
        _check_schedule(schedule)
        self.schedule = schedule
        if backend is None:
            backend = SingleProcessBackend(cfg.num_experts)
        if backend.num_experts != cfg.num_experts:
            raise ValueError(f"backend routes {backend.num_experts} experts but the config "
                             f"has {cfg.num_experts}.")
        if cfg.top_k > cfg.num_experts:
            raise ValueError(f"top_k={cfg.top_k} is larger than num_experts="
                             f"{cfg.num_experts}.")
        self.cfg = cfg
        self.backend = backend
        seeds = _Seeds(cfg.seed, device)
        self.embed = nn.Parameter(seeds.randn(cfg.vocab_size, cfg.hidden, std=1.0,
                                              dtype=dtype))
        self.layers = nn.ModuleList(MoELayer(cfg, i, backend, seeds, dtype, schedule)
                                    for i in range(cfg.num_layers))
        self.final_norm = nn.Parameter(torch.ones(cfg.hidden, device=device, dtype=dtype))
        self.lm_head = nn.Parameter(seeds.randn(cfg.hidden, cfg.vocab_size,
                                                std=cfg.hidden ** -0.5, dtype=dtype))
        # Inference only. With autograd on, the in-place KV-cache writes would chain every
        # step's graph onto the cache buffers and keep all activations alive.
        self.requires_grad_(False)

    def set_schedule(self, schedule: SchedulePolicy) -> None:
        """Use ``schedule`` from the next call on, in every layer (e.g. a plan loaded from a
        calibration file, or each placement in turn while profiling). A CUDA graph keeps
        the placement it was captured with."""
        _check_schedule(schedule)
        self.schedule = schedule
        for layer in self.layers:
            if isinstance(layer, MoELayer):
                layer.schedule = schedule

    def check_inputs(self, tokens: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, num_steps: int = 1) -> None:
        """Raise ``ValueError`` for inputs ``forward`` (``num_steps`` = 1) or ``decode``
        cannot take. Value ranges are checked on CPU only (see below)."""
        dev = self.embed.device
        for name, t in (("tokens", tokens), ("positions", positions), ("slots", slots)):
            if t.dim() != 1 or t.dtype != torch.int64:
                raise ValueError(f"{name} must be a 1-D int64 tensor [batch], got "
                                 f"{t.dtype} of shape {tuple(t.shape)}.")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but the model is on {dev}: "
                                 "move the inputs to the model's device.")
            if t.shape != tokens.shape:
                raise ValueError("tokens, positions and slots must have the same length.")
        if dev.type == "cpu" and tokens.numel():
            # Range checks read values on the host: done on CPU only, where that is free
            # (on CUDA it would sync every step and could not be captured).
            cfg = self.cfg
            last_start = cfg.max_seq_len - num_steps + 1  # num_steps positions each
            for name, t, hi in (("tokens", tokens, cfg.vocab_size),
                                ("positions", positions, last_start),
                                ("slots", slots, cfg.max_batch)):
                lo_v, hi_v = int(t.min()), int(t.max())
                if lo_v < 0 or hi_v >= hi:
                    steps = name == "positions" and num_steps > 1
                    raise ValueError(
                        f"{name} must be in [0, {hi})"
                        + (f" (decoding {num_steps} steps from each position within "
                           f"max_seq_len={cfg.max_seq_len})" if steps else "")
                        + f", got values from {lo_v} to {hi_v}."
                        + (" Decode fewer steps for the sequences near the end, or build "
                           "the model with a larger max_seq_len." if steps else ""))
            if slots.unique().numel() != slots.numel():
                raise ValueError("slots must be distinct: two sequences of one batch cannot "
                                 "share a KV-cache slot.")

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        self.check_inputs(tokens, positions, slots)
        return self._logits(tokens, positions, slots)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               num_steps: int) -> torch.Tensor:
        """``num_steps`` greedy decode steps in one call.

        Arguments as for ``forward``; every position up to ``positions + num_steps - 1``
        must be below ``max_seq_len``. Step ``i`` feeds each sequence the argmax of its
        previous step's logits at position ``positions + i`` and writes that position's
        cache rows. Returns the ``[batch, num_steps]`` int64 tokens: column ``i`` is the
        argmax of step ``i``'s logits, so ``tokens`` followed by the columns is the greedy
        continuation.

        Why: a sequence's next token depends only on its own logits, so under DBO a
        microbatch goes on to its next step while the other one still waits for its last
        combine. Captured as one CUDA graph, the pipeline fills and drains once per
        ``num_steps`` steps instead of once per step (``bench/RESULTS.md`` measures it).

        Warning (padding):
            A padding row that repeats a real row (``DBOGraphRunner``'s default) decodes
            that sequence twice, possibly in another microbatch whose GEMM shapes round
            differently; from the second step on its cache writes may then differ from
            the real row's. Pad such graphs into a scratch KV-cache slot instead.
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
        if num_steps > self.cfg.max_seq_len:
            raise ValueError(f"num_steps={num_steps} is more than max_seq_len="
                             f"{self.cfg.max_seq_len}: no sequence has room for that many "
                             "new tokens. Decode fewer steps per call or build the model with "
                             "a larger max_seq_len.")
        self.check_inputs(tokens, positions, slots, num_steps)
        out = []
        kv_handover: list[tuple[torch.Tensor, torch.Tensor]] = []
        for step in range(num_steps):
            tokens = self._logits(tokens, positions, slots, kv_handover,
                                  next_step=step + 1 < num_steps).argmax(-1)
            out.append(tokens)
            positions = positions + 1
        return torch.stack(out, dim=1)

    def _logits(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                kv_handover: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                next_step: bool = False) -> torch.Tensor:
        """One step's float32 logits. ``kv_handover`` (see ``MoELayer.step``) may carry
        the first layer's cache copy in from the previous step; with ``next_step`` the
        last layer gathers it for the next one, next to its experts as every layer does
        for the following layer. By then the first layer has written this step's row."""
        x = self.embed.index_select(0, tokens)
        layers: list[MoELayer] = [m for m in self.layers if isinstance(m, MoELayer)]
        kv_handover = [] if kv_handover is None else kv_handover
        for i, layer in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else layers[0] if next_step else None
            x = layer.step(x, positions, slots, nxt, kv_handover)
        return (rms_norm(x, self.final_norm, self.cfg.rms_eps) @ self.lm_head).float()
