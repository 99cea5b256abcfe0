"""MoE hooks for ``transformers`` models: the routed experts go through ``moe_exchange``.

``install_moe_hooks(model)`` walks the model and routes the routed-expert computation of
every MoE block through ``coop_dbo.moe_hooks.moe_exchange`` (dispatch, experts, combine,
with the DBO yields), without editing transformers' source: it sets an instance attribute
``forward`` on the module it hooks, keeping the class's forward, and
``remove_moe_hooks(model)`` deletes it again.

**Where the hook goes, found by structure (not by class names):**

1. A module whose class has an adapter registered (``register_moe_adapter``, and the
   built-in ones of ``coop_dbo.hf.blocks`` for blocks that differ) is hooked by that
   adapter, which is first checked against the block (``MoEAdapter.mismatch``).
2. Otherwise a module that uses transformers' unified experts interface
   (``@use_experts_implementation``: the layout flags ``has_gate``, ``has_bias``,
   ``is_transposed``, ``is_concatenated``, an int ``num_experts``, stacked weights, and
   ``forward(hidden_states, top_k_index, top_k_weights)``) is hooked itself: its forward
   becomes ``moe_exchange`` over ``fused_experts_fn``. 54 modeling files of transformers
   5.17 define their experts this way, so those families need no adapter. The router,
   the shared experts and everything else stay the model's code.
3. Otherwise a module that holds per-expert weights (a parameter of 3 or more dims
   stacked along a leading dim ``E >= 2``, outside ``torch.nn``'s own layers, with a
   router ``nn.Linear`` to ``E`` outputs in its parent or grandparent; per-head weights
   have none) belongs to an MoE block nobody knows: ``install_moe_hooks`` raises
   ``UnsupportedModelError`` naming that block and what does not fit, and hooks nothing.

The hooked block's path (the experts module's parent for the unified interface, e.g.
``model.layers.3.mlp``) plus ``"."`` prefixes the yield sites, so that the symmetry check
tells MoE layers apart.

**Shared experts.** With the hook at the routed experts, a block's shared experts run
where the block's own code calls them: before the dispatch or after the combine, in
stretches that the other microbatch's transfers overlap anyway. An adapter that owns a
block's whole forward (Llama 4) runs them beside the dispatch instead
(``moe_exchange(shared_experts=...)``, in the experts' stretch). With
``install_moe_hooks(model, schedule=policy)`` the shared experts of blocks that call
them after the routed ones run beside the dispatch wherever the policy (a plan from the
calibration file) does not place them before it (``SharedBesideDispatch``).

**The experts computation** matches transformers' own ``grouped_mm`` experts
implementation: per local expert ``down(_apply_gate(x @ gate_up^T))`` (with biases and
transposed layouts as the flags say) on the rows the backend delivers, through
``ExpertBatch.linear``; the backend applies the routing weights and sums per token.

**Expert parallelism**: with a backend of ``world_size > 1`` (e.g.
``TorchDistributedBackend(num_experts)``), rank ``r`` computes only its local experts
``backend.local_expert_range`` from its copy of the weights (the other experts' weights
stay in memory but are not read); attention and everything else is data-parallel, each
rank running its own batch. Every rank must hold the same weights.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..backends import ExpertBatch, MoEBackend, SingleProcessBackend
from ..errors import UnsupportedModelError
from ..greenlet_sched import dbo_current_ubatch_id
from ..moe_hooks import moe_exchange
from ..schedule import SchedulePolicy

__all__ = [
    "MoEAdapter",
    "FusedExpertsAdapter",
    "MoEHooks",
    "install_moe_hooks",
    "remove_moe_hooks",
    "register_moe_adapter",
    "unregister_moe_adapter",
    "fused_experts_fn",
    "experts_interface_mismatch",
    "uses_experts_interface",
    "hook_forward",
    "SharedBesideDispatch",
    "shared_experts_of",
    "SHARED_EXPERTS_ATTRS",
]

_HANDLE_ATTR = "_coop_dbo_moe_hooks"
_HOOK_MARK = "__coop_dbo_hook__"


# -- adapters -----------------------------------------------------------------------------

class MoEAdapter:
    """How to route one MoE block class through ``moe_exchange``.

    Subclasses implement ``num_experts(block)``, ``install(block, backend, *,
    site_prefix="")`` and, to be checked at install time, ``mismatch(block)``.
    ``install`` changes the block instance (never its class) so that its routed experts go
    through ``moe_exchange(backend, x, topk_idx, topk_weights, experts_fn,
    site_prefix=site_prefix)``, and returns a function that undoes exactly that change.
    ``install_moe_hooks`` passes the block's module path plus ``"."`` as ``site_prefix``
    (e.g. ``"model.layers.3.mlp."``), so that the symmetry check tells MoE layers apart;
    an adapter whose ``install`` takes no ``site_prefix`` still works, with unprefixed
    sites.

    Attributes:
        exchanges: ``False`` for an adapter that recognises a block but leaves it local
            (no exchange, no yields); ``install_moe_hooks`` lists such blocks in
            ``MoEHooks.local``.
    """

    exchanges: bool = True

    def num_experts(self, block: nn.Module) -> int:
        raise NotImplementedError

    def mismatch(self, block: nn.Module) -> str | None:
        """What about ``block`` this adapter cannot handle, or ``None`` when it fits.

        The default asks ``num_experts``, which raises for a block it cannot read.
        """
        try:
            self.num_experts(block)
        except UnsupportedModelError as e:
            return str(e)
        return None

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "") -> Callable[[], None]:
        raise NotImplementedError


def hook_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Set ``forward`` as ``module``'s instance ``forward`` (the class keeps its own);
    returns the function that puts back what was there."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    setattr(forward, _HOOK_MARK, True)
    module.__dict__["forward"] = forward

    def undo() -> None:
        if had:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) else None


_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
_ROUTED_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def uses_experts_interface(module: nn.Module) -> bool:
    """Whether ``module`` carries what transformers' ``@use_experts_implementation`` sets
    on an experts module: the four boolean layout flags and an int ``num_experts``."""
    return all(isinstance(getattr(module, f, None), bool) for f in _FLAGS) and isinstance(
        getattr(module, "num_experts", None), int)


def _positional_arity(fn: Any) -> int | None:
    """Positional parameters ``fn`` takes besides ``self`` (``None``: any number)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                          inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params) - 1


def _describe(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def experts_interface_mismatch(experts: nn.Module) -> str | None:
    """What keeps ``experts`` from running through ``fused_experts_fn``, or ``None``.

    Checks the layout flags, ``num_experts``, ``forward(hidden_states, top_k_index,
    top_k_weights)``, the stacked weights (``gate_up_proj`` ``[E, 2I, H]`` or ``up_proj``
    ``[E, I, H]``, ``down_proj`` ``[E, H, I]``; ``[E, in, out]`` when transposed; biases
    ``[E, out]``), the gate (``_apply_gate`` or ``act_fn``) and that the module holds no
    other parameter (a weight ``fused_experts_fn`` would leave out).
    """
    name = type(experts).__name__
    n = _positional_arity(type(experts).forward)
    if n is not None and n < 3:
        params = list(inspect.signature(type(experts).forward).parameters)[1:]
        return (f"{name}.forward takes ({', '.join(params)}), but the hook calls it with "
                f"({', '.join(_ROUTED_ARGS)})")
    missing = [f for f in (*_FLAGS, "num_experts")
               if not isinstance(getattr(experts, f, None), int)]
    if missing:
        return (f"{name} lacks the experts-interface attributes {missing} "
                "(@use_experts_implementation sets them)")
    e: Any = experts  # duck-typed: transformers' experts modules declare their weights
    num, gated, transposed, bias = e.num_experts, e.has_gate, e.is_transposed, e.has_bias
    w_in_name = "gate_up_proj" if gated else "up_proj"
    w_in, w_out = _param(experts, w_in_name), _param(experts, "down_proj")
    if w_in is None or w_out is None:
        return f"{name} has no {w_in_name} and down_proj weights"
    if w_in.dim() != 3 or w_out.dim() != 3 or w_in.shape[0] != num or w_out.shape[0] != num:
        return (f"{name}'s {w_in_name} {_describe(w_in.shape)} and down_proj "
                f"{_describe(w_out.shape)} are not stacked per expert ({num} experts)")
    in_h, in_out = (w_in.shape[1], w_in.shape[2]) if transposed else (w_in.shape[2],
                                                                         w_in.shape[1])
    out_in, out_h = (w_out.shape[1], w_out.shape[2]) if transposed else (w_out.shape[2],
                                                                            w_out.shape[1])
    if in_h != out_h or in_out != (2 * out_in if gated else out_in):
        return (f"{name}'s {w_in_name} {_describe(w_in.shape)} and down_proj "
                f"{_describe(w_out.shape)} do not chain (transposed={transposed}, "
                f"gated={gated})")
    expected = {w_in_name, "down_proj"}
    if bias:
        expected |= {w_in_name + "_bias", "down_proj_bias"}
        for b, width in ((w_in_name + "_bias", in_out), ("down_proj_bias", out_h)):
            t = _param(experts, b)
            if t is None or tuple(t.shape) != (num, width):
                got = "none" if t is None else _describe(t.shape)
                return f"{name}.{b} is {got}, not [{num}, {width}]"
    extra = sorted({k for k, _ in experts.named_parameters()} - expected)
    if extra:
        return f"{name} holds parameters {extra} that the fused experts leave out"
    if gated and not callable(getattr(experts, "_apply_gate", None)) and not callable(
            getattr(experts, "act_fn", None)):
        return f"{name} has neither _apply_gate nor act_fn"
    if not gated and not callable(getattr(experts, "act_fn", None)):
        return f"{name} has no act_fn"
    return None


def fused_experts_fn(experts: nn.Module, backend: MoEBackend
                     ) -> Callable[[ExpertBatch], torch.Tensor]:
    """The ``experts`` callable of ``moe_exchange`` for a transformers fused-experts module.

    ``experts`` holds ``gate_up_proj`` ``[E, 2I, H]`` (or ``up_proj`` ``[E, I, H]`` when
    ``has_gate`` is false) and ``down_proj`` ``[E, H, I]`` (``[E, in, out]`` instead when
    ``is_transposed``), optional ``*_bias`` ``[E, out]``, and ``_apply_gate`` / ``act_fn``
    (``experts_interface_mismatch`` checks all this). The callable computes, for the rows
    of each local expert ``e`` in ``backend.local_expert_range``, ``down_e(gate(up_e(x)))``
    in the weights' dtype, and returns ``[rows, H]`` (flat layout) or
    ``[E_local, rows, H]`` (padded layout). Weights are read at every call, so
    ``model.to(...)`` after installing is fine.
    """
    lo, hi = backend.local_expert_range
    e: Any = experts  # its weights are attributes an nn.Module does not declare
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

    def run(batch: ExpertBatch) -> torch.Tensor:
        w_in = getattr(experts, w_in_name)[lo:hi]
        w_out = e.down_proj[lo:hi]
        if not transposed:  # stored [E, out, in] like nn.Linear; grouped_mm wants [E, in, out]
            w_in = w_in.transpose(-2, -1)
            w_out = w_out.transpose(-2, -1)
        x = batch.x.to(w_in.dtype)
        h = batch.linear(x, w_in)
        if has_bias:
            h = h + expert_rows(batch, getattr(experts, w_in_name + "_bias")[lo:hi])
        h = apply_gate(h) if has_gate else act_fn(h)  # type: ignore[misc]  # checked above
        y = batch.linear(h, w_out)
        if has_bias:
            y = y + expert_rows(batch, e.down_proj_bias[lo:hi])
        return y

    return run


def expert_rows(batch: ExpertBatch, per_expert: torch.Tensor) -> torch.Tensor:
    """``per_expert`` ``[E_local, D]`` (a bias, an embedding row) laid out like the rows of
    ``batch``: ``[rows, D]`` (flat; padding rows get the last expert's) or
    ``[E_local, 1, D]`` (padded, broadcasting over each expert's rows)."""
    if batch.layout == "padded":
        return per_expert[:, None, :]
    assert batch.expert_offsets is not None
    rows = batch.x.shape[0]
    row = torch.arange(rows, device=per_expert.device, dtype=batch.expert_offsets.dtype)
    expert = torch.searchsorted(batch.expert_offsets, row, right=True)
    return per_expert[expert.clamp_(max=per_expert.shape[0] - 1)]


def routed_forward(backend: MoEBackend, experts_fn: Callable[[ExpertBatch], torch.Tensor],
                   site_prefix: str, shared_experts: Callable[[torch.Tensor], Any] | None = None
                   ) -> Callable[..., torch.Tensor]:
    """A ``forward(hidden_states, top_k_index, top_k_weights)`` that runs the exchange.

    Shapes: ``hidden_states`` ``[..., H]``, ``top_k_index`` / ``top_k_weights`` the same
    leading dims flattened or not, ``[..., k]``; returns ``hidden_states``' shape and
    dtype. ``shared_experts``: passed to ``moe_exchange`` (run beside the dispatch).
    """
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        idx = top_k_index.reshape(x.shape[0], -1).to(torch.int64)
        w = top_k_weights.reshape(x.shape[0], -1)
        out = moe_exchange(backend, x, idx, w, experts_fn, shared_experts=shared_experts,
                           site_prefix=site_prefix)
        return out.to(hidden_states.dtype).reshape(shape)

    return forward


#: Attributes under which transformers' MoE blocks keep their shared experts.
SHARED_EXPERTS_ATTRS = ("shared_experts", "shared_expert", "shared_mlp")


class SharedBesideDispatch:
    """Runs a block's shared experts beside its dispatch, where the block's own code calls
    them after the routed experts (DeepSeek-V3, GLM-4-MoE, ... : ``out = experts(...) +
    shared_experts(residuals)``).

    ``install_moe_hooks(model, schedule=policy)`` sets it up per block. For a microbatch
    of ``n`` tokens whose ``policy.shared_before_dispatch(n)`` is false, the exchange
    calls ``beside(x)`` after the dispatch (the experts' stretch, ``moe_exchange``'s
    ``shared_experts``): it runs the shared experts on the exchange's input ``x`` and
    keeps the result; the block's own call that follows, on the same tensor (the same
    memory, any shape with the same rows), gets that result instead of running them
    again. The block's result is the same: the shared experts work row by row.

    Where it does not apply the block's own code runs as written: a block that calls its
    shared experts before the routed ones (Qwen2-MoE: they already run before the
    dispatch), a call on another tensor (the kept result is dropped), or a policy that
    says "before the dispatch" (then the block's call after the combine runs them, in
    the stretch before the next layer's dispatch).

    Invariant: ``ready`` holds at most one result per microbatch, made in the current
    call of the block and dropped when the block is called again.
    """

    def __init__(self, shared: nn.Module, before: Callable[[int], bool]) -> None:
        self.before = before  # tokens of a microbatch -> keep them where the block runs them
        self.run: Callable[..., Any] = shared.forward  # the module's own forward
        # microbatch id -> (the input the result was made from, the result)
        self.ready: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.called: set[Any] = set()  # microbatches whose block ran them already (this call)

    def block_called(self, _module: nn.Module, _args: Any) -> None:
        """Forward pre-hook of the block: a new call, nothing of the last one counts."""
        ubatch = dbo_current_ubatch_id()
        self.ready.pop(ubatch, None)
        self.called.discard(ubatch)

    def beside(self, x: torch.Tensor) -> None:
        """``moe_exchange``'s ``shared_experts``: run them now, for the block's own call."""
        ubatch = dbo_current_ubatch_id()
        if ubatch in self.called or self.before(x.shape[0]):
            return None
        self.ready[ubatch] = (x, self.run(x))
        return None  # nothing is added to the routed output: the block adds it itself

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The shared module's forward: the kept result where it fits, else its own."""
        ubatch = dbo_current_ubatch_id()
        self.called.add(ubatch)
        kept = self.ready.pop(ubatch, None)
        if (kept is not None and not args and not kwargs and isinstance(x, torch.Tensor)
                and _same_rows(kept[0], x)):
            out = kept[1]
            return out.view(*x.shape[:-1], out.shape[-1])
        return self.run(x, *args, **kwargs)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same memory, read as the same rows of the same width."""
    return (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
            and a.device == b.device and a.shape[-1] == b.shape[-1] and b.is_contiguous()
            and a.is_contiguous())


def shared_experts_of(block: nn.Module) -> nn.Module | None:
    """The block's shared experts module (``SHARED_EXPERTS_ATTRS``), if it has one."""
    for attr in SHARED_EXPERTS_ATTRS:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return module
    return None


class FusedExpertsAdapter(MoEAdapter):
    """For blocks whose ``.<experts_attr>`` uses transformers' unified experts interface.

    ``install_moe_hooks`` uses it by itself for every such experts module it finds (with
    the module's attribute name); register it by hand only for a block class whose
    experts it should hook although the walk would not reach them. The hook replaces the
    experts module's ``forward(hidden_states, top_k_index, top_k_weights)`` (on the
    instance) by ``moe_exchange`` over ``fused_experts_fn``; the block's router, shared
    experts and reshapes are untouched.

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
        return experts

    def mismatch(self, block: nn.Module) -> str | None:
        try:
            experts = self._experts(block)
        except UnsupportedModelError as e:
            return str(e)
        why = experts_interface_mismatch(experts)
        if why is None:
            return None
        return (f"{why}; FusedExpertsAdapter fits only transformers' unified experts "
                f"interface: write a MoEAdapter for {type(block).__name__}")

    def num_experts(self, block: nn.Module) -> int:
        experts = self._experts(block)
        why = experts_interface_mismatch(experts)
        if why is not None:
            raise UnsupportedModelError(
                f"{type(block).__name__}.{self.experts_attr} does not fit "
                f"FusedExpertsAdapter: {why}. Write a MoEAdapter for "
                f"{type(block).__name__} and register it with register_moe_adapter.")
        return int(getattr(experts, "num_experts"))  # noqa: B009  # checked above

    def install(self, block: nn.Module, backend: MoEBackend, *,
                site_prefix: str = "", shared_before: Callable[[int], bool] | None = None
                ) -> Callable[[], None]:
        """Hook the block's experts; with ``shared_before`` (tokens of a microbatch ->
        whether its shared experts stay where the block runs them) also its shared
        experts (``SharedBesideDispatch``), where it has them."""
        experts = self._experts(block)
        shared = shared_experts_of(block) if shared_before is not None else None
        if shared is None or shared_before is None:
            return hook_forward(experts, routed_forward(
                backend, fused_experts_fn(experts, backend), site_prefix))
        beside = SharedBesideDispatch(shared, shared_before)
        undo = [hook_forward(experts, routed_forward(
                    backend, fused_experts_fn(experts, backend), site_prefix, beside.beside)),
                # (a function, not the bound method: hook_forward marks what it sets)
                hook_forward(shared, lambda *a, **k: beside.forward(*a, **k)),
                block.register_forward_pre_hook(beside.block_called).remove]

        def remove() -> None:
            while undo:
                undo.pop()()
        return remove


# Keys: block classes, or "module.QualName" strings for built-in transformers blocks (so
# that transformers is not imported to fill the registry; coop_dbo.hf.blocks adds them).
_ADAPTERS: dict[Any, MoEAdapter] = {}


def register_moe_adapter(block_cls: type, adapter: MoEAdapter) -> None:
    """Make ``install_moe_hooks`` hook blocks of ``block_cls`` (and subclasses) with
    ``adapter``, before (and instead of) anything it finds inside them."""
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


def _routes_to(block: nn.Module, num: int, widths: set[int]) -> bool:
    """Whether ``block`` (or a module up to two levels below it) holds a router for
    ``num`` experts: an ``nn.Linear`` from one of ``widths`` to ``num`` outputs."""
    level = [block]
    for _ in range(3):
        for m in level:
            if isinstance(m, nn.Linear) and m.out_features == num and m.in_features in widths:
                return True
        level = [c for m in level for c in m.children()]
    return False


def _expert_weights(module: nn.Module, ancestors: list[tuple[str, nn.Module]]
                    ) -> tuple[str, nn.Module, str] | None:
    """``(block path, block, how)`` when ``module`` holds per-expert weights that a block
    routes to: a parameter of 3+ dims stacked along a leading dim ``E >= 2`` (torch.nn's
    own layers aside), and, in its parent or grandparent, a router ``nn.Linear`` to ``E``
    outputs from one of the weight's other dims. Per-head weights (``[heads, ...]``) have
    no such router."""
    if type(module).__module__.startswith("torch."):
        return None
    for name, p in module.named_parameters(recurse=False):
        if p.dim() >= 3 and p.shape[0] >= 2:
            for path, block in reversed(ancestors[-2:]):
                if _routes_to(block, p.shape[0], set(p.shape[1:])):
                    return path, block, f"{type(module).__name__}.{name} {_describe(p.shape)}"
    return None


@dataclasses.dataclass
class _Found:
    path: str  # the block's path (the key of MoEHooks.blocks)
    block: nn.Module
    adapter: MoEAdapter
    counted: nn.Module  # whose calls MoEHooks.record counts (the hooked module)


def _find_blocks(model: nn.Module) -> tuple[list[_Found], list[tuple[str, nn.Module, str]]]:
    """(blocks to hook, MoE blocks nobody knows as (path, block, why)), in model order."""
    found: list[_Found] = []
    unknown: list[tuple[str, nn.Module, str]] = []

    def walk(prefix: str, module: nn.Module, ancestors: list[tuple[str, nn.Module]]) -> None:
        ancestors = [*ancestors, (prefix, module)]
        interface = [(n, c) for n, c in module.named_children() if uses_experts_interface(c)]
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            adapter = _adapter_for(child)
            if adapter is not None:
                found.append(_Found(path, child, adapter, child))
            elif uses_experts_interface(child):
                why = experts_interface_mismatch(child)
                if why is not None:
                    unknown.append((prefix, module, why))
                else:
                    key = prefix if len(interface) == 1 else path
                    found.append(_Found(key, module, FusedExpertsAdapter(name), child))
            elif (stacked := _expert_weights(child, ancestors)) is not None:
                block_path, block, how = stacked
                if not any(b is block for _, b, _ in unknown):
                    unknown.append((block_path, block, f"{how} holds per-expert weights"))
            else:
                walk(path, child, ancestors)

    adapter = _adapter_for(model)
    if adapter is not None:
        found.append(_Found("", model, adapter, model))
    elif uses_experts_interface(model) and experts_interface_mismatch(model) is None:
        raise UnsupportedModelError(
            f"install_moe_hooks: {type(model).__name__} is an experts module itself; pass "
            "the model (or block) that routes tokens to it.")
    else:
        walk("", model, [])
    return found, unknown


def _takes_site_prefix(adapter: MoEAdapter) -> bool:
    try:
        params = inspect.signature(adapter.install).parameters
    except (TypeError, ValueError):
        return False
    return "site_prefix" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _known_block_names() -> str:
    names = [key.rsplit(".", 1)[-1] if isinstance(key, str) else key.__qualname__
             for key in _ADAPTERS]
    return ", ".join(["transformers' unified experts modules", *names])


# -- install / remove ---------------------------------------------------------------------

@dataclasses.dataclass
class MoEHooks:
    """The hooks ``install_moe_hooks`` put on one model.

    Attributes:
        blocks: hooked block path (as in ``model.named_modules()``) -> block; for an
            experts module of the unified interface, the block is its parent.
        backends: block path -> the backend its exchange uses.
        adapters: block path -> the adapter that hooked it (a ``FusedExpertsAdapter`` for
            the unified experts interface).
        local: block path -> block, for blocks an adapter recognised but leaves local
            (``MoEAdapter.exchanges`` false: no exchange, no yields).
        record: when true, every hooked call appends ``(block path, microbatch id or
            None)`` to ``calls`` (switch it on or off at any time).
        calls: the record.
    """

    blocks: dict[str, nn.Module]
    backends: dict[str, MoEBackend]
    adapters: dict[str, MoEAdapter] = dataclasses.field(default_factory=dict)
    local: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    record: bool = False
    calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)

    def remove(self) -> int:
        """Undo every hook (latest first); returns how many blocks were restored."""
        n = len(self.blocks)
        while self._undo:
            self._undo.pop()()
        return n


def install_moe_hooks(model: nn.Module, backend: MoEBackend | None = None, *,
                      record: bool = False, schedule: SchedulePolicy | None = None
                      ) -> MoEHooks:
    """Route the routed experts of every MoE block of ``model`` through ``moe_exchange``.

    Args:
        model: a transformers model (any nn.Module whose MoE blocks are found, see the
            module doc).
        backend: the MoE communication backend shared by all blocks (its ``num_experts``
            must match the blocks'); default: one ``SingleProcessBackend`` per expert count.
            With the ``"switch"`` schedule each MoE block yields 4 times per call, at
            ``YIELD_SITES["switch"]`` prefixed with the block's module path and ``"."``.
        record: start with ``MoEHooks.record`` on.
        schedule: where shared experts run, by microbatch size
            (``SchedulePolicy.shared_before_dispatch``; e.g. a plan from the calibration
            file, ``SchedulePlan.load(path).policy()``): for blocks of the unified experts
            interface that call their shared experts after the routed ones, "not before"
            runs them beside the dispatch (``SharedBesideDispatch``). ``None`` (default):
            every block runs them where its code does.
    Returns:
        the ``MoEHooks`` handle (also kept on the model for ``remove_moe_hooks``).
    Raises:
        UnsupportedModelError: an MoE block nobody knows, a registered adapter that does
            not fit its block, or no MoE block at all (each message names the block and
            what to do). Nothing is hooked then.
        RuntimeError: hooks are already installed on this model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"install_moe_hooks needs an nn.Module, got {type(model).__name__}.")
    if schedule is not None and not isinstance(schedule, SchedulePolicy):
        raise TypeError(f"install_moe_hooks: schedule must be a coop_dbo.schedule."
                        f"SchedulePolicy (e.g. SchedulePlan.load(path).policy()), got "
                        f"{type(schedule).__name__} {schedule!r}.")
    if backend is not None and not isinstance(backend, MoEBackend):
        raise TypeError(f"install_moe_hooks: backend must be a coop_dbo.backends.MoEBackend "
                        f"(e.g. SingleProcessBackend(num_experts)), or None for one "
                        f"single-process backend per expert count; got "
                        f"{type(backend).__name__} {backend!r}.")
    if model.__dict__.get(_HANDLE_ATTR) is not None:
        raise RuntimeError(f"MoE hooks are already installed on this {type(model).__name__}: "
                           "call remove_moe_hooks(model) before installing again.")
    found, unknown = _find_blocks(model)
    if unknown:
        classes = list(dict.fromkeys(type(m).__qualname__ for _, m, _ in unknown))
        where = ", ".join(f"{type(m).__qualname__} at {p!r}" for p, m, _ in unknown[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise UnsupportedModelError(
            f"install_moe_hooks: {type(model).__name__} has MoE blocks that coop_dbo does "
            f"not recognise: {where}{more} ({unknown[0][2]}). Add an adapter for each "
            f"block class: coop_dbo.hf.register_moe_adapter({classes[0]}, adapter), where "
            "adapter is a coop_dbo.hf.MoEAdapter. Recognised: "
            f"{_known_block_names()}.")
    for f in found:
        why = f.adapter.mismatch(f.block)
        if why is not None:
            raise UnsupportedModelError(
                f"install_moe_hooks: the {type(f.adapter).__name__} for "
                f"{type(f.block).__qualname__} does not fit the block at {f.path!r}: {why}.")
    exchanging = [f for f in found if f.adapter.exchanges]
    if not exchanging:
        raise UnsupportedModelError(
            f"install_moe_hooks: found no MoE block in {type(model).__name__}. Recognised: "
            f"{_known_block_names()}. If its MoE block is another class, add an adapter: "
            "coop_dbo.hf.register_moe_adapter(<block class>, adapter).")
    counts = {f.path: f.adapter.num_experts(f.block) for f in exchanging}
    if backend is not None:
        bad = {p: n for p, n in counts.items() if n != backend.num_experts}
        if bad:
            p, n = next(iter(bad.items()))
            raise ValueError(f"the backend routes {backend.num_experts} experts but block "
                             f"{p!r} has {n}: make the backend with num_experts={n}.")
    default: dict[int, MoEBackend] = {}
    handle = MoEHooks(blocks={}, backends={}, record=record)
    try:
        for f in found:
            if not f.adapter.exchanges:
                handle.local[f.path] = f.block
                continue
            path, block, adapter = f.path, f.block, f.adapter
            be = backend if backend is not None else default.setdefault(
                counts[path], SingleProcessBackend(counts[path]))
            install: Callable[..., Callable[[], None]] = adapter.install
            if schedule is not None and "shared_before" in inspect.signature(
                    install).parameters:  # FusedExpertsAdapter: the unified interface
                handle._undo.append(install(block, be, site_prefix=f"{path}.",
                                            shared_before=schedule.shared_before_dispatch))
            elif _takes_site_prefix(adapter):
                handle._undo.append(adapter.install(block, be, site_prefix=f"{path}."))
            else:  # an adapter written before site prefixes
                handle._undo.append(adapter.install(block, be))
            handle.blocks[path] = block
            handle.backends[path] = be
            handle.adapters[path] = adapter

            def count(_module: nn.Module, _args: Any, path: str = path) -> None:
                if handle.record:
                    handle.calls.append((path, dbo_current_ubatch_id()))

            h = f.counted.register_forward_pre_hook(count)
            handle._undo.append(h.remove)
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def remove_moe_hooks(model: nn.Module) -> int:
    """Restore every MoE block ``install_moe_hooks`` changed; returns how many (0: none)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_moe_hooks needs the nn.Module given to install_moe_hooks, "
                        f"got {type(model).__name__}.")
    handle: MoEHooks | None = model.__dict__.pop(_HANDLE_ATTR, None)
    if handle is None:
        return 0
    return handle.remove()
