"""``CoopDBORunner``: the drop-in wrapper. Call it as you call the model, get the same result.

::

    runner = CoopDBORunner(model, num_ubatches=2)
    out = runner(*args, **kwargs)          # == model(*args, **kwargs)
    runner.last_path                       # "plain", "eager-dbo" or "graph:<size>"
    runner.last_trace                      # the yields of that step (trace=True)

What one call does:

1. **Plan.** The split layer (``coop_dbo.split``, whose module doc states the rules)
   finds the batch size and plans how every argument splits into balanced microbatches
   (larger ones first): batch tensors are sliced, containers split element by element,
   registered types (a ``transformers`` KV cache, registered by ``coop_dbo.hf``) split by
   their own function, everything else passed to every microbatch. An object that holds
   tensors and that the splitter does not know raises ``SplitError`` naming the argument:
   pass ``split=`` / ``merge=`` or ``coop_dbo.split.register_split_type``.
2. **Decide.** The model is called plainly (``last_path == "plain"``, ``last_reason`` says
   why) when the runner is disabled, the batch is empty or smaller than ``num_ubatches``
   (a microbatch would be empty), the step has fewer than ``min_tokens`` tokens, or the
   cost model says overlap does not pay. With a ``process_group`` every rank takes part in
   one small ``all_reduce`` per call, and all ranks take the same path: microbatch
   everywhere or nowhere; graph replay everywhere (padded to a common captured size) or
   nowhere. A rank whose arguments fail to plan or to split still joins that
   ``all_reduce`` and every rank raises, so no rank is left waiting in a collective. (An
   exception the *model* raises on one rank after that agreement cannot be coordinated:
   its peers wait in their next MoE collective until the process group's timeout. Give
   the group a timeout.)
3. **Run.** Eager DBO runs one greenlet per microbatch in a ``UBatchScheduler``; the MoE
   hooks inside the model yield at the all-to-all. With ``cuda_graph_sizes`` on a CUDA
   device, calls that qualify replay a ``DBOGraphRunner`` graph (see below).
4. **Merge.** Outputs are concatenated along dim 0 in microbatch order, through tuples,
   lists, dicts and ``ModelOutput``s; split KV caches are merged back into the cache object
   the caller passed (which is what the output then holds).

CUDA graphs (``cuda_graph_sizes``), two paths:

* **Batch tensors only** (no keyword arguments, every positional argument a CUDA tensor
  whose dim 0 is the batch: decode steps of the reference decoder). The graphs of every
  size are captured at the first such call, from that call's own inputs (rows cut or
  repeated to each size) unless ``graph_example_inputs(size)`` is given, by a
  ``DBOGraphRunner``; capture runs the model a few times (warm-up), so the model must
  tolerate repeating a step (e.g. KV writes to the same slots). Batches are padded by
  repeating their last row (``pad_rows``; see the padding warning in
  ``cudagraph_capture``: for graphs of several decode steps use ``DBOGraphRunner`` with
  ``pad=``) up to the smallest captured size; larger batches run eager DBO. With a
  ``process_group`` the ranks capture together (a rank holding graphs captures again
  when a peer has none), and a size that fails on one rank raises on every rank.
* **Whole calls** (keywords, nested containers, state objects such as a transformers
  ``StaticCache``: one token per row, e.g. ``generate``'s decode steps). Each distinct call
  (``SplitPlan.static_call``: structure, shapes, state objects at their addresses, other
  values) is captured as a ``CallGraph`` at its first step and replayed by the next ones;
  a batch between captured sizes is padded to the next one (``SplitType.pad``: padding
  rows write only scratch rows). Calls whose tensors move at every step stop being
  captured after a few tries; a failed capture falls back to eager with a warning. With
  a ``process_group`` the ranks agree in the per-step ``all_reduce`` whether to replay,
  capture or run eagerly, and after a capture whether it succeeded on every rank: any
  rank that must capture takes its peers with it (warm-up runs the step's collectives,
  so a peer replaying meanwhile would pair them wrongly), and calls that take different
  graph paths on different ranks run eagerly.

Graph outputs are cloned (the static buffers are reused by the next replay).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import inspect
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .autotune import CudaEventTimer, MeasuredDecider, StepTimer, WallTimer, bucket_of
from .forensics import StepForensics
from .greenlet_sched import UBatchScheduler
from .split import (
    DefaultSplitter,
    FunctionSplitter,
    MergeFn,
    SplitFn,
    SplitPlan,
    StaticCall,
    balanced_sizes,
    map_tensors,
    pad_rows,
    unpad_rows,
)
from .trace.record import TraceEntry

__all__ = [
    "CoopDBORunner",
    "StepInfo",
    "wrap_forward",
    "unwrap_forward",
]

log = logging.getLogger("coop_dbo.runner")

#: Captures of one path and batch in a row that no later call replayed, after which those
#: calls stop capturing (their inputs move every step); a new cache's first capture is one.
_MAX_UNREUSED_CAPTURES = 3

#: What a rank can do with the graph of a whole call's path (``_graph_readiness``), ordered
#: so that the maximum over ranks is what every rank does: replay only when every rank has
#: the graph, capture (again, where a rank has it) when any rank must, eager when any rank
#: cannot capture. Warm-up runs the step's collectives and the capture runs none, so ranks
#: that capture together run the same collectives, and a rank replaying while a peer
#: captures would pair them wrongly.
_REPLAY, _CAPTURE, _EAGER = 0, 1, 2

@dataclasses.dataclass
class StepInfo:
    """What one runner call did.

    Attributes:
        path: ``"plain"``, ``"eager-dbo"`` or ``"graph:<size>"``.
        reason: why this path: why the runner did not microbatch, or the measurement
            that decided it (``""`` when nothing but the defaults decided).
        batch_size: rows of this rank's batch.
        num_tokens: tokens of this rank's batch (see ``SplitPlan.num_tokens``).
        sizes: rows per microbatch (``[]`` on the plain path).
        trace: the yields of the step (empty unless tracing, and on the graph path).
    """

    path: str
    reason: str
    batch_size: int
    num_tokens: int
    sizes: list[int]
    trace: list[TraceEntry]


def _per_row_rule(per_row: Any, model: Callable[..., Any]
                  ) -> tuple[dict[int | str, bool], tuple[str, ...]]:
    """``per_row``, checked against ``model``'s signature where it has one, and the names
    of the model's positional parameters in order (so that a name also finds an argument
    passed by position)."""
    try:
        sig: inspect.Signature | None = inspect.signature(
            model.forward if isinstance(model, nn.Module) else model)
    except (TypeError, ValueError):  # builtins and the like: nothing to check against
        sig = None
    params = list(sig.parameters.values()) if sig is not None else []
    names = tuple(p.name for p in params if p.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    if per_row is None:
        return {}, names
    if not isinstance(per_row, Mapping):
        raise TypeError(f"CoopDBORunner: per_row must be a dict {{argument name or "
                        f"position: True (per row) or False (passed whole)}}, got "
                        f"{type(per_row).__name__} {per_row!r}.")
    keywords = {p.name for p in params if p.kind != inspect.Parameter.POSITIONAL_ONLY}
    any_keyword = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    any_position = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    for key, flag in per_row.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or (
                isinstance(key, int) and key < 0):
            raise TypeError(f"CoopDBORunner: per_row's keys are argument names (str) or "
                            f"positions (int >= 0), got {key!r}.")
        if not isinstance(flag, bool):
            raise TypeError(f"CoopDBORunner: per_row[{key!r}] must be True (per row) or "
                            f"False (passed whole), got {flag!r}.")
        if sig is None:
            continue
        if (isinstance(key, str) and key not in keywords and not any_keyword) or (
                isinstance(key, int) and key >= len(names) and not any_position):
            raise ValueError(f"CoopDBORunner: per_row names {key!r}, but the model takes "
                             f"no such argument; its signature is {sig}.")
    return dict(per_row), names


def _flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; else a ``TypeError`` (``"no"`` would count as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"CoopDBORunner: {name} must be True or False, got "
                        f"{type(value).__name__} {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class _Agreement:
    """One step's agreement between the ranks of a process group: each rank's own view
    goes in, and what comes out (the maximum of each field over ranks) is the same on
    every rank, so that every rank takes the same path and runs the same collectives.

    Attributes:
        failed: a rank failed to plan or split the step (every rank raises).
        reason: why the step runs plainly, ``""`` to microbatch (one rank's reason makes
            every rank plain).
        batch: this rank's batch in; the largest out (the graph size to pad to).
        graph_ok: every rank's call may run as a graph, and on the same graph path.
        readiness: ``(dbo, plain)``: ``_REPLAY`` / ``_CAPTURE`` / ``_EAGER`` for the
            graph of each path (``_graph_readiness``); out, the maximum over ranks.
        whole: the call goes the whole-call graph path; out, whether any rank's does.
        split_skipped: a rank that holds the call's DBO graph skipped the split before
            the agreement (``_replays_proven``); out, whether any rank did.
        schedule: out only: the reduced schedule-fingerprint fields
            (``StepForensics.agreement_fields``), for ``StepForensics.agreed_on`` once the
            step is ready to run.
    """

    failed: bool
    reason: str
    batch: int
    graph_ok: bool
    readiness: tuple[int, int]
    whole: bool
    split_skipped: bool
    schedule: tuple[int, ...] = ()


#: Sent with each capture agreement: every rank's all_reduce carries it and its negation,
#: so that MAX gives both back whole only when every rank contributed to this agreement.
_AGREEMENT_TAG = 0x44424F  # "DBO"

# What a rank's capture of a whole call came to, agreed as the maximum over the ranks:
# captured; failed (an Exception: that call runs eagerly from then on); stopped (an error
# that is not an Exception, such as KeyboardInterrupt: every rank raises, nothing stored).
_CAPTURE_OUTCOME_OK, _CAPTURE_OUTCOME_FAILED, _CAPTURE_OUTCOME_STOP = 0, 1, 2


def _rows_of(call: StaticCall) -> int:
    """The rows ``call`` runs at: ``StaticCall.rows``, or where a plan did not say (0),
    its first tensor's."""
    return call.rows or (call.tensors[0].shape[0] if call.tensors else 0)


@dataclasses.dataclass(frozen=True)
class _WholeCall:
    """A whole call on the graph path (``SplitPlan.static_call``), with what every rank
    agreed to do with the graph of each path (``_REPLAY``, ``_CAPTURE`` or ``_EAGER``:
    the maximum over ranks of ``CoopDBORunner._graph_readiness``)."""

    call: StaticCall
    dbo: int
    plain: int


# -- the runner ---------------------------------------------------------------------------

class CoopDBORunner:
    """Drop-in Dual-Batch Overlap wrapper: ``runner(*a, **kw)`` returns ``model(*a, **kw)``.

    Args:
        model: the model (an ``nn.Module`` or any callable). Its MoE communication must go
            through ``coop_dbo.moe_hooks.moe_exchange`` to overlap (for transformers models:
            ``coop_dbo.install_moe_hooks(model)``); without yields the microbatches simply
            run one after the other.
        num_ubatches: microbatches per step, 1 to 8.
        min_tokens: steps with fewer tokens run plainly (0: split whenever every
            microbatch gets at least one row).
        enabled: ``False`` always calls the model plainly (also settable later).
        split: ``split(args, kwargs, sizes) -> [(args_i, kwargs_i), ...]`` replacing the
            default splitter, or an object with ``plan(args, kwargs) -> SplitPlan``.
        merge: ``merge(outputs) -> output`` replacing the default merge.
        trace: record the yields of each step (``last_trace``); settable later.
        process_group: a ``torch.distributed`` group whose ranks must agree on the path of
            each step (expert parallelism); every rank must call the runner once per step.
        cuda_graph_sizes: batch sizes to capture as CUDA graphs (needs CUDA; see the
            module doc for which calls qualify).
        cost_model: an object with ``should_overlap(num_tokens) -> bool``; ``False`` runs
            the step plainly. A ``coop_dbo.cost_model.CostModel`` loaded from the
            calibration file ``make bench`` writes (or saved from ``calibration()``).
        decide: how a step without ``cost_model`` chooses between plain and DBO:
            ``"auto"`` (default) measures on CUDA devices and always microbatches on the
            CPU (where runs are for correctness); ``"measure"`` measures on any device;
            ``"always"`` always microbatches. Measuring (``coop_dbo.autotune``): per
            bucket of batch sizes, the first steps alternate plain and DBO, timed, and the
            faster path is kept; ``last_reason`` carries the figures.
        measure_trials: counted steps per path and bucket when measuring (after one
            warm-up step each).
        timer: a ``coop_dbo.autotune.StepTimer`` for measuring (default: CUDA events on a
            GPU, wall time otherwise).
        graph_example_inputs: ``fn(size) -> tuple of tensors`` for capture (default: the
            first qualifying call's inputs, rows cut or repeated).
        watchdog_s: a step (agreement included) that runs longer than this many seconds
            dumps where each microbatch stands (rich table on stderr, JSON file in
            ``dump_dir``), breaks the process group so that no rank waits for it and
            raises ``StepTimeoutError``; a rank whose step fails for another reason then
            also breaks the group, so its peers raise ``PeerRankError`` at once
            (``coop_dbo.forensics``), unless every rank raises at the same point after
            the ranks agreed on it (a failure while planning, or a batch-tensor capture
            that failed on some rank): the group then stays usable. ``None``
            (default): no watchdog.
        dump_dir: where dumps go (default ``<tmp>/coop_dbo``).
        check_schedule: with a ``process_group``, agree on a fingerprint of each step's
            schedule (microbatch count, graph sizes, expected yield sequence) in the
            per-step all_reduce, and hold the step to it (``ScheduleMismatchError`` on
            every rank when a rank differs).
        verify_schedule: also compare every step's yield sequence across ranks after it
            ran (debug; one more all_reduce per step).
        on_step: ``fn(StepInfo)`` called after every step (logging, metrics, tests).
        per_row: ``{argument name or position: bool}`` for the default splitter: ``True``,
            the argument's tensors are per row (dim 0 is the batch); ``False``, it is
            passed whole to every microbatch. For arguments whose dim 0 may equal the
            batch by chance (a weight passed as an argument); see ``coop_dbo.split``.

    Attributes:
        last_path / last_reason / last_trace / last_step: what the last call did.
        path_counts: ``Counter`` of paths taken since construction.

    Raises:
        CaptureError: ``cuda_graph_sizes`` without CUDA.
        SplitError: arguments the splitter cannot split (names the argument).

    .. warning::
        With expert parallelism over NCCL, the captured graphs hold NCCL collectives:
        ``torch.distributed.destroy_process_group()`` waits for ever while they exist (seen
        with torch 2.11 and NCCL 2.28 on 2 GPUs). Call ``release_graphs()`` (``unwrap()``
        does) on every rank before destroying the process group.
    """

    def __init__(self, model: Callable[..., Any], *, num_ubatches: int = 2,
                 min_tokens: int = 0, enabled: bool = True,
                 split: SplitFn | Any | None = None, merge: MergeFn | None = None,
                 trace: bool = False, process_group: Any = None,
                 cuda_graph_sizes: Sequence[int] | None = None, cost_model: Any = None,
                 graph_example_inputs: Callable[[int], Sequence[torch.Tensor]] | None = None,
                 on_step: Callable[[StepInfo], None] | None = None,
                 watchdog_s: float | None = None, dump_dir: str | None = None,
                 verify_schedule: bool = False, check_schedule: bool = True,
                 decide: str = "auto", measure_trials: int = 3,
                 timer: StepTimer | None = None,
                 per_row: Mapping[int | str, bool] | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module or a function), got "
                            f"{type(model).__name__}.")
        _flag("trace", trace)
        _flag("enabled", enabled)
        scheduler = UBatchScheduler(num_ubatches, trace=trace)  # validates num_ubatches
        if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}.")
        for name, fn in (("on_step", on_step), ("graph_example_inputs", graph_example_inputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"CoopDBORunner: {name} must be a function or None, got "
                                f"{type(fn).__name__} {fn!r}.")
        if cost_model is not None and not callable(getattr(cost_model, "should_overlap", None)):
            raise TypeError(f"cost_model must have a should_overlap(num_tokens) -> bool "
                            f"method; {type(cost_model).__name__} has none.")
        calibrated = getattr(cost_model, "num_ubatches", num_ubatches)
        if calibrated != num_ubatches:
            raise ValueError(f"the cost model was calibrated with {calibrated} microbatches "
                             f"but this runner uses num_ubatches={num_ubatches}: pass "
                             f"num_ubatches={calibrated}, or calibrate with {num_ubatches}.")
        if decide not in ("auto", "measure", "always"):
            raise ValueError(f"decide must be 'auto', 'measure' or 'always', got {decide!r}.")
        if decide == "measure" and cost_model is not None:
            raise ValueError("decide='measure' and a cost_model both choose the path: pass "
                             "one of them (a cost model from a calibration file already "
                             "holds measured decisions).")
        if timer is not None and not (callable(getattr(timer, "start", None))
                                      and callable(getattr(timer, "stop", None))):
            raise TypeError("timer must have start() -> token and stop(token) -> ms methods "
                            "(coop_dbo.autotune.StepTimer).")
        self.decide = decide
        self._decider = MeasuredDecider(measure_trials, timer=timer)
        rule, names = _per_row_rule(per_row, model)
        if rule and split is not None:
            raise ValueError("per_row applies to the default splitter, but split= replaces "
                             "it: state per-row arguments in your split function instead.")
        if split is not None and hasattr(split, "plan"):
            if merge is not None:
                raise ValueError("pass merge= only with a split function; a splitter object "
                                 "merges through the plans it makes.")
            self._splitter: Any = split
        elif split is not None or merge is not None:
            if split is not None and not callable(split):
                raise TypeError("split must be a function (args, kwargs, sizes) -> "
                                "[(args, kwargs), ...] or an object with plan(args, kwargs).")
            if merge is not None and not callable(merge):
                raise TypeError("merge must be a function (outputs) -> output.")
            self._splitter = FunctionSplitter(split, merge, per_row=rule, names=names)
        else:
            self._splitter = DefaultSplitter(rule, names)
        if process_group is not None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "CoopDBORunner(process_group=...) needs torch.distributed to be "
                    "initialised (dist.init_process_group, e.g. under torchrun) before the "
                    "runner is made; pass process_group=None for a single process.")
        self.graph_sizes: list[int] = []
        if cuda_graph_sizes is not None:
            from .cudagraph_capture import require_cuda

            require_cuda("CoopDBORunner(cuda_graph_sizes=...)")
            sizes = list(cuda_graph_sizes)
            bad = [s for s in sizes if not isinstance(s, int) or s < num_ubatches]
            if not sizes or bad:
                raise ValueError(f"cuda_graph_sizes must be ints >= num_ubatches="
                                 f"{num_ubatches} (each microbatch needs a row); got "
                                 f"{list(cuda_graph_sizes)}.")
            self.graph_sizes = sorted(set(sizes))
        self.model = model
        self.num_ubatches = num_ubatches
        self.min_tokens = min_tokens
        self.enabled = enabled
        self.process_group = process_group
        self.cost_model = cost_model
        self.graph_example_inputs = graph_example_inputs
        self.on_step = on_step
        self.scheduler = scheduler
        self._graphs: Any = None  # DBOGraphRunner, made at the first qualifying call
        # The last capture agreement of the batch-tensor graphs said some rank failed.
        self._capture_failed_together = False
        # CallGraph per (path, StaticCall.key), oldest first; None: its capture failed.
        self._call_graphs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._graph_pool: Any = None
        # Per (path, batch): the state objects and graph (None: failed) of the last
        # capture, and how many captures in a row were never replayed again (a call whose
        # tensors move every step, e.g. a cache that reallocates one); at
        # _MAX_UNREUSED_CAPTURES such calls run eagerly for good.
        self._last_capture: dict[tuple[str, int], tuple[tuple[int, ...], Any]] = {}
        self._unreused: collections.Counter[tuple[str, int]] = collections.Counter()
        self.last_step = StepInfo("", "", 0, 0, [], [])
        self.path_counts: collections.Counter[str] = collections.Counter()
        self._unwrap: Callable[[], None] | None = None
        self.forensics: StepForensics | None = None
        if process_group is not None or watchdog_s is not None:
            self.forensics = StepForensics(
                scheduler, lambda: self.process_group, num_ubatches=num_ubatches,
                watchdog_s=watchdog_s, dump_dir=dump_dir, verify_schedule=verify_schedule,
                check_schedule=check_schedule)

    # -- properties ------------------------------------------------------------------------

    @property
    def trace(self) -> bool:
        return self.scheduler.trace

    @trace.setter
    def trace(self, on: bool) -> None:
        self.scheduler.trace = _flag("trace", on)

    @property
    def enabled(self) -> bool:
        """``False``: every call runs the model plainly."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self._enabled = _flag("enabled", on)

    @property
    def last_path(self) -> str:
        return self.last_step.path

    @property
    def last_reason(self) -> str:
        return self.last_step.reason

    @property
    def last_trace(self) -> list[TraceEntry]:
        return self.last_step.trace

    def calibration(self, **profile: Any) -> Any:
        """The measured decisions as a ``CostModel`` (``profile``: ``gpu``, ``comm``,
        ``model_shape``, ``meta``); ``.save(path)`` adds it to a calibration file, and
        ``CoopDBORunner(cost_model=CostModel.load(path, ...))`` starts from it."""
        return self._decider.calibration(self.num_ubatches, **profile)

    def print_trace(self) -> None:
        """Render the last step's yields with rich (``coop_dbo.print_trace``)."""
        from .trace import print_trace

        print_trace(self.last_trace)

    # -- one step --------------------------------------------------------------------------

    def _local_decision(self, plan: SplitPlan) -> str:
        """``""`` when this rank can microbatch, else the reason it cannot."""
        n = self.num_ubatches
        if not self.enabled:
            return "disabled"
        if plan.batch_size == 0:
            return "empty batch"
        if plan.batch_size < n:
            return (f"batch of {plan.batch_size} is smaller than num_ubatches={n}: a "
                    "microbatch would be empty")
        if plan.num_tokens < self.min_tokens:
            return f"{plan.num_tokens} tokens < min_tokens={self.min_tokens}"
        if self.cost_model is not None and not self.cost_model.should_overlap(plan.num_tokens):
            return f"cost model: no overlap at {plan.num_tokens} tokens"
        return ""

    def _graph_eligible(self, plan: SplitPlan) -> tuple[bool, StaticCall | None]:
        """Whether this call may run as a graph, and for a whole call its ``StaticCall``."""
        if not (self.graph_sizes and plan.device is not None and plan.device.type == "cuda"):
            return False, None
        if not plan.graph_ok:
            # A whole call (keywords, a static KV cache): one token per row, and nothing a
            # graph cannot replay. A batch between captured sizes is padded to the next
            # one: per-row tensors repeat their last row, state objects get scratch rows
            # (SplitType.pad; a transformers cache is rebound to the first rows of larger
            # tensors, so the padding rows write only scratch).
            rows = next((s for s in self.graph_sizes if s >= plan.batch_size), None)
            if rows is None or plan.num_tokens != plan.batch_size:
                return False, None
            call = plan.static_call() if rows == plan.batch_size else plan.static_call(rows)
            return call is not None, call
        # Once captured, only calls whose inputs match the captured ones (count, dtype,
        # device, every dim but the batch) may replay; others run eagerly.
        graphs = self._graphs
        return graphs is None or graphs.accepts(getattr(plan, "args", ())), None

    def _agree(self, mine: _Agreement, num_chunks: int | None = None) -> _Agreement:
        """Every rank: what all ranks agree from each rank's own view (``mine``), in one
        all_reduce (MAX) of a few int64s: see ``_Agreement``.

        The same all_reduce carries the schedule fingerprint (``coop_dbo.forensics``):
        ``_call`` hands it to ``StepForensics.agreed_on`` when the step is ready to run
        (ranks that differ raise ``ScheduleMismatchError`` there, all of them); until
        then the step is still being planned, and an error every rank raises together
        leaves the process group as it is.
        """
        import torch.distributed as dist

        fx = self.forensics
        # (the setup states the configuration, graph sizes or none, not whether this call
        # may replay: ranks whose calls differ there agree below to run without graphs)
        extra = [] if fx is None else fx.agreement_fields(
            bool(self.graph_sizes), self.num_ubatches if num_chunks is None else num_chunks,
            self.graph_sizes)
        whole = int(mine.whole)
        flags = torch.tensor([int(mine.failed), int(bool(mine.reason)), mine.batch,
                              int(not mine.graph_ok), *mine.readiness, whole, -whole,
                              int(mine.split_skipped), *extra],
                             dtype=torch.int64, device=self._group_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        values = flags.tolist()
        (failed, plain, batch, not_graph, dbo_ready, plain_ready, any_whole,
         neg_all_whole, skipped) = (int(x) for x in values[:9])
        if any_whole and neg_all_whole == 0:  # (-max(-whole) is the min) some, not all
            not_graph = 1
        reason = mine.reason or ("a peer rank cannot microbatch this step" if plain else "")
        return _Agreement(bool(failed), reason, batch, not not_graph,
                          (dbo_ready, plain_ready), bool(any_whole), bool(skipped),
                          tuple(int(x) for x in values[9:]))

    def _group_device(self) -> torch.device:
        """Where the process group's agreement tensors live (NCCL: the current GPU)."""
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.forensics is not None:
            return self.forensics.guard(self._call, args, kwargs)
        return self._call(*args, **kwargs)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        failure: BaseException | None = None
        plan: SplitPlan | None = None
        reason = ""
        chunks: list[tuple[tuple, dict]] | None = None
        graph_ok, call = False, None
        readiness = (_EAGER, _EAGER)
        try:
            plan = self._splitter.plan(args, kwargs)
            reason = self._local_decision(plan)
            # (only a step that may microbatch: padding moves a cache into larger tensors)
            if not reason:
                graph_ok, call = self._graph_eligible(plan)
            if call is not None:
                readiness = (self._graph_readiness("dbo", call),
                             self._graph_readiness("plain", call))
            elif graph_ok:  # batch tensors: every size captured at once, or none yet
                readiness = (_REPLAY if self._graphs is not None else _CAPTURE, _EAGER)
            if not reason and (not graph_ok or not self._replays_proven(call)):
                # Split before the ranks agree, so that a split error (a cache of another
                # batch, a user split function) is a planning failure every rank sees,
                # not a raise on one rank while its peers enter the MoE collectives. A
                # graph-eligible call of batch tensors only (whose split cannot fail), or
                # one whose key already has a graph (its split ran at that capture, on
                # the same state), is split only if it does not replay.
                chunks = plan.split(balanced_sizes(plan.batch_size, self.num_ubatches))
        except BaseException as exc:
            if self.process_group is None:
                raise
            failure = exc
        batch = plan.batch_size if plan is not None else 0
        common = batch
        if self.process_group is not None:
            split_skipped = call is not None and chunks is None and not reason
            agreed = self._agree(_Agreement(failure is not None, reason, batch, graph_ok,
                                            readiness, call is not None, split_skipped),
                                 len(chunks) if chunks is not None else None)
            any_failed, reason, common = agreed.failed, agreed.reason, agreed.batch
            graph_ok, readiness = agreed.graph_ok, agreed.readiness
            if not any_failed and agreed.split_skipped and not reason and not (
                    graph_ok and readiness[0] == _REPLAY):
                # A rank holding this call's DBO graph skipped the split, and the step
                # will not replay it: split now, and agree again, so that a split that
                # fails here fails on every rank, not on one while its peers run on.
                if split_skipped:
                    chunks, failure = self._split_now(plan)
                if self._any_rank(failure is not None) and failure is None:
                    any_failed = True
            if failure is not None:
                raise failure
            if any_failed:
                raise RuntimeError(
                    "CoopDBORunner: a peer rank failed to prepare this step (see its "
                    "error); this rank stops too, so that no rank waits in a collective.")
            if self.forensics is not None:
                self.forensics.agreed_on(agreed.schedule, microbatched=not reason)
        assert plan is not None
        if not graph_ok:
            call = None  # a peer rank cannot replay this step
        elif call is None and readiness[0] == _CAPTURE and self._graphs is not None:
            # A peer rank has no batch-tensor graphs (new, or released): capture again
            # with it, or this rank's replay would pair with the peer's warm-up.
            self._free_graphs(batch_tensors=True)
        whole = None if call is None else _WholeCall(call, *readiness)
        note = ""  # why DBO runs, when a measurement decided it
        if not reason and self._measures(plan):
            bucket = bucket_of(common)
            trial = self._decider.next_path(bucket)
            if trial is not None:
                return self._measured_step(trial, bucket, plan, args, kwargs, chunks,
                                           graph_ok, common, whole)
            decided = self._decider.trials(bucket)
            if decided.use_dbo:
                note = decided.describe()
            else:
                return self._plain_step(plan, args, kwargs, decided.describe(), whole)
        if reason:
            return self._plain_step(plan, args, kwargs, reason)
        return self._dbo_step(plan, args, chunks, graph_ok, common, note, whole)

    def _split_now(self, plan: SplitPlan | None
                   ) -> tuple[list[tuple[tuple, dict]] | None, BaseException | None]:
        """``(chunks, None)``, or ``(None, error)`` where the split raised."""
        assert plan is not None
        try:
            return plan.split(balanced_sizes(plan.batch_size, self.num_ubatches)), None
        except BaseException as exc:
            return None, exc

    def _measures(self, plan: SplitPlan) -> bool:
        """Whether this runner decides by measuring for this call (see ``decide``)."""
        if self.decide == "always" or self.cost_model is not None:
            return False
        if self.decide == "measure":
            return True
        return plan.device is not None and plan.device.type == "cuda"  # "auto"

    def _plain_step(self, plan: SplitPlan, args: tuple, kwargs: dict, reason: str,
                    whole: _WholeCall | None = None) -> Any:
        """The call run plainly; with ``whole`` (a step measured against a DBO graph) as
        a graph too."""
        if whole is not None:
            out = self._replay_call("plain", self.model, whole)
            if out is not None:
                self._record(StepInfo(f"graph-plain:{_rows_of(whole.call)}", reason,
                                      plan.batch_size, plan.num_tokens, [], []))
                return out
        out = self.model(*args, **kwargs)
        self._record(StepInfo("plain", reason, plan.batch_size, plan.num_tokens, [], []))
        return out

    def _eager_dbo_call(self, *args: Any, **kwargs: Any) -> Any:
        """One eager DBO step of a call: split, microbatch greenlets, merge."""
        plan = self._splitter.plan(args, kwargs)
        chunks = plan.split(balanced_sizes(plan.batch_size, self.num_ubatches))
        model = self.model
        outs = self.scheduler.run([functools.partial(model, *a, **k) for a, k in chunks])
        return plan.merge(outs)

    def _replay_call(self, kind: str, step: Callable[..., Any], whole: _WholeCall) -> Any:
        """Replay the graph of ``step`` over ``whole.call``, capturing it first where the
        ranks agreed to (``_REPLAY`` / ``_CAPTURE`` / ``_EAGER``); ``None``: the step runs
        eagerly (the agreement said so, or a capture failed on some rank)."""
        call = whole.call
        key = (kind, call.key)
        batch = _rows_of(call)
        agreed = whole.dbo if kind == "dbo" else whole.plain
        if agreed == _EAGER:
            if key not in self._call_graphs and self._unreused_after(kind, batch, call) \
                    >= _MAX_UNREUSED_CAPTURES > self._unreused[(kind, batch)]:
                self._unreused[(kind, batch)] = _MAX_UNREUSED_CAPTURES
                log.warning("coop_dbo: the %s step of batch %d came with new tensor "
                            "addresses at %d steps in a row (an input or cache that is "
                            "reallocated every step), so no graph was ever replayed; these "
                            "calls run eagerly from now on", kind, batch,
                            _MAX_UNREUSED_CAPTURES + 1)
            return None
        if agreed == _CAPTURE:
            self._capture(kind, step, call, key, batch)
        graph = self._call_graphs[key]
        if graph is None:
            return None
        self._call_graphs.move_to_end(key)
        return call.finish(map_tensors(graph.replay(call), torch.Tensor.clone))

    def _capture(self, kind: str, step: Callable[..., Any], call: StaticCall,
                 key: Hashable, batch: int) -> None:
        """Capture the graph of ``step`` over ``call`` into ``_call_graphs[key]`` (``None``
        where it failed on this rank or, with a process group, on any rank: those calls
        then run eagerly). An error that is not an ``Exception`` (``KeyboardInterrupt``)
        stops the step with nothing stored for ``key``, so that a later call may capture
        it again; with a process group it stops it on every rank (its peers raise
        ``RuntimeError``), after the ranks agreed."""
        from .cudagraph_capture import CallGraph

        self._unreused[(kind, batch)] = self._unreused_after(kind, batch, call)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        self._call_graphs.pop(key, None)  # captured again where a peer rank needs it
        while len(self._call_graphs) >= 2 * len(self.graph_sizes):
            self._call_graphs.popitem(last=False)  # the oldest (e.g. an older cache)
        error: BaseException | None = None
        try:
            graph: Any = CallGraph(step, call, pool=self._graph_pool)
        except BaseException as exc:  # eager is always correct: fall back to it
            graph, error = None, exc
        # An error that is not an Exception (KeyboardInterrupt) stops the step; with a
        # process group it stops it on every rank, or the others would go on into the
        # eager step's collectives without the interrupted one.
        stop = error is not None and not isinstance(error, Exception)
        if self.process_group is not None:
            agreed = self._agree_max(_CAPTURE_OUTCOME_STOP if stop
                                     else _CAPTURE_OUTCOME_FAILED if error is not None
                                     else _CAPTURE_OUTCOME_OK)
            if agreed is None or agreed == _CAPTURE_OUTCOME_STOP:
                if error is None:
                    error = RuntimeError(
                        "CoopDBORunner: a peer rank was interrupted while capturing this "
                        "step (see its error), so this rank stops the step too and no rank "
                        "waits in its collectives; the next call captures again."
                        if agreed is not None else
                        "CoopDBORunner: a peer rank did not answer the agreement on this "
                        "step's capture (it failed inside the capture's warm-up, between "
                        "two collectives); this rank stops the step.")
                graph, stop = None, True
                if agreed is not None and self.forensics is not None:
                    self.forensics.failed_together()  # every rank raises here
            elif agreed == _CAPTURE_OUTCOME_FAILED and graph is not None:
                graph, error = None, RuntimeError("a peer rank's capture of this step "
                                                  "failed")
        if error is not None:
            # Later captures go to a new pool: a capture the step invalidated leaves
            # its pool unusable for the next one ("already recording to mempool_id").
            self._graph_pool = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if stop:
                raise error  # nothing stored for key: a later call captures again
        self._call_graphs[key] = graph
        if error is not None:
            log.warning("coop_dbo: capturing the %s step of batch %d failed (%s: %s); "
                        "these calls run eagerly from now on", kind, batch,
                        type(error).__name__, error)
        self._last_capture[(kind, batch)] = (call.states, graph)

    def _any_rank(self, flag: bool) -> bool:
        """Every rank of the process group: whether ``flag`` holds on any rank (also
        ``True`` when not every rank answered: ``_agree_max``)."""
        return self._agree_max(int(flag)) != 0

    def _capture_agreement(self, failed: bool) -> bool:
        """``_any_rank`` for ``DBOGraphRunner``'s ``any_rank_failed``, remembering a
        failure that every rank agreed on (then every rank raises at the same point)."""
        agreed = self._agree_max(int(failed))
        self._capture_failed_together = agreed == 1
        return agreed != 0

    def _agree_max(self, value: int) -> int | None:
        """Every rank: the maximum of ``value`` (>= 0) over the ranks, or ``None`` when
        not every rank answered this agreement. The all_reduce carries a tag and its
        negation: a rank whose peer failed inside a warm-up, between two of its
        collectives, may have its all_reduce paired with that peer's other collective;
        the tag then does not come back whole, and the caller must not take a failure as
        agreed (so a watchdog still breaks the group for the peer)."""
        import torch.distributed as dist

        t = torch.tensor([value, _AGREEMENT_TAG, -_AGREEMENT_TAG], dtype=torch.int64,
                         device=self._group_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        agreed, tag, neg_tag = (int(x) for x in t.tolist())
        return agreed if tag == _AGREEMENT_TAG == -neg_tag else None

    def _replays_proven(self, call: StaticCall | None) -> bool:
        """Whether a graph-eligible step needs no early split: batch tensors only
        (``call`` is ``None``), or a whole call whose DBO graph was captured (a split of
        the same state objects, at the same addresses and sizes, ran in that capture).
        A decode step of a transformers model would otherwise split its cache at every
        step only to throw the parts away (1.7 ms of host time at 16 layers)."""
        return call is None or self._call_graphs.get(("dbo", call.key)) is not None

    def _graph_readiness(self, kind: str, call: StaticCall) -> int:
        """What this rank can do with the graph of ``kind`` over ``call``: ``_REPLAY``
        (captured), ``_CAPTURE`` (a new key worth capturing) or ``_EAGER`` (its capture
        failed, or captures of these calls are never replayed). Changes nothing."""
        graph = self._call_graphs.get((kind, call.key), False)
        if graph is not False:
            return _EAGER if graph is None else _REPLAY
        batch = _rows_of(call)
        if self._unreused_after(kind, batch, call) >= _MAX_UNREUSED_CAPTURES:
            return _EAGER
        return _CAPTURE

    def _unreused_after(self, kind: str, batch: int, call: StaticCall) -> int:
        """The count of unreused captures of ``(kind, batch)`` that capturing ``call`` now
        would make: one more when the last capture was over the same state objects (the
        same cache) and only the call that captured it replayed it (a cache whose tensors
        move every step would capture every step), else 0 (a new cache starts again).
        From ``_MAX_UNREUSED_CAPTURES`` on, these calls are not captured any more."""
        group = (kind, batch)
        count = self._unreused[group]
        if count >= _MAX_UNREUSED_CAPTURES:
            return count
        last = self._last_capture.get(group)
        if last is not None and last[0] == call.states and (last[1] is None
                                                             or last[1].replays <= 1):
            return count + 1
        return 0

    def _dbo_step(self, plan: SplitPlan, args: tuple,
                  chunks: list[tuple[tuple, dict]] | None, graph_ok: bool, common: int,
                  note: str, whole: _WholeCall | None = None) -> Any:
        if graph_ok and whole is not None:
            out = self._replay_call("dbo", self._eager_dbo_call, whole)
            if out is not None:
                rows = _rows_of(whole.call)
                self._record(StepInfo(f"graph:{rows}", note, plan.batch_size,
                                      plan.num_tokens,
                                      balanced_sizes(rows, self.num_ubatches), []))
                return out
        elif graph_ok:
            size = next((s for s in self.graph_sizes if s >= common), None)
            if size is not None:
                return self._graph_step(plan, args, size, note)
        sizes = balanced_sizes(plan.batch_size, self.num_ubatches)
        if chunks is None:  # graph-eligible, but no captured size holds it, a peer's call
            chunks = plan.split(sizes)  # is not or its replay failed: a split proven above
        model = self.model
        fx = self.forensics
        schedule = fx.schedule_for_run() if fx is not None else None
        outs = self.scheduler.run([functools.partial(model, *a, **k) for a, k in chunks],
                                  schedule=schedule)
        if fx is not None:
            fx.ran()
        out = plan.merge(outs)
        self._record(StepInfo("eager-dbo", note, plan.batch_size, plan.num_tokens, sizes,
                              list(self.scheduler.last_trace)))
        return out

    def _measured_step(self, trial: str, bucket: int, plan: SplitPlan, args: tuple,
                       kwargs: dict, chunks: list[tuple[tuple, dict]] | None, graph_ok: bool,
                       common: int, whole: _WholeCall | None) -> Any:
        """One step of the measuring phase of ``bucket``: the path ``trial``, timed."""
        decider = self._decider
        timer = decider.timer
        if timer is None:
            timer = (CudaEventTimer() if plan.device is not None and plan.device.type == "cuda"
                     else WallTimer())
        t = decider.trials(bucket)
        n = len(t.plain_ms if trial == "plain" else t.dbo_ms) + 1
        label = (f"measuring batch bucket {bucket}: {trial} step {n} of "
                 f"{decider.warmup + decider.num_trials}")
        token = timer.start()
        if trial == "plain":
            out = self._plain_step(plan, args, kwargs, label, whole)
        else:
            out = self._dbo_step(plan, args, chunks, graph_ok, common, label, whole)
        decider.record(bucket, "dbo" if trial == "dbo" else "plain", timer.stop(token),
                       plan.num_tokens)
        if decider.ready(bucket):
            decided = decider.decide(bucket, self._agree_medians
                                     if self.process_group is not None else None)
            log.info("coop_dbo: %s", decided.describe())
        return out

    def _agree_medians(self, medians: list[float]) -> list[float]:
        """Every rank: the maximum over ranks of each path's median (ms)."""
        import torch.distributed as dist

        t = torch.tensor(medians, dtype=torch.float64, device=self._group_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        return [float(v) for v in t.tolist()]

    def _graph_step(self, plan: SplitPlan, args: tuple, size: int, note: str = "") -> Any:
        from .cudagraph_capture import DBOGraphRunner

        batch = plan.batch_size
        if self._graphs is None:
            example = self.graph_example_inputs
            if example is None:
                first = tuple(a.detach().clone() for a in args)

                def example(s: int) -> tuple[torch.Tensor, ...]:
                    return tuple(pad_rows(a[:s], s) for a in first)
            self._capture_failed_together = False
            try:
                self._graphs = DBOGraphRunner(
                    self.model, example, self.graph_sizes, num_ubatches=self.num_ubatches,
                    clone_outputs=True, trace=self.trace,
                    any_rank_failed=None if self.process_group is None
                    else self._capture_agreement)
            except BaseException:
                if self._capture_failed_together and self.forensics is not None:
                    # Every rank raises here (its own error or CaptureError), after the
                    # ranks agreed that a capture failed: nobody waits in a collective.
                    self.forensics.failed_together()
                raise
            if self.forensics is not None:
                self.forensics.captured(self._graphs.scheduler)
        if batch != size:
            args = tuple(pad_rows(a, size) for a in args)
        out = self._graphs(*args)
        if batch != size:
            out = unpad_rows(out, size, batch)
        self._record(StepInfo(f"graph:{size}", note, batch, plan.num_tokens,
                              balanced_sizes(size, self.num_ubatches), []))
        return out

    def _record(self, info: StepInfo) -> None:
        self.last_step = info
        self.path_counts[info.path] += 1
        if self.on_step is not None:
            self.on_step(info)

    # -- wrapping a module's forward -------------------------------------------------------

    def release_graphs(self) -> None:
        """Drop every captured CUDA graph and its memory pool (a later qualifying call
        captures again). Needed before ``destroy_process_group()`` (the class warning)."""
        if self._graphs is None and not self._call_graphs:
            return
        self._free_graphs(batch_tensors=True, whole_calls=True)

    def _free_graphs(self, *, batch_tensors: bool = False, whole_calls: bool = False
                     ) -> None:
        """Drop the batch-tensor graphs and / or the whole-call ones, and their memory."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # no replay may still be running on the device
        if batch_tensors:
            self._graphs = None
        if whole_calls:
            self._call_graphs.clear()
            self._last_capture.clear()
            self._unreused.clear()
            self._graph_pool = None
        gc.collect()  # graphs referenced from cycles (closures over the runner)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def unwrap(self) -> None:
        """Undo ``wrap_forward``: the module's own ``forward`` is back, and the runner's
        CUDA graphs are released (``release_graphs``)."""
        if self._unwrap is None:
            raise RuntimeError("this runner was not installed with wrap_forward(); nothing "
                               "to unwrap.")
        self._unwrap()
        self._unwrap = None
        self.release_graphs()

    def __repr__(self) -> str:
        return (f"CoopDBORunner(num_ubatches={self.num_ubatches}, enabled={self.enabled}, "
                f"min_tokens={self.min_tokens}, graph_sizes={self.graph_sizes}, "
                f"last_path={self.last_path!r})")


_WRAPPED_ATTR = "__coop_dbo_runner__"


def wrap_forward(module: nn.Module, **runner_kwargs: Any) -> CoopDBORunner:
    """Route ``module.forward`` through a new ``CoopDBORunner`` (on this instance only).

    Afterwards ``module(...)``, and everything that calls it (``transformers``'
    ``generate()``, pipelines), runs through the runner; forward hooks of the module run
    once per call, outside the microbatches. ``inspect.signature(module.forward)`` still
    shows the original signature (``generate`` inspects it). Undo with ``runner.unwrap()``
    or ``unwrap_forward(module)``.

    For a transformers model it also sets ``generation_config.disable_compile`` (restored
    by the unwrap): ``generate`` would otherwise compile the forward of a model with a
    static cache, and compiling cannot trace through the microbatch switches. With
    ``cuda_graph_sizes``, decode steps of ``generate(..., cache_implementation="static")``
    replay CUDA graphs instead (see the module doc).

    Args:
        module: the model.
        **runner_kwargs: ``CoopDBORunner`` arguments.
    Returns:
        the runner (read ``last_path``, ``last_trace`` from it).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap_forward needs an nn.Module, got {type(module).__name__}; "
                        "wrap a plain function with CoopDBORunner(fn) directly.")
    current = module.__dict__.get("forward")
    if current is not None and getattr(current, _WRAPPED_ATTR, None) is not None:
        raise RuntimeError(f"{type(module).__name__}.forward is already wrapped by a "
                           "CoopDBORunner: call unwrap_forward(module) first.")
    original = module.forward
    runner = CoopDBORunner(original, **runner_kwargs)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return runner(*args, **kwargs)

    setattr(forward, _WRAPPED_ATTR, runner)
    module.forward = forward
    # transformers' generate compiles the forward of a model with a static cache on a GPU;
    # torch.compile cannot trace through greenlet switches, and the runner captures CUDA
    # graphs itself, so that is turned off while the runner is installed.
    gen_cfg: Any = getattr(module, "generation_config", None)
    has_switch = gen_cfg is not None and hasattr(gen_cfg, "disable_compile")
    compile_was = gen_cfg.disable_compile if has_switch else None
    if has_switch:
        gen_cfg.disable_compile = True

    def undo() -> None:
        if module.__dict__.get("forward") is not forward:
            raise RuntimeError(f"{type(module).__name__}.forward was replaced again after "
                               "wrap_forward(); restore that first.")
        if current is None:
            del module.forward
        else:
            module.forward = current
        if has_switch:
            gen_cfg.disable_compile = compile_was

    runner._unwrap = undo
    return runner


def unwrap_forward(module: nn.Module) -> None:
    """Undo ``wrap_forward(module)``."""
    current = module.__dict__.get("forward")
    runner = getattr(current, _WRAPPED_ATTR, None) if current is not None else None
    if runner is None:
        raise RuntimeError(f"{type(module).__name__}.forward is not wrapped by a "
                           "CoopDBORunner.")
    runner.unwrap()
