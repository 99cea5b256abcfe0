"""MoE hooks for ``transformers`` models: adapters that route MoE blocks through ``moe_exchange``.

``install_moe_hooks(model)`` finds the model's own MoE blocks and routes their routed-expert
path through ``coop_dbo.moe_hooks.moe_exchange`` (dispatch, experts, combine, with the DBO
yields), without editing transformers' source: it sets an instance attribute ``forward``
on each block's fused experts module, keeping the class's forward, and
``remove_moe_hooks(model)`` deletes it again. Router, shared experts and everything else
of the block run as before.

Recognised out of the box (transformers 5.x, fused experts with 3-D weights and
``forward(hidden_states, top_k_index, top_k_weights)``):

================================  ==========================================
block class                       families
================================  ==========================================
``MixtralSparseMoeBlock``         Mixtral
``Qwen3MoeSparseMoeBlock``        Qwen3-MoE
``DeepseekV3MoE``                 DeepSeek-V3 (dense first layers untouched)
================================  ==========================================

Another block class: ``register_moe_adapter(BlockClass, adapter)``; ``FusedExpertsAdapter()``
fits any block whose ``.experts`` is a transformers fused-experts module (the
``@use_experts_implementation`` kind), a subclass of ``MoEAdapter`` anything else.

The experts computation matches transformers' own ``grouped_mm`` experts implementation
(``transformers.integrations.moe.grouped_mm_experts_forward``): per local expert
``down(_apply_gate(x @ gate_up^T))`` on the rows the backend delivers, through
``ExpertBatch.linear`` (``torch._grouped_mm`` for the flat layout, ``bmm`` for deep_ep's
padded one); the backend applies the routing weights and sums per token.

Expert parallelism: with a backend of ``world_size > 1`` (e.g.
``TorchDistributedBackend(num_experts)``), rank ``r`` computes only its local experts
``backend.local_expert_range`` from its copy of the HF weights (the other experts' weights
stay in memory but are not read); attention and everything else is data-parallel, each
rank running its own batch. Every rank must hold the same weights (same checkpoint or
seed).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..backends import ExpertBatch, MoEBackend, SingleProcessBackend
from ..errors import UnsupportedModelError
from ..greenlet_sched import dbo_current_ubatch_id
from ..moe_hooks import moe_exchange

__all__ = [
    "MoEAdapter",
    "FusedExpertsAdapter",
    "MoEHooks",
    "install_moe_hooks",
    "remove_moe_hooks",
    "register_moe_adapter",
    "unregister_moe_adapter",
    "fused_experts_fn",
]

_HANDLE_ATTR = "_coop_dbo_moe_hooks"


# -- adapters -----------------------------------------------------------------------------

class MoEAdapter:
    """How to route one MoE block class through ``moe_exchange``.

    Subclasses implement ``num_experts(block)`` and ``install(block, backend, *,
    site_prefix="")``; the latter changes the block instance (never its class) so that its
    routed experts go through ``moe_exchange(backend, x, topk_idx, topk_weights, experts_fn,
    site_prefix=site_prefix)``, and returns a function that undoes exactly that change.
    ``install_moe_hooks`` passes the block's module path plus ``"."`` as ``site_prefix``
    (e.g. ``"model.layers.3.mlp."``), so that the symmetry check tells MoE layers apart;
    an adapter whose ``install`` takes no ``site_prefix`` still works, with unprefixed
    sites.
    """

    def num_experts(self, block: nn.Module) -> int:
        raise NotImplementedError

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        raise NotImplementedError


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


def fused_experts_fn(experts: nn.Module, backend: MoEBackend
                     ) -> Callable[[ExpertBatch], torch.Tensor]:
    """The ``experts`` callable of ``moe_exchange`` for a transformers fused-experts module.

    ``experts`` holds ``gate_up_proj`` ``[E, 2I, H]`` (or ``up_proj`` ``[E, I, H]`` when
    ``has_gate`` is false) and ``down_proj`` ``[E, H, I]`` (``[E, in, out]`` instead when
    ``is_transposed``), optional ``*_bias`` ``[E, out]``, and ``_apply_gate`` / ``act_fn``.
    The callable computes, for the rows of each local expert ``e`` in
    ``backend.local_expert_range``, ``down_e(gate(up_e(x)))`` in the weights' dtype, and
    returns ``[rows, H]`` (flat layout) or ``[E_local, rows, H]`` (padded layout). Weights are
    read at every call, so ``model.to(...)`` after installing is fine.
    """
    lo, hi = backend.local_expert_range
    has_gate = bool(getattr(experts, "has_gate", True))
    transposed = bool(getattr(experts, "is_transposed", False))
    has_bias = bool(getattr(experts, "has_bias", False))
    w_in_name = "gate_up_proj" if has_gate else "up_proj"
    apply_gate = getattr(experts, "_apply_gate", None)
    act_fn = getattr(experts, "act_fn", None)
    if has_gate and apply_gate is None:
        if act_fn is None:
            raise UnsupportedModelError(
                f"{type(experts).__name__} has neither _apply_gate nor act_fn: write a "
                "MoEAdapter for its block (see coop_dbo.hf.MoEAdapter).")

        def apply_gate(h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            return act_fn(gate) * up

    def bias_rows(batch: ExpertBatch, bias: torch.Tensor, rows: int) -> torch.Tensor:
        """``bias`` ``[E_local, out]`` laid out like the rows of ``batch``."""
        if batch.layout == "padded":
            return bias[:, None, :]
        assert batch.expert_offsets is not None
        row = torch.arange(rows, device=bias.device, dtype=batch.expert_offsets.dtype)
        e = torch.searchsorted(batch.expert_offsets, row, right=True)
        return bias[e.clamp_(max=bias.shape[0] - 1)]

    weights: Any = experts  # its weights are attributes an nn.Module does not declare

    def run(batch: ExpertBatch) -> torch.Tensor:
        w_in = getattr(experts, w_in_name)[lo:hi]
        w_out = weights.down_proj[lo:hi]
        if not transposed:  # stored [E, out, in] like nn.Linear; grouped_mm wants [E, in, out]
            w_in = w_in.transpose(-2, -1)
            w_out = w_out.transpose(-2, -1)
        x = batch.x.to(w_in.dtype)
        rows = x.shape[-2]
        h = batch.linear(x, w_in)
        if has_bias:
            h = h + bias_rows(batch, getattr(experts, w_in_name + "_bias")[lo:hi], rows)
        h = apply_gate(h) if has_gate else act_fn(h)  # type: ignore[misc]  # both checked above
        y = batch.linear(h, w_out)
        if has_bias:
            y = y + bias_rows(batch, weights.down_proj_bias[lo:hi], rows)
        return y

    return run


class FusedExpertsAdapter(MoEAdapter):
    """For blocks whose ``.<experts_attr>`` is a transformers fused-experts module.

    The hook replaces that module's ``forward(hidden_states, top_k_index, top_k_weights)``
    (on the instance) by ``moe_exchange`` over ``fused_experts_fn``; the block's router,
    shared experts and reshapes are untouched.

    Args:
        experts_attr: the attribute of the block holding the experts module.
    """

    def __init__(self, experts_attr: str = "experts") -> None:
        self.experts_attr = experts_attr

    def _experts(self, block: nn.Module) -> nn.Module:
        experts = getattr(block, self.experts_attr, None)
        if not isinstance(experts, nn.Module):
            raise UnsupportedModelError(
                f"{type(block).__name__} has no .{self.experts_attr} module, which "
                "FusedExpertsAdapter expects: pass FusedExpertsAdapter(experts_attr=...) or "
                "write a MoEAdapter for it.")
        w_in = _param(experts, "gate_up_proj") if getattr(experts, "has_gate", True) else \
            _param(experts, "up_proj")
        w_out = _param(experts, "down_proj")
        if w_in is None or w_out is None or w_in.dim() != 3 or w_out.dim() != 3 or \
                not isinstance(getattr(experts, "num_experts", None), int):
            raise UnsupportedModelError(
                f"{type(block).__name__}.{self.experts_attr} is a "
                f"{type(experts).__name__}, not a transformers fused-experts module (3-D "
                "gate_up_proj / down_proj weights and num_experts): write a MoEAdapter for "
                f"{type(block).__name__} and register it with register_moe_adapter.")
        return experts

    def num_experts(self, block: nn.Module) -> int:
        experts: Any = self._experts(block)  # a transformers experts module (duck-typed)
        return int(experts.num_experts)

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        experts = self._experts(block)
        experts_fn = fused_experts_fn(experts, backend)
        had = "forward" in experts.__dict__
        previous = experts.__dict__.get("forward")

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
            """``[tokens, H]``, int64 ``[tokens, k]``, ``[tokens, k]`` -> ``[tokens, H]``."""
            out = moe_exchange(backend, hidden_states, top_k_index, top_k_weights, experts_fn,
                               site_prefix=site_prefix)
            return out.to(hidden_states.dtype)

        forward.__coop_dbo_hook__ = True  # type: ignore[attr-defined]  # marks the hook
        experts.__dict__["forward"] = forward  # an instance attribute: the class keeps its own

        def undo() -> None:
            if had:
                experts.__dict__["forward"] = previous
            else:
                experts.__dict__.pop("forward", None)

        return undo


# Keys: block classes, or "module.QualName" strings for the built-in transformers blocks
# (so that transformers is not imported to fill the registry).
_ADAPTERS: dict[Any, MoEAdapter] = {
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock": FusedExpertsAdapter(),
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock":
        FusedExpertsAdapter(),
    "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE": FusedExpertsAdapter(),
}


def register_moe_adapter(block_cls: type, adapter: MoEAdapter) -> None:
    """Make ``install_moe_hooks`` hook blocks of ``block_cls`` (and subclasses) with ``adapter``."""
    if not isinstance(block_cls, type) or not issubclass(block_cls, nn.Module):
        raise TypeError(f"block_cls must be an nn.Module subclass, got {block_cls!r}.")
    if not isinstance(adapter, MoEAdapter):
        raise TypeError(f"adapter must be a coop_dbo.hf.MoEAdapter (e.g. "
                        f"FusedExpertsAdapter()), got {type(adapter).__name__}.")
    _ADAPTERS[block_cls] = adapter


def unregister_moe_adapter(block_cls: type) -> None:
    """Forget the adapter ``register_moe_adapter`` set for ``block_cls``."""
    _ADAPTERS.pop(block_cls, None)


def _adapter_for(module: nn.Module) -> MoEAdapter | None:
    for cls in type(module).__mro__:
        adapter = _ADAPTERS.get(cls) or _ADAPTERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if adapter is not None:
            return adapter
    return None


_MOE_NAME = re.compile(r"(SparseMoe|SparseMoE|MoE$|Moe$|MoeBlock|MoEBlock|MoeLayer|MoELayer|"
                       r"MixtureOfExperts|Experts$)")


def _looks_like_moe(module: nn.Module) -> bool:
    """A block that is probably MoE: it has an ``experts`` submodule or an MoE-ish name."""
    return isinstance(getattr(module, "experts", None), nn.Module) or bool(
        _MOE_NAME.search(type(module).__name__))


def _find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module, MoEAdapter]],
                                            list[tuple[str, nn.Module]]]:
    """(recognised blocks, unrecognised MoE-looking blocks), outermost first, in order."""
    found: list[tuple[str, nn.Module, MoEAdapter]] = []
    unknown: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            adapter = _adapter_for(child)
            if adapter is not None:
                found.append((path, child, adapter))
            elif _looks_like_moe(child):
                unknown.append((path, child))
            else:
                walk(path, child)

    adapter = _adapter_for(model)
    if adapter is not None:
        found.append(("", model, adapter))
    else:
        walk("", model)
    return found, unknown


def _takes_site_prefix(adapter: MoEAdapter) -> bool:
    try:
        params = inspect.signature(adapter.install).parameters
    except (TypeError, ValueError):
        return False
    return "site_prefix" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _known_block_names() -> str:
    names = []
    for key in _ADAPTERS:
        names.append(key.rsplit(".", 1)[-1] if isinstance(key, str) else key.__qualname__)
    return ", ".join(names)


# -- install / remove ---------------------------------------------------------------------

@dataclasses.dataclass
class MoEHooks:
    """The hooks ``install_moe_hooks`` put on one model.

    Attributes:
        blocks: hooked block path (as in ``model.named_modules()``) -> block.
        backends: block path -> the backend its exchange uses.
        record: when true, every hooked call appends ``(block path, microbatch id or
            None)`` to ``calls`` (switch it on or off at any time).
        calls: the record.
    """

    blocks: dict[str, nn.Module]
    backends: dict[str, MoEBackend]
    record: bool = False
    calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def remove(self) -> int:
        """Undo every hook (latest first); returns how many blocks were restored."""
        n = len(self._undo)
        while self._undo:
            self._undo.pop()()
        return n


def install_moe_hooks(model: nn.Module, backend: MoEBackend | None = None, *,
                      record: bool = False) -> MoEHooks:
    """Route the routed experts of every MoE block of ``model`` through ``moe_exchange``.

    Args:
        model: a transformers model (any nn.Module with recognised MoE blocks).
        backend: the MoE communication backend shared by all blocks (its ``num_experts``
            must match the blocks'); default: one ``SingleProcessBackend`` per expert count.
            With the ``"switch"`` schedule each MoE block yields 4 times per call, at
            ``YIELD_SITES["switch"]`` prefixed with the block's module path and ``"."``.
        record: start with ``MoEHooks.record`` on.
    Returns:
        the ``MoEHooks`` handle (also kept on the model for ``remove_moe_hooks``).
    Raises:
        UnsupportedModelError: a block looks like MoE but has no adapter, or there is no
            MoE block at all (the message names the class and how to register an adapter).
        RuntimeError: hooks are already installed on this model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"install_moe_hooks needs an nn.Module, got {type(model).__name__}.")
    if model.__dict__.get(_HANDLE_ATTR) is not None:
        raise RuntimeError(f"MoE hooks are already installed on this {type(model).__name__}: "
                           "call remove_moe_hooks(model) before installing again.")
    found, unknown = _find_blocks(model)
    if unknown:
        classes = list(dict.fromkeys(type(m).__qualname__ for _, m in unknown))
        where = ", ".join(f"{type(m).__qualname__} at {p!r}" for p, m in unknown[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise UnsupportedModelError(
            f"install_moe_hooks: {type(model).__name__} has MoE blocks that coop_dbo does "
            f"not recognise: {where}{more}. Add an adapter for each block class: "
            f"coop_dbo.hf.register_moe_adapter({classes[0]}, adapter), where adapter is a "
            "coop_dbo.hf.MoEAdapter (FusedExpertsAdapter() fits blocks whose .experts is "
            "a transformers fused-experts module with forward(hidden_states, top_k_index, "
            f"top_k_weights)). Recognised blocks: {_known_block_names()}.")
    if not found:
        raise UnsupportedModelError(
            f"install_moe_hooks: found no MoE block in {type(model).__name__}. Recognised "
            f"blocks: {_known_block_names()}. If its MoE block is another class, add an "
            "adapter: coop_dbo.hf.register_moe_adapter(<block class>, adapter).")
    counts = {path: adapter.num_experts(block) for path, block, adapter in found}
    if backend is not None:
        bad = {p: n for p, n in counts.items() if n != backend.num_experts}
        if bad:
            p, n = next(iter(bad.items()))
            raise ValueError(f"the backend routes {backend.num_experts} experts but block "
                             f"{p!r} has {n}: make the backend with num_experts={n}.")
    default: dict[int, MoEBackend] = {}
    handle = MoEHooks(blocks={}, backends={}, record=record)
    try:
        for path, block, adapter in found:
            be = backend if backend is not None else default.setdefault(
                counts[path], SingleProcessBackend(counts[path]))
            if _takes_site_prefix(adapter):
                handle._undo.append(adapter.install(block, be, site_prefix=f"{path}."))
            else:  # an adapter written before site prefixes
                handle._undo.append(adapter.install(block, be))
            handle.blocks[path] = block
            handle.backends[path] = be

            def count(_module, _args, path=path):
                if handle.record:
                    handle.calls.append((path, dbo_current_ubatch_id()))

            h = block.register_forward_pre_hook(count)
            handle._undo.append(h.remove)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def remove_moe_hooks(model: nn.Module) -> int:
    """Restore every MoE block ``install_moe_hooks`` changed; returns how many (0: none)."""
    handle: MoEHooks | None = model.__dict__.pop(_HANDLE_ATTR, None)
    if handle is None:
        return 0
    n = len(handle.blocks)
    handle.remove()
    return n
