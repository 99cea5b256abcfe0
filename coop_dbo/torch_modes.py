"""torch's per-thread modes, which the scheduler carries per microbatch.

torch keeps several modes per OS thread, and all microbatch greenlets of a step share one
thread. A mode that one microbatch entered and that is still active at its yield would
hold in the next microbatch too, and after the step in ``run()``'s caller. So the
scheduler reads a cheap ``fingerprint()`` of these modes at every hand-off; where the
microbatch that resumes had other modes, it ``restore``s its own (``capture``d at its
yield), and after the step the caller's. What is carried:

* grad mode (``torch.no_grad``, ``enable_grad``, ``set_grad_enabled``);
* inference mode (``torch.inference_mode``), forward-mode AD's enable flag;
* autocast (``torch.autocast``): on or off per device type, the dtype of the CPU's and
  of CUDA's, whether casts are cached, and the nesting count that decides when the cast
  cache is dropped;
* the torch function mode stack (``with torch.device(...)``, ``TorchFunctionMode``) and
  the torch dispatch mode stack (``TorchDispatchMode``);
* the thread's dispatch key sets, which the first three are made of (so other guards that
  set dispatch keys travel with them, whenever one of the above differs).

The fingerprint reads grad mode, inference mode, whether any autocast is on and the depth
of both mode stacks (five reads, 0.2-0.4 us); while autocast or a mode is on it also reads
the autocast nesting count, the dispatch keys excluded, the autocast dtypes of the CPU
and CUDA and which modes are on the stacks. A change none of these reads sees is not
carried: a dispatch key guard entered alone (``torch._C._AutoDispatchBelowAutograd``,
functorch transforms) while no autocast and no mode is on. Shared by all microbatches (per
thread, not carried): the autocast cast cache (the same weights give the same casts in
every microbatch), saved-tensor hooks, the profiler's ranges, the current CUDA device, and
Python's own ``threading.local`` values: leave those as they are across a yield. (The
current CUDA stream is carried by the scheduler itself.)

Restoring sets each piece through torch's own setters; inference mode and the dispatch key
sets have only guards (``torch._C._InferenceMode``, ``_ForceDispatchKeyGuard``): entering
one sets a state, exiting it restores the state it found. Two guards entered one after
the other and exited in the order entered leave the state the second one found, which is
the state the first one set: that is how ``_set_with_guard`` sets a state and leaves no
guard entered.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["TorchModes", "fingerprint", "capture", "restore"]

_C: Any = torch._C
_grad = _C.is_grad_enabled
_inference = _C.is_inference_mode_enabled
_nest_up = _C.autocast_increment_nesting
_nest_down = _C.autocast_decrement_nesting
_fn_depth = _C._len_torch_function_stack
_dispatch_depth = _C._len_torch_dispatch_stack
_autocast_dtype = _C.get_autocast_dtype
_any_autocast = _C._is_any_autocast_enabled

#: The fingerprints without autocast or modes, by (grad, inference): no tuple per read.
_FAST = (((False, False), (False, True)), ((True, False), (True, True)))

#: Device types whose autocast dtype is carried (reading all ten torch knows of would
#: cost 2.7 us per step).
_DEVICES = ("cpu", "cuda")


def _nesting() -> int:
    """The autocast nesting count (torch has no getter: one up, one down)."""
    n = _nest_up() - 1
    _nest_down()
    return n


def _full_fingerprint() -> tuple:
    return (_grad(), _inference(), _nesting(), _C._dispatch_tls_local_exclude_set().raw_repr(),
            tuple(id(_C._get_function_stack_at(i)) for i in range(_fn_depth())),
            tuple(id(_C._get_dispatch_stack_at(i)) for i in range(_dispatch_depth())),
            tuple(_autocast_dtype(d) for d in _DEVICES))


def fingerprint() -> Hashable:
    """A value that differs whenever the carried modes differ (as far as the module doc
    says): five reads of torch's thread state when no autocast and no mode is active."""
    if _any_autocast() or _fn_depth() or _dispatch_depth():
        return _full_fingerprint()
    return _FAST[_grad()][_inference()]


class TorchModes:
    """torch's per-thread modes at one moment, read by ``capture``, set by ``restore``.

    Invariant: ``key`` is what ``fingerprint()`` returned for exactly this state.
    """

    __slots__ = ("key", "grad", "inference", "fw_grad", "threads", "view_replay", "include",
                 "exclude", "dtypes", "cache", "nesting", "fn_modes", "dispatch_modes")

    def __init__(self) -> None:
        self.key: Hashable = fingerprint()
        self.grad: bool = _grad()
        self.inference: bool = _inference()
        self.fw_grad: bool = _C._is_fwd_grad_enabled()
        self.threads: bool = _C._is_multithreading_enabled()  # autograd's, per thread
        self.view_replay: bool = _C._is_view_replay_enabled()
        # the thread's dispatch key sets (include, exclude): DispatchKeySet objects
        self.include: Any = _C._dispatch_tls_local_include_set()
        self.exclude: Any = _C._dispatch_tls_local_exclude_set()
        # autocast dtype of the CPU and CUDA; the cast cache on or off
        self.dtypes: dict[str, torch.dtype] = {d: _autocast_dtype(d) for d in _DEVICES}
        self.cache: bool = _C.is_autocast_cache_enabled()
        self.nesting: int = _nesting()  # >= 0
        # the mode stacks, bottom first
        self.fn_modes: list[Any] = [_C._get_function_stack_at(i) for i in range(_fn_depth())]
        self.dispatch_modes: list[Any] = [_C._get_dispatch_stack_at(i)
                                          for i in range(_dispatch_depth())]


def capture() -> TorchModes:
    """The current thread's modes."""
    return TorchModes()


def _set_with_guard(make_guard: Callable[[], Any]) -> None:
    """Leave the state that entering ``make_guard()`` sets, with no guard entered."""
    first, second = make_guard(), make_guard()
    first.__enter__()
    second.__enter__()  # found the state ``first`` set; its exit restores that
    first.__exit__(None, None, None)  # back to the state before ``first``
    second.__exit__(None, None, None)  # to the state ``first`` had set


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def restore(m: TorchModes) -> None:
    """Make ``m`` the current thread's modes."""
    if _inference() != m.inference:
        _set_with_guard(lambda: _C._InferenceMode(m.inference))
    _set_with_guard(lambda: _C._ForceDispatchKeyGuard(m.include, m.exclude))
    _C._set_grad_enabled(m.grad)
    _C._set_fwd_grad_enabled(m.fw_grad)
    _C._set_multithreading_enabled(m.threads)
    _C._set_view_replay_enabled(m.view_replay)
    for device, dtype in m.dtypes.items():
        if _autocast_dtype(device) != dtype:
            _C.set_autocast_dtype(device, dtype)
    _C.set_autocast_cache_enabled(m.cache)
    n = _nesting()
    while n < m.nesting:
        n = _nest_up()
    while n > m.nesting:
        n = _nest_down()
    if not _same([_C._get_function_stack_at(i) for i in range(_fn_depth())], m.fn_modes):
        while _fn_depth():
            _C._pop_torch_function_stack()
        for mode in m.fn_modes:
            _C._push_on_torch_function_stack(mode)
    if not _same([_C._get_dispatch_stack_at(i) for i in range(_dispatch_depth())],
                 m.dispatch_modes):
        while _dispatch_depth():
            _C._pop_torch_dispatch_stack(None)
        for mode in m.dispatch_modes:
            _C._push_on_torch_dispatch_stack(mode)
