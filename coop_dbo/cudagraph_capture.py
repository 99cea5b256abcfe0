"""CUDA graphs over the interleaved two-stream DBO schedule.

Two levels, as in ``torch.cuda.graphs``:

* ``StepGraph`` (low level): one graph of one callable at one set of static inputs.
  Warm-up on a side stream, capture, ``replay(inputs)``.
* ``CallGraph`` (low level): one graph of a whole call with keyword arguments and state
  objects (a transformers decode step with its static KV cache), from the split layer's
  ``StaticCall``.
* ``DBOGraphRunner`` (convenient level): a step function over a batch, captured with the
  greenlet scheduler driving the microbatches, one graph per batch size in ``sizes``,
  one memory pool for all of them. A batch is padded to the smallest captured size that
  holds it; a larger batch runs eagerly (greenlet DBO), with a one-line log.

How the two streams get into one graph: the capture runs on the caller's thread with the
capture stream current, so the scheduler takes it as the compute stream. The comm stream
joins the capture at the first ``dbo_yield_and_switch("comm")``, which makes it wait for
an event recorded on the capture stream (a fork), and the scheduler ends every step with
the compute stream waiting for the comm stream (the join), also when the step raises, so
a capture never ends with an unjoined stream.

Warning (warm-up):
    cuBLAS handles, NCCL communicators, the sleep-kernel calibration of the
    single-process backend and the caching allocator's first blocks are made lazily by
    the first run; none of that can happen during capture. ``StepGraph.capture`` first
    runs the step ``num_warmup`` times on a side stream.

Warning (static buffers):
    ``replay`` copies the inputs into static input tensors and returns the graph's
    static output tensors (sliced to the real batch). They are overwritten by the next
    replay of any captured size (the sizes share one pool): copy what you keep, or pass
    ``clone_outputs=True``.

Warning (cross-stream lifetimes):
    Memory freed inside a capture is reused inside the same capture. A tensor made on one
    stream and read on the other must stay referenced until its stream has waited for the
    reader, or be marked for the reader stream (``Tensor.record_stream``); the MoE hooks
    do this for every tensor they move across the switch (``moe_hooks``), so model code
    that goes through them is safe. Custom code that switches streams itself must do the
    same.

Warning (padding):
    Padding repeats the last real row (``pad_rows``). That is safe when a duplicated row
    only rewrites the state its original writes (e.g. the same KV-cache slot and
    position). Pass ``pad`` to fill padding rows differently (e.g. a scratch slot). A step
    that reads state its own rows wrote earlier in the same graph is not safe that way:
    ``MoEDecoder.decode`` over several steps reads its cache rows back, and a duplicate in
    another microbatch may have written them with differently rounded values.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CaptureError
from .greenlet_sched import UBatchScheduler
from .split import StaticCall, map_tensors, merge_outputs, pad_rows, split_tensors

__all__ = ["StepGraph", "CallGraph", "DBOGraphRunner", "GraphStats", "require_cuda"]

log = logging.getLogger("coop_dbo.cudagraph")


def require_cuda(what: str = "CUDA graph capture") -> None:
    """Raise ``CaptureError`` with a clear message when CUDA is not available."""
    if not torch.cuda.is_available():
        raise CaptureError(f"{what} needs a CUDA GPU, and torch.cuda.is_available() is "
                           "False here. On CPU run the model eagerly (UBatchScheduler or "
                           "CoopDBORunner with cuda_graph_sizes=None).")


def _input_mismatch(inputs: Sequence[Any], static: Sequence[torch.Tensor], *,
                    any_batch: bool) -> str:
    """``""`` when ``inputs`` match the captured ``static`` inputs in count, dtype, device
    and shape (``any_batch``: every dim but dim 0), else why not."""
    if len(inputs) != len(static):
        return f"the graph was captured with {len(static)} inputs, got {len(inputs)}"
    for i, (dst, src) in enumerate(zip(static, inputs, strict=True)):
        if isinstance(src, torch.Tensor) and src.dtype == dst.dtype and \
                src.device == dst.device and (
                    src.dim() == dst.dim() and src.shape[1:] == dst.shape[1:] if any_batch
                    else src.shape == dst.shape):
            continue
        got = (f"{src.dtype} {tuple(src.shape)} on {src.device}"
               if isinstance(src, torch.Tensor) else type(src).__name__)
        return (f"input {i} was captured as {dst.dtype} {tuple(dst.shape)} on "
                f"{dst.device}, got {got}")
    return ""


class StepGraph:
    """One CUDA graph of ``fn(*static_inputs)``.

    Args:
        fn: the step; takes the static input tensors, returns a tensor or a nested
            structure of tensors (the static outputs).
        static_inputs: input tensors that live as long as the graph; ``replay`` copies new
            data into them.
        pool: a memory pool handle shared with other graphs (``torch.cuda.graph_pool_handle()``).
        num_warmup: eager runs on a side stream before capture.
        keep_state: ``keep_state() -> restore()``, called before the warm-up runs; its
            ``restore`` runs after them, also when one raises (see the state warning).

    Warning (state):
        Warm-up runs the step for real. A step that advances state (a KV cache's position
        counter) would advance it ``num_warmup`` times: pass ``keep_state`` to save and
        restore that state, or make the step idempotent. The capture itself runs no
        kernel, so it advances nothing.
    """

    def __init__(self, fn: Callable[..., Any], static_inputs: Sequence[torch.Tensor], *,
                 pool: Any = None, num_warmup: int = 2,
                 keep_state: Callable[[], Callable[[], None]] | None = None) -> None:
        require_cuda()
        self.fn = fn
        self.static_inputs = tuple(static_inputs)
        self.pool = pool
        self.num_warmup = num_warmup
        self.keep_state = keep_state
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_outputs: Any = None
        self.capture_ms = 0.0
        self.pool_bytes = 0  # growth of reserved memory caused by this capture

    def capture(self) -> None:
        """Warm up on a side stream, then capture. On error the graph is discarded."""
        t0 = time.perf_counter()
        restore = self.keep_state() if self.keep_state is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(self.num_warmup):
                    self.fn(*self.static_inputs)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            if restore is not None:
                restore()
        # torch.cuda.graph empties the cache on entry; do it first so that the growth of
        # reserved memory over the capture is the graph pool's share.
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        reserved0 = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        failure: BaseException | None = None
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                try:
                    out = self.fn(*self.static_inputs)
                except BaseException as exc:
                    failure = exc
                    raise
        except BaseException as exc:
            graph = out = None  # type: ignore[assignment]  # nothing of it is kept
            torch.cuda.synchronize()
            if failure is not None and exc is not failure:
                # Ending a capture that the step's error left invalid raises a CUDA error
                # of its own; the user needs the step's error (e.g. YieldAsymmetryError).
                failure.add_note(f"coop_dbo: ending the failed capture also raised {exc!r}")
                raise failure from None
            raise
        torch.cuda.synchronize()
        self.graph = graph
        self.static_outputs = out
        self.capture_ms = (time.perf_counter() - t0) * 1e3
        self.pool_bytes = torch.cuda.memory_reserved() - reserved0

    def accepts(self, inputs: Sequence[Any]) -> str:
        """``""`` when ``inputs`` can be copied into the static inputs, else why not."""
        return _input_mismatch(inputs, self.static_inputs, any_batch=False)

    def replay(self, inputs: Sequence[torch.Tensor] | None = None) -> Any:
        """Copy ``inputs`` (same shapes as the static inputs) in, replay, return outputs.

        Raises ``ValueError`` for inputs of another count, shape, dtype or device (a copy
        would broadcast or convert silently and replay on the wrong data).
        """
        if self.graph is None:
            raise CaptureError("StepGraph.replay() before a successful capture(): call "
                               "capture() first; if it raised, fix that error and capture "
                               "again.")
        if inputs is not None:
            why = self.accepts(inputs)
            if why:
                raise ValueError(f"StepGraph.replay(): {why}. Capture a graph for these "
                                 "inputs, or run them eagerly.")
            for dst, src in zip(self.static_inputs, inputs, strict=True):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


class CallGraph:
    """One CUDA graph of a whole call described by the split layer (``StaticCall``):
    keyword arguments, nested containers and state objects such as a static KV cache.

    The call's tensors are cloned into static buffers; state objects stay the caller's
    own (the graph reads and writes their tensors in place, which is why their
    fingerprint is part of ``call.key``); other values are fixed at capture. Warm-up saves
    and restores the state objects' counters (``StepGraph``'s state warning).

    Args:
        step: ``step(*args, **kwargs)``, e.g. a runner's eager DBO step.
        call: the call to capture (``SplitPlan.static_call()``).
        pool / num_warmup: as for ``StepGraph``.
    """

    def __init__(self, step: Callable[..., Any], call: StaticCall, *, pool: Any = None,
                 num_warmup: int = 2) -> None:
        self.key = call.key
        self.replays = 0  # replays so far (the capturing call's own included)
        static = [t.clone() for t in call.tensors]
        args, kwargs = call.rebuild(static)

        def run(*_: torch.Tensor) -> Any:
            return step(*args, **kwargs)

        def keep_state() -> Callable[[], None]:
            restores = [snapshot() for snapshot in call.snapshots]

            def restore() -> None:
                for r in restores:
                    r()
            return restore

        self.graph = StepGraph(run, static, pool=pool, num_warmup=num_warmup,
                               keep_state=keep_state)
        self.graph.capture()

    def replay(self, call: StaticCall) -> Any:
        """Copy ``call``'s tensors in (it must have this graph's key), replay, return the
        static outputs (overwritten by the next replay)."""
        if call.key != self.key:
            raise ValueError("CallGraph.replay(): the call does not match the captured one "
                             "(structure, shapes, state objects or values differ).")
        self.replays += 1
        return self.graph.replay(call.tensors)


@dataclass
class GraphStats:
    """What capturing one batch size cost."""

    size: int
    capture_ms: float
    pool_bytes: int


def _agreed(error: BaseException | None, any_rank_failed: Callable[[bool], bool] | None,
            size: int) -> BaseException | None:
    """``error``, or where it is ``None`` and a peer rank failed (``any_rank_failed``, a
    collective every rank calls), a ``CaptureError`` saying so."""
    if any_rank_failed is None or not any_rank_failed(error is not None) or error is not None:
        return error
    return CaptureError(f"a peer rank failed to capture the step of batch {size} (see its "
                        "error), so this rank stops capturing too and no rank waits in a "
                        "collective. Fix that error; the next call captures again.")


class DBOGraphRunner:
    """A batch step, captured as one CUDA graph per batch size, replayed with padding.

    Args:
        fn: ``fn(*inputs) -> outputs`` for one (micro)batch; every input tensor has the
            batch as dim 0, outputs are tensors (or nested) with the batch as dim 0.
        example_inputs: ``example_inputs(size) -> tuple of tensors`` giving valid inputs
            of batch ``size`` on the GPU (used for warm-up and capture).
        sizes: batch sizes to capture (padded sizes).
        num_ubatches: microbatches per step; 1 captures ``fn`` on the whole batch (no DBO).
        pad: ``pad(inputs, size) -> inputs`` filling rows ``len..size``; default repeats
            the last row.
        clone_outputs: return copies instead of views of the static outputs.
        trace: trace the eager DBO fallback's yields.
        any_rank_failed: with expert parallelism, ``any_rank_failed(failed) -> bool``
            over the process group (every rank calls it twice per size: after making that
            size's example inputs, and after capturing it): a rank that failed there
            raises its error and every other rank raises ``CaptureError`` at the same
            point, instead of warming up (the step's collectives) while its peer does
            not. A failure inside a warm-up step, between two of its collectives, is not
            covered: its peers wait in the next one (give the process group a timeout,
            or use the runner's ``watchdog_s``).

    ``runner(*inputs)`` returns the outputs for the real rows; ``last_path`` says which
    path ran (``"graph:<size>"``, ``"eager-dbo"`` or ``"eager"``).
    """

    def __init__(self, fn: Callable[..., Any],
                 example_inputs: Callable[[int], Sequence[torch.Tensor]],
                 sizes: Sequence[int], *, num_ubatches: int = 2,
                 pad: Callable[[Sequence[torch.Tensor], int], Sequence[torch.Tensor]] | None = None,
                 clone_outputs: bool = False, trace: bool = False, num_warmup: int = 2,
                 any_rank_failed: Callable[[bool], bool] | None = None) -> None:
        require_cuda()
        if not sizes:
            raise ValueError("sizes must name at least one batch size to capture.")
        bad = [s for s in sizes if not isinstance(s, int) or s < num_ubatches]
        if bad:
            raise ValueError(f"every captured size must be an int >= num_ubatches="
                             f"{num_ubatches} (each microbatch needs a row); got {bad}.")
        self.fn = fn
        self.num_ubatches = num_ubatches
        self.sizes = sorted(set(sizes))
        self.pad = pad or (lambda inputs, size: tuple(pad_rows(t, size) for t in inputs))
        self.clone_outputs = clone_outputs
        self.scheduler = UBatchScheduler(num_ubatches, trace=trace)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, StepGraph] = {}
        self.stats: list[GraphStats] = []
        self.last_path = ""
        # Largest first, so smaller graphs reuse the pool memory of the larger ones.
        for size in reversed(self.sizes):
            g: StepGraph | None = None
            error: BaseException | None = None
            try:
                static = tuple(t.clone() for t in example_inputs(size))
                g = StepGraph(self.step, static, pool=self.pool, num_warmup=num_warmup)
            except BaseException as exc:
                error = exc
            # Twice per size with a process group: no rank may start the warm-up (which
            # runs the step's collectives) while a peer failed to get there, nor go on to
            # the next size while a peer's capture failed.
            error = _agreed(error, any_rank_failed, size)
            if error is None:
                assert g is not None
                try:
                    g.capture()
                except BaseException as exc:
                    error = exc
                error = _agreed(error, any_rank_failed, size)
            if error is not None:
                # The traceback keeps this frame alive: drop what it would pin in memory.
                static = g = None  # type: ignore[assignment]
                self.graphs.clear()
                raise error
            assert g is not None
            self.graphs[size] = g
            self.stats.append(GraphStats(size, g.capture_ms, g.pool_bytes))
        self.stats.reverse()

    def step(self, *inputs: torch.Tensor) -> Any:
        """One eager step: DBO over ``num_ubatches`` microbatches, or plain ``fn``."""
        if self.num_ubatches == 1:
            return self.fn(*inputs)
        chunks = split_tensors(inputs, self.num_ubatches)
        fn = self.fn
        outs = self.scheduler.run([functools.partial(fn, *c) for c in chunks])
        return merge_outputs(outs)

    def accepts(self, inputs: Sequence[Any]) -> bool:
        """Whether ``inputs`` match the captured ones in count, dtype, device and every
        dim but the batch (so that ``__call__`` replays instead of running eagerly)."""
        static = next(iter(self.graphs.values())).static_inputs
        return not _input_mismatch(inputs, static, any_batch=True)

    def size_for(self, batch: int) -> int | None:
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def __call__(self, *inputs: torch.Tensor) -> Any:
        batch = inputs[0].shape[0]
        size = self.size_for(batch) if self.accepts(inputs) else None
        if size is None:
            log.info("coop_dbo: batch %d (%d inputs) matches no captured graph (sizes up to "
                     "%d); running eagerly", batch, len(inputs), self.sizes[-1])
            self.last_path = "eager-dbo" if self.num_ubatches > 1 else "eager"
            return self.step(*inputs)
        if size != batch:
            inputs = tuple(self.pad(inputs, size))
        out = self.graphs[size].replay(inputs)
        self.last_path = f"graph:{size}"
        if size != batch:
            out = map_tensors(out, lambda t: t[:batch])
        if self.clone_outputs:
            out = map_tensors(out, torch.Tensor.clone)
        return out
