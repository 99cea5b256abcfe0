"""Adapters for the ``transformers`` MoE blocks that differ from the unified experts
interface (transformers 5.17); each checks the block it is given and says what does not
fit. Registered on import, by qualified class name (transformers is not imported here).

=========================  =====================================================
block                      how its routed experts reach ``moe_exchange``
=========================  =====================================================
``Llama4TextMoe``          the block's forward: the router's top-k, each token's
                           input scaled by its expert's score (Llama 4 scales
                           inputs, not outputs), one exchange row per (token,
                           expert); the shared expert beside the dispatch at
                           top-1, after the combine otherwise
``DbrxFFN``                its experts' forward; weights ``w1`` / ``v1`` / ``w2``
                           ``[E * F, H]``
``AriaTextMoELayer``       its experts' ``forward(hidden_states, router_logits)``,
                           routed by the experts' own ``route_tokens_to_experts``
``JetMoeMoE``              the block's forward: its router's logits, top-k and
                           softmax; ``input_linear`` / ``output_linear`` experts
                           and the output bias
``JetMoeMoA``              left local (no exchange): its experts are query and
                           output projections around attention, whose per-expert
                           outputs are not summed, which ``moe_exchange`` does
``LongcatFlashMoE``        its experts' forward; the zero-computation experts
                           (ids ``>= n_routed_experts``, identity) are added
                           locally, their rows go to expert 0 with weight 0
=========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..backends import ExpertBatch, MoEBackend
from ..errors import UnsupportedModelError
from ..moe_hooks import moe_exchange
from .adapters import _ADAPTERS, MoEAdapter, _describe, hook_forward, routed_forward

__all__ = [
    "Llama4MoEAdapter",
    "DbrxAdapter",
    "AriaAdapter",
    "JetMoeAdapter",
    "LocalBlockAdapter",
    "LongcatFlashAdapter",
]


def _need(block: nn.Module, spec: dict[str, tuple[int, ...] | None]) -> str | None:
    """``None`` when ``block`` has every attribute of ``spec`` (a tensor of that many dims
    where a tuple of dims is given, any value for ``None``), else what is missing."""
    for path, dims in spec.items():
        v: Any = block
        for part in path.split("."):
            v = getattr(v, part, None)
        if v is None:
            return f"{type(block).__name__} has no .{path}"
        if dims is not None and (not isinstance(v, torch.Tensor) or v.dim() not in dims):
            shape = _describe(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            return f"{type(block).__name__}.{path} is {shape}, not {dims[0]}-D"
    return None


class _CheckedAdapter(MoEAdapter):
    """An adapter whose ``num_experts`` raises what ``mismatch`` finds."""

    def _num(self, block: nn.Module) -> int:
        raise NotImplementedError

    def num_experts(self, block: nn.Module) -> int:
        why = self.mismatch(block)
        if why is not None:
            raise UnsupportedModelError(f"{type(self).__name__} does not fit "
                                        f"{type(block).__name__}: {why}.")
        return self._num(block)


def _linear_experts(w_in: Callable[[], torch.Tensor], w_out: Callable[[], torch.Tensor],
                    gate: Callable[[torch.Tensor], torch.Tensor], lo: int, hi: int,
                    out_bias: Callable[[], torch.Tensor] | None = None
                    ) -> Callable[[ExpertBatch], torch.Tensor]:
    """``experts`` for ``moe_exchange``: ``gate(x @ w_in[e]) @ w_out[e]`` per local expert.

    ``w_in()`` / ``w_out()`` give all experts' weights ``[E, in, out]`` (read at each call);
    ``gate`` maps ``[rows, 2I]`` (or ``[rows, I]``) to ``[rows, I]``.
    """
    def run(batch: ExpertBatch) -> torch.Tensor:
        a, b = w_in()[lo:hi], w_out()[lo:hi]
        y = batch.linear(gate(batch.linear(batch.x.to(a.dtype), a)), b)
        return y

    return run


# -- Llama 4 ---------------------------------------------------------------------------------

class Llama4MoEAdapter(_CheckedAdapter):
    """``Llama4TextMoe``: router top-k scores scale each token's input to its expert."""

    def mismatch(self, block: nn.Module) -> str | None:
        why = _need(block, {"router.weight": (2,), "router.top_k": None,
                            "experts.gate_up_proj": (3,), "experts.down_proj": (3,),
                            "experts.act_fn": None, "shared_expert": None})
        if why is not None:
            return why
        b: Any = block
        e, h2i = b.experts.gate_up_proj.shape[0], b.experts.gate_up_proj.shape[2]
        if b.router.weight.shape[0] != e or b.experts.down_proj.shape[:2] != (e, h2i // 2):
            return (f"router {_describe(b.router.weight.shape)}, gate_up_proj "
                    f"{_describe(b.experts.gate_up_proj.shape)} and down_proj "
                    f"{_describe(b.experts.down_proj.shape)} do not chain")
        return None

    def _num(self, block: nn.Module) -> int:
        return int(getattr(block, "experts").gate_up_proj.shape[0])  # noqa: B009

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        b: Any = block
        lo, hi = backend.local_expert_range
        experts = b.experts

        def gate(h: torch.Tensor) -> torch.Tensor:
            g, up = h.chunk(2, dim=-1)
            return up * experts.act_fn(g)

        experts_fn = _linear_experts(lambda: experts.gate_up_proj, lambda: experts.down_proj,
                                     gate, lo, hi)

        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """``[..., H]`` -> (``[tokens, H]``, router logits ``[tokens, E]``)."""
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            scores, logits = b.router(x)
            k = b.router.top_k
            top = torch.topk(logits, k, dim=1).indices      # the router's own choice
            s = scores.gather(1, top)                        # [T, k] sigmoid scores
            rows = (x[:, None, :] * s[..., None]).reshape(-1, x.shape[-1])
            ones = torch.ones(rows.shape[0], 1, dtype=s.dtype, device=s.device)
            shared = (lambda _: b.shared_expert(x)) if k == 1 else None
            out = moe_exchange(backend, rows, top.reshape(-1, 1), ones, experts_fn,
                               shared_experts=shared, site_prefix=site_prefix)
            out = out.to(x.dtype)
            if k > 1:
                out = b.shared_expert(x) + out.view(-1, k, x.shape[-1]).sum(1)
            return out, logits

        return hook_forward(block, forward)


# -- DBRX ------------------------------------------------------------------------------------

class DbrxAdapter(_CheckedAdapter):
    """``DbrxFFN``: experts ``w1`` / ``v1`` / ``w2`` ``[E * F, H]``, gated ``act(x w1^T) *
    (x v1^T)``, then ``@ w2[e]``."""

    def mismatch(self, block: nn.Module) -> str | None:
        why = _need(block, {"experts.num_experts": None, "experts.ffn_hidden_size": None,
                            "experts.mlp.w1": (2,), "experts.mlp.v1": (2,),
                            "experts.mlp.w2": (2,), "experts.mlp.activation_fn": None})
        if why is not None:
            return why
        e: Any = getattr(block, "experts")  # noqa: B009
        rows = e.num_experts * e.ffn_hidden_size
        for w in ("w1", "v1", "w2"):
            if getattr(e.mlp, w).shape[0] != rows:
                return (f"DbrxExperts.mlp.{w} {_describe(getattr(e.mlp, w).shape)} is not "
                        f"[{e.num_experts} x {e.ffn_hidden_size}, H]")
        return None

    def _num(self, block: nn.Module) -> int:
        return int(getattr(block, "experts").num_experts)  # noqa: B009

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        experts: Any = getattr(block, "experts")  # noqa: B009
        mlp, lo, hi = experts.mlp, *backend.local_expert_range
        shape = (experts.num_experts, experts.ffn_hidden_size, -1)

        def run(batch: ExpertBatch) -> torch.Tensor:
            w1 = mlp.w1.view(shape)[lo:hi].transpose(-2, -1)
            v1 = mlp.v1.view(shape)[lo:hi].transpose(-2, -1)
            w2 = mlp.w2.view(shape)[lo:hi]
            x = batch.x.to(w1.dtype)
            return batch.linear(mlp.activation_fn(batch.linear(x, w1)) * batch.linear(x, v1),
                                w2)

        return hook_forward(experts, routed_forward(backend, run, site_prefix))


# -- Aria ------------------------------------------------------------------------------------

class AriaAdapter(_CheckedAdapter):
    """``AriaTextMoELayer``: experts ``fc1`` ``[E, H, 2I]`` / ``fc2`` ``[E, I, H]``,
    ``silu(first half) * second half``, routed by ``experts.route_tokens_to_experts``."""

    def mismatch(self, block: nn.Module) -> str | None:
        return _need(block, {"experts.fc1.weight": (3,), "experts.fc2.weight": (3,),
                             "experts.route_tokens_to_experts": None})

    def _num(self, block: nn.Module) -> int:
        return int(getattr(block, "experts").fc1.weight.shape[0])  # noqa: B009

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        experts: Any = getattr(block, "experts")  # noqa: B009
        lo, hi = backend.local_expert_range

        def gate(h: torch.Tensor) -> torch.Tensor:
            projection, g = h.chunk(2, dim=-1)
            return nn.functional.silu(projection) * g

        run = _linear_experts(lambda: experts.fc1.weight, lambda: experts.fc2.weight, gate,
                              lo, hi)

        def forward(hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
            """``[T, H]``, ``[T, E]`` -> ``[T, H]``."""
            idx, weights = experts.route_tokens_to_experts(router_logits)
            out = moe_exchange(backend, hidden_states, idx.to(torch.int64), weights, run,
                               site_prefix=site_prefix)
            return out.to(hidden_states.dtype)

        return hook_forward(experts, forward)


# -- JetMoe ----------------------------------------------------------------------------------

class JetMoeAdapter(_CheckedAdapter):
    """``JetMoeMoE``: router logits, top-k, softmax over the top-k; experts
    ``input_linear`` ``[E, 2I, H]`` / ``output_linear`` ``[E, H, I]``; plus ``bias``."""

    def mismatch(self, block: nn.Module) -> str | None:
        return _need(block, {"router.layer.weight": (2,), "router.top_k": None,
                             "input_linear.weight": (3,), "output_linear.weight": (3,),
                             "bias": (1,), "activation": None})

    def _num(self, block: nn.Module) -> int:
        return int(getattr(block, "input_linear").weight.shape[0])  # noqa: B009

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        b: Any = block
        lo, hi = backend.local_expert_range

        def gate(h: torch.Tensor) -> torch.Tensor:
            first, second = h.chunk(2, dim=-1)
            return b.activation(first) * second

        run = _linear_experts(lambda: b.input_linear.weight.transpose(-2, -1),
                              lambda: b.output_linear.weight.transpose(-2, -1), gate, lo, hi)

        def forward(layer_input: torch.Tensor) -> torch.Tensor:
            """``[B, S, H]`` -> ``[B, S, H]``."""
            x = layer_input.reshape(-1, layer_input.shape[-1])
            logits = b.router.layer(x).float()
            top_logits, top = logits.topk(b.router.top_k, dim=1)
            gates = torch.softmax(top_logits, dim=1).type_as(x)
            out = moe_exchange(backend, x, top, gates, run, site_prefix=site_prefix)
            return out.to(x.dtype).view(layer_input.shape) + b.bias

        return hook_forward(block, forward)


class LocalBlockAdapter(MoEAdapter):
    """Recognises a block whose experts stay local: no exchange, no yields.

    Args:
        reason: why, for ``MoEHooks.local`` readers and the docs.
    """

    exchanges = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def mismatch(self, block: nn.Module) -> str | None:
        return None

    def num_experts(self, block: nn.Module) -> int:
        return int(getattr(block, "num_experts", 0))

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        return lambda: None


# -- LongCat-Flash ---------------------------------------------------------------------------

class LongcatFlashAdapter(_CheckedAdapter):
    """``LongcatFlashMoE``: routed experts through the exchange, zero-computation
    (identity) experts ``n_routed_experts ..`` added locally."""

    def mismatch(self, block: nn.Module) -> str | None:
        why = _need(block, {"experts.num_routed_experts": None, "experts.gate_up_proj": (3,),
                            "experts.down_proj": (3,), "experts.act_fn": None})
        if why is not None:
            return why
        e: Any = getattr(block, "experts")  # noqa: B009
        if e.down_proj.shape[0] != e.num_routed_experts:
            return (f"down_proj {_describe(e.down_proj.shape)} does not hold "
                    f"{e.num_routed_experts} routed experts")
        return None

    def _num(self, block: nn.Module) -> int:
        return int(getattr(block, "experts").num_routed_experts)  # noqa: B009

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        experts: Any = getattr(block, "experts")  # noqa: B009
        n = int(experts.num_routed_experts)
        lo, hi = backend.local_expert_range

        def gate(h: torch.Tensor) -> torch.Tensor:
            g, up = h.chunk(2, dim=-1)
            return experts.act_fn(g) * up

        run = _linear_experts(lambda: experts.gate_up_proj[:n].transpose(-2, -1),
                              lambda: experts.down_proj.transpose(-2, -1), gate, lo, hi)
        exchange = routed_forward(backend, run, site_prefix)

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
            """``[T, H]``, ``[T, k]``, ``[T, k]`` -> ``[T, H]``."""
            routed = top_k_index < n
            identity = (top_k_weights * ~routed).sum(-1, keepdim=True)
            out = exchange(hidden_states, torch.where(routed, top_k_index, 0),
                           torch.where(routed, top_k_weights, 0))
            return out + (hidden_states * identity).to(hidden_states.dtype)

        return hook_forward(experts, forward)


_T = "transformers.models."
_ADAPTERS.update({
    _T + "llama4.modeling_llama4.Llama4TextMoe": Llama4MoEAdapter(),
    _T + "dbrx.modeling_dbrx.DbrxFFN": DbrxAdapter(),
    _T + "aria.modeling_aria.AriaTextMoELayer": AriaAdapter(),
    _T + "jetmoe.modeling_jetmoe.JetMoeMoE": JetMoeAdapter(),
    _T + "jetmoe.modeling_jetmoe.JetMoeMoA": LocalBlockAdapter(
        "mixture-of-attention experts: per-expert query and output projections around "
        "attention, whose outputs are not summed per token"),
    _T + "longcat_flash.modeling_longcat_flash.LongcatFlashMoE": LongcatFlashAdapter(),
})
