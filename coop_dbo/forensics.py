"""Cross-rank forensics of runner steps: no rank hangs in silence.

``CoopDBORunner`` makes one ``StepForensics`` when it has a ``process_group`` or a
``watchdog_s``. It does four things around each step.

**Schedule fingerprint** (with a process group). The runner's per-step ``all_reduce``
(``CoopDBORunner._agree``, a MAX over a few int64s) carries six more: a digest of the
rank's setup (microbatch count; the runner's CUDA graph sizes, if any), a digest
of the yield sequence the step is expected to follow, and the step count, each as ``x``
and ``-x``, so that ``max(x) != -max(-x)`` (max differs from min) tells every rank at
once that some rank differs. Only then are the ranks' descriptions gathered
(``all_gather_object``) to name the first differing yield and both sequences, and every
rank raises ``ScheduleMismatchError`` before the step runs, the group still in step.
The expected sequence is the one the last successful microbatched step with the same
call signature (the arguments' plain values and the ranks of their tensors, see
``call_signature``) yielded on this rank, or the sequence a CUDA graph capture yielded;
none is known before the first such step. A rank that knows none, where its peers know
one, agrees when the prefix its last failed step reached (if any) fits theirs, and
then adopts it. ``verify_schedule=True`` (debug) also compares each step's sequence
after it ran, one more all_reduce per step.

**The agreed schedule during the step.** The runner passes the agreed sequence to
``UBatchScheduler.run(schedule=)``: a microbatch that yields elsewhere, or returns
early, raises at that yield, before it reaches a transfer its peers would wait for. A
rank whose step fails that way (or with any ``YieldAsymmetryError``) writes what
happened into the process group's store and **breaks the group** (``break_group``): its
peers' pending and next collectives fail at once, they read the store, and raise the
same ``ScheduleMismatchError``, instead of waiting for the group's timeout.

**Watchdog** (``watchdog_s``). A step (agreement included) that runs longer dumps, on
the watchdog thread (``coop_dbo.watchdog``), where each microbatch stands (site, yield
index, stream, backend call in flight, time since its last yield) as a rich table on
stderr and a JSON file, tells the peers, breaks the group and ends the step with
``StepTimeoutError``. With the watchdog on, a rank whose step fails for any other reason
also tells its peers and breaks the group (``PeerRankError`` there), and every rank whose
step fails writes a dump: each rank leaves a file, also those that only waited.

**Breaking a group.** NCCL: ``ProcessGroup.abort()`` (the pending kernels end; a peer's
kernels waiting for this rank end only by its own watchdog or NCCL's timeout). gloo: no
abort ends a pending gloo operation (measured on torch 2.13: ``abort``, ``shutdown`` and
a shorter ``set_timeout`` all leave it waiting for the group's timeout), but a receive
that times out closes the rank's connections ("Application timeout caused pair
closure"), which fails this rank's pending operations and, on the other side of each
connection, the peer's ("Connection closed by peer"). So the group is broken by a
receive on a tag nobody sends, waited for 1 ms. Either way the group is unusable
afterwards: destroy it and create a new one on every rank, then set
``runner.process_group`` (and the group of a backend that was given one explicitly);
the runner refuses to run on a group it broke (``GroupBrokenError``).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import importlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import (
    GroupBrokenError,
    PeerRankError,
    ScheduleMismatchError,
    StepTimeoutError,
    YieldAsymmetryError,
)
from .greenlet_sched import UBatchScheduler
from .watchdog import (
    StepMonitor,
    Watch,
    build_record,
    monitoring,
    render_record,
    reset_monitoring,
)

__all__ = [
    "StepForensics",
    "Schedule",
    "call_signature",
    "break_group",
    "sequence_text",
]

_MASK = (1 << 62) - 1  # digests fit int64 with their negation
_UNKNOWN = 1  # the digest of "no schedule known" (a real digest is never 1, see _digest)
_BREAK_TAG = 0x0C00DB0  # gloo tag of the receive that breaks a group; nobody sends on it
_MAX_SCHEDULES = 32  # call signatures remembered per runner
_RUNNER_IDS = itertools.count()  # numbers StepForensics in the order they are made


def _digest(text: str) -> int:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h & _MASK) | 2  # never 0 or _UNKNOWN


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A yield sequence of one microbatch: ``sites[k]`` and ``kinds[k]`` of yield ``k``.

    ``digest`` is a 62-bit hash of both (``Schedule.of`` computes it).
    """

    sites: tuple[str, ...]
    kinds: tuple[str, ...]
    digest: int

    @classmethod
    def of(cls, sites: Sequence[str], kinds: Sequence[str]) -> Schedule:
        # Interned, so the scheduler's identity test of kinds holds for adopted sequences.
        s = tuple(sys.intern(str(x)) for x in sites)
        k = tuple(sys.intern(str(x)) for x in kinds)
        return cls(s, k, _digest("\x1f".join(f"{a}\x1e{b}" for a, b in zip(s, k,
                                                                           strict=True))))

    def is_prefix_of(self, other: Schedule) -> bool:
        n = len(self.sites)
        return other.sites[:n] == self.sites and other.kinds[:n] == self.kinds


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _TENSOR_OF_DIM[value.dim()] if value.dim() < 8 else ("tensor", value.dim())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


_TENSOR_OF_DIM = [("tensor", d) for d in range(8)]  # shared, not built per call


def call_signature(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    """What selects a call's expected yield sequence: plain values (None, bool, int,
    float, str) as they are, tensors by their number of dims, other objects by type
    name, keyword names in order. Calls of one signature must yield alike (e.g.
    ``decode(tokens, positions, slots, num_steps)`` yields per ``num_steps``)."""
    return (tuple(_plain(a) for a in args),
            tuple((k, _plain(v)) for k, v in kwargs.items()))


def sequence_text(sites: Sequence[str], index: int | None, *, ended: bool = True,
                  limit: int = 12) -> str:
    """``[a, b, >c<, ...] (n yields)``: a sequence with the yield at ``index`` marked
    (``>end<`` when it ends there); long ones keep their start, the stretch around
    ``index`` and their end."""
    items = [repr(s) for s in sites]
    if index is not None:
        if index < len(items):
            items[index] = f">{items[index]}<"
        else:
            items.append(">end<" if ended else ">stopped<")
    if len(items) > limit:
        centre = len(items) - 1 if index is None else min(index, len(items) - 1)
        keep = sorted({0, 1, len(items) - 1} | set(range(max(0, centre - 2),
                                                          min(len(items), centre + 3))))
        parts, last = [], -1
        for i in keep:
            if i != last + 1:
                parts.append("...")
            parts.append(items[i])
            last = i
        items = parts
    return f"[{', '.join(items)}] ({len(sites)} yields)"


def _first_difference(a: Schedule, b: Schedule) -> int:
    n = min(len(a.sites), len(b.sites))
    for k in range(n):
        if a.sites[k] != b.sites[k] or a.kinds[k] != b.kinds[k]:
            return k
    return n


def break_group(group: Any) -> str:
    """Break ``group`` so that every pending and later operation on it fails at once,
    here and at its peers (see the module doc); returns what was done, for messages."""
    import torch
    import torch.distributed as dist

    pg: Any = group if group is not None else dist.group.WORLD
    if dist.get_backend(group) == "gloo":
        me, size = dist.get_rank(group), dist.get_world_size(group)
        t = torch.zeros(1)
        for peer in range(size):
            if peer == me:
                continue
            try:
                pg.recv([t], peer, _BREAK_TAG).wait(datetime.timedelta(milliseconds=1))
            except Exception:
                pass  # the timeout we want, or a connection already closed
        return "closed its gloo connections"
    try:
        pg.abort()
    except Exception as exc:  # a backend without abort: the group's timeout remains
        return f"could not abort the {dist.get_backend(group)} group ({exc})"
    return f"aborted the {dist.get_backend(group)} group"


_RECOVER = ("The process group is broken: destroy it and create a new one on every rank "
            "(dist.destroy_process_group(); dist.init_process_group(...)), then set "
            "runner.process_group (docs/FAULTS.md).")


class StepForensics:
    """Fingerprint, watchdog and peer announcements of one ``CoopDBORunner``.

    Args:
        scheduler: the runner's scheduler (positions, traces, sequences).
        group_of: returns the runner's current process group (``None``: one process).
        num_ubatches: the runner's microbatch count.
        watchdog_s: the step limit in seconds, or ``None`` (no watchdog).
        dump_dir: where JSON dumps go (default ``<tmp>/coop_dbo``); dumps are written
            when the watchdog is on or ``dump_dir`` is given.
        verify_schedule: also compare every step's yield sequence after it ran.
        check_schedule: agree on the fingerprint and hold each step to it.
    """

    def __init__(self, scheduler: UBatchScheduler, group_of: Callable[[], Any], *,
                 num_ubatches: int, watchdog_s: float | None = None,
                 dump_dir: str | os.PathLike[str] | None = None,
                 verify_schedule: bool = False, check_schedule: bool = True) -> None:
        self.scheduler = scheduler
        self.group_of = group_of
        self.num_ubatches = num_ubatches
        self.verify_schedule = bool(verify_schedule)
        self.check_schedule = bool(check_schedule)
        self.dumps = watchdog_s is not None or dump_dir is not None
        if self.dumps:  # imported now, not on the failure path (seconds on a busy host)
            for name in ("rich.console", "rich.table"):
                importlib.import_module(name)
        self.dump_dir = os.fspath(dump_dir) if dump_dir is not None else os.path.join(
            tempfile.gettempdir(), "coop_dbo")
        self.step = 0  # calls started; the same on every rank (checked by the fingerprint)
        self.phase = "idle"  # "plan" until the ranks agreed on this step, then "run"
        self.signature: tuple = ((), ())  # of the current call
        # The sequence of the last successful microbatched step per call signature.
        self.schedules: collections.OrderedDict[tuple, Schedule] = collections.OrderedDict()
        # How far the last failed step got, for the signature it ran with.
        self.partial: tuple[tuple, Schedule] | None = None
        self.agreed: Schedule | None = None  # the schedule this step runs under
        self.broken: Any = None  # a group broken in a step of this runner (refused)
        self.broken_step = -1  # the step it was broken in
        self.broken_by = -1  # the rank that broke it
        self.last_dump: str | None = None  # path of the last dump written
        self.monitor = StepMonitor(num_ubatches) if watchdog_s is not None else None
        self.watch = Watch(watchdog_s, self._on_fire) if watchdog_s is not None else None
        self._fired: dict[str, Any] | None = None  # the watchdog's record of this step
        self._ran = False  # this step ran the scheduler (its positions are this step's)
        # This step's error is raised by every rank at the same point (``failed_together``):
        # no rank waits for another, so the group is left usable.
        self._together = False
        self._setup_text = ""  # this rank's setup, as agreement_fields described it
        self._setups: dict[tuple, tuple[str, int]] = {}  # setup key -> (text, digest)
        # Names this runner's keys in the group's store: every rank must make its runners
        # in the same order (as it must call them in the same order).
        self._uid = next(_RUNNER_IDS)

    # -- around one call -------------------------------------------------------------------

    def guard(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` (one runner step) under the checks."""
        group = self.group_of()
        self.step += 1  # every call counts, on every rank, also those refused here
        if group is not None and group is self.broken:
            raise GroupBrokenError(
                f"the process group of this runner was broken in step {self.broken_step} "
                f"(by rank {self.broken_by}) so that no rank waited for a failed one (see "
                f"that step's error), and it is still runner.process_group. {_RECOVER}")
        self.phase = "plan"
        self.agreed = None
        self._fired = None
        self._ran = False
        self._together = False
        if group is not None and self.check_schedule:
            self.signature = call_signature(args, kwargs)
        token = None
        watch = self.watch
        if watch is not None:
            assert self.monitor is not None
            self.monitor.reset()
            token = monitoring(self.monitor)
            watch.arm(self.step)
        err: BaseException | None = None
        out: Any = None
        try:
            try:
                out = fn(*args, **kwargs)
            except BaseException as exc:  # also the watchdog's StepTimeoutError
                err = exc
        except StepTimeoutError as late:  # it landed in the handler itself
            err = late
        fired = watch.disarm() if watch is not None else False
        if token is not None:
            reset_monitoring(token)
        try:
            if err is not None or fired:
                failure = self._failed(err, fired)
                if failure is err:
                    raise failure
                if isinstance(err, StepTimeoutError) and err.step < 0:
                    raise failure from None  # the watchdog's bare interrupt: no cause
                raise failure from err
        finally:
            self.phase = "idle"
        return out

    # -- the fingerprint -------------------------------------------------------------------

    def _expected(self) -> Schedule | None:
        return self.schedules.get(self.signature)

    def _setup(self, graph_ok: bool, num_chunks: int, graph_sizes: Sequence[int]
               ) -> tuple[str, int]:
        """This rank's setup as text and its digest (cached: it rarely changes)."""
        key = (graph_ok, num_chunks, tuple(graph_sizes) if graph_ok else (),
               self.verify_schedule)
        found = self._setups.get(key)
        if found is None:
            graphs = f"graph sizes {list(graph_sizes)}" if graph_ok else "eager"
            text = (f"{num_chunks} microbatches, {graphs}"
                    + (", verify_schedule" if self.verify_schedule else ""))
            found = self._setups[key] = (text, _digest(text))
        return found

    def agreement_fields(self, graph_ok: bool, num_chunks: int,
                         graph_sizes: Sequence[int]) -> list[int]:
        """The int64s this rank adds to the runner's per-step all_reduce (MAX)."""
        if not self.check_schedule:
            return []
        self._setup_text, setup = self._setup(graph_ok, num_chunks, graph_sizes)
        expected = self._expected()
        seq = expected.digest if expected is not None else _UNKNOWN
        return [setup, -setup, seq, -seq, self.step, -self.step]

    def agreed_on(self, values: Sequence[int], microbatched: bool) -> None:
        """After the all_reduce: ``values`` are the reduced fields of
        ``agreement_fields``. Raises ``ScheduleMismatchError`` on every rank when the
        ranks differ (and the step would microbatch); else the step runs."""
        if self.check_schedule and microbatched and (
                values[0] != -values[1] or values[2] != -values[3]
                or values[4] != -values[5]):
            self._reconcile()
        self.agreed = self._expected() if self.check_schedule else None
        self.phase = "run"

    def schedule_for_run(self) -> tuple[Sequence[str], Sequence[str]] | None:
        """The agreed sequence for ``UBatchScheduler.run(schedule=)``, if any (the
        runner calls this right before it runs the microbatches)."""
        self.phase = "run"
        self._ran = True
        a = self.agreed
        return None if a is None else (a.sites, a.kinds)

    def failed_together(self) -> None:
        """The error about to leave this step is raised by every rank at the same point,
        after they agreed that it failed (a capture that failed on some rank): no rank is
        left in a collective, so it is raised as it is, and the group is not broken."""
        self._together = True

    def ran(self) -> None:
        """After an eager DBO step returned: remember its sequence; verify it if asked."""
        sched = self.scheduler
        if self.group_of() is None or not self.check_schedule or not sched.last_complete:
            return
        if self.agreed is None:
            self._remember(Schedule.of(sched.last_sites, sched.last_kinds))
        if self.verify_schedule:
            self._verify(Schedule.of(sched.last_sites, sched.last_kinds))

    def captured(self, scheduler: UBatchScheduler) -> None:
        """After a CUDA graph capture: its sequence is what replays of this call do."""
        if scheduler.last_complete and self.check_schedule:
            self._remember(Schedule.of(scheduler.last_sites, scheduler.last_kinds))

    def _remember(self, schedule: Schedule) -> None:
        self.schedules[self.signature] = schedule
        self.schedules.move_to_end(self.signature)
        while len(self.schedules) > _MAX_SCHEDULES:
            self.schedules.popitem(last=False)
        if self.partial is not None and self.partial[0] == self.signature:
            self.partial = None

    def _gather(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        import torch.distributed as dist

        group = self.group_of()
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def _describe(self) -> dict[str, Any]:
        import torch.distributed as dist

        expected = self._expected()
        partial = self.partial[1] if (self.partial is not None
                                      and self.partial[0] == self.signature) else None
        return {"rank": dist.get_rank(self.group_of()), "step": self.step,
                "setup": self._setup_text,
                "schedule": None if expected is None else (expected.sites, expected.kinds),
                "partial": None if partial is None else (partial.sites, partial.kinds)}

    def _reconcile(self) -> None:
        """The fingerprints differ: gather every rank's description; adopt a schedule
        that only some ranks knew (when the others' partial steps fit it), or raise the
        same ``ScheduleMismatchError`` on every rank."""
        infos = self._gather(self._describe())
        n = self.step
        steps = {i["rank"]: i["step"] for i in infos}
        if len(set(steps.values())) > 1:
            raise ScheduleMismatchError(
                "the ranks are at different steps of this runner: "
                + ", ".join(f"rank {r} at call {s}" for r, s in steps.items())
                + ". Every rank must call the runner once per step (a rank that skipped or "
                "repeated a call desynchronises every collective after it).", step=n)
        setups = {i["rank"]: i["setup"] for i in infos}
        if len(set(setups.values())) > 1:
            raise ScheduleMismatchError(
                f"the ranks disagree on the setup of step {n}: "
                + "; ".join(f"rank {r}: {s}" for r, s in setups.items())
                + ". Every rank must split each step into the same number of microbatches "
                "and, where a call may replay a CUDA graph, capture the same sizes (pass the "
                "same num_ubatches, split and cuda_graph_sizes on every rank); the step did "
                "not run on any rank.", step=n, setups=setups)
        known = {i["rank"]: Schedule.of(*i["schedule"]) for i in infos if i["schedule"]}
        partial = {i["rank"]: Schedule.of(*i["partial"]) for i in infos if i["partial"]}
        digests = {s.digest for s in known.values()}
        if len(digests) == 1:
            full = next(iter(known.values()))
            if all(p.is_prefix_of(full) for r, p in partial.items() if r not in known):
                self._remember(full)  # the ranks that knew none adopt it
                return
        # Name the first difference: the lowest rank against the first that differs.
        seqs = {**{r: (p, False) for r, p in partial.items()},
                **{r: (s, True) for r, s in known.items()}}
        for info in infos:
            seqs.setdefault(info["rank"], (Schedule.of((), ()), False))
        ranks = sorted(seqs)
        a = ranks[0]
        sa, ca = seqs[a]
        b = next((r for r in ranks[1:] if seqs[r][0].digest != sa.digest
                  or seqs[r][1] != ca), ranks[1])
        sb, cb = seqs[b]
        k = _first_difference(sa, sb)

        same_site = k < min(len(sa.sites), len(sb.sites)) and sa.sites[k] == sb.sites[k]

        def at(s: Schedule, complete: bool) -> str:
            if k < len(s.sites):  # the kind matters only where the sites agree
                return f"yields at {s.sites[k]!r}" + (f" ({s.kinds[k]})" if same_site else "")
            return (f"returns (its microbatches yield {len(s.sites)} times)" if complete
                    else "has no known yield (its last step stopped before it)")

        def line(r: int, s: Schedule, complete: bool) -> str:
            what = "" if complete else " (how far its last, failed step got)"
            return f"rank {r}{what}: {sequence_text(s.sites, k, ended=complete)}"

        raise ScheduleMismatchError(
            f"the ranks disagree on the DBO schedule of step {n}: at yield {k} rank {a} "
            f"{at(sa, ca)} and rank {b} {at(sb, cb)}. {line(a, sa, ca)}; "
            f"{line(b, sb, cb)}. Every rank must run the same model with the same yield "
            "points (each sequence is the last completed step with these call arguments on "
            "that rank); the step did not run on any rank.",
            step=n, index=k,
            sites={a: sa.sites[k] if k < len(sa.sites) else None,
                   b: sb.sites[k] if k < len(sb.sites) else None},
            sequences={a: list(sa.sites), b: list(sb.sites)}, setups=setups)

    def _verify(self, schedule: Schedule) -> None:
        """Debug: every rank compares the sequence its step just yielded."""
        import torch
        import torch.distributed as dist

        group = self.group_of()
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        t = torch.tensor([schedule.digest, -schedule.digest], dtype=torch.int64,
                         device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        hi, neg_lo = t.tolist()
        if hi == -neg_lo:
            return
        infos = self._gather({"rank": dist.get_rank(group),
                              "sites": schedule.sites, "kinds": schedule.kinds})
        seqs = {i["rank"]: Schedule.of(i["sites"], i["kinds"]) for i in infos}
        ranks = sorted(seqs)
        a = ranks[0]
        b = next(r for r in ranks if seqs[r].digest != seqs[a].digest)
        k = _first_difference(seqs[a], seqs[b])
        raise ScheduleMismatchError(
            f"verify_schedule: the ranks yielded different sequences in step {self.step}: "
            f"rank {a}: {sequence_text(seqs[a].sites, k)}; rank {b}: "
            f"{sequence_text(seqs[b].sites, k)}.", step=self.step, index=k,
            sites={r: seqs[r].sites[k] if k < len(seqs[r].sites) else None for r in (a, b)},
            sequences={r: list(seqs[r].sites) for r in (a, b)})

    # -- failures --------------------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        import torch.distributed as dist

        group = self.group_of()
        if group is None:
            return 0, 1
        return dist.get_rank(group), dist.get_world_size(group)

    def _key(self, step: int, rank: int) -> str:
        return f"coop_dbo/forensics/{self._uid}/{step}/{rank}"

    def _store(self) -> Any:
        from torch.distributed import distributed_c10d as c10d

        pg: Any = self.group_of()
        if pg is None:
            pg = c10d.GroupMember.WORLD
        return c10d._get_process_group_store(pg)

    def _announce(self, step: int, kind: str, message: str, **extra: Any) -> None:
        """Tell the peers (through the group's store) why this rank ends ``step``."""
        rank, _ = self._rank()
        record = {"rank": rank, "kind": kind, "message": message, **extra}
        try:
            self._store().set(self._key(step, rank), json.dumps(record))
        except Exception:  # the peers then see only the broken group
            pass

    def _lookup(self, step: int) -> list[dict[str, Any]]:
        """What peers announced about ``step``, lowest rank first."""
        rank, world = self._rank()
        found = []
        try:
            store = self._store()
            for r in range(world):
                key = self._key(step, r)
                if r != rank and store.check([key]):
                    found.append(json.loads(store.get(key)))
        except Exception:
            pass
        return found

    def _break(self, step: int) -> str:
        group = self.group_of()
        how = break_group(group)
        self._mark_broken(step, self._rank()[0])
        return how

    def _mark_broken(self, step: int, by: int) -> None:
        self.broken = self.group_of()
        self.broken_step = step
        self.broken_by = by

    def _positions_text(self, positions: Sequence[dict[str, Any]]) -> str:
        parts = []
        for u in positions:
            where = (f"at yield {u['index']} ({u['site']!r})" if u["site"] is not None
                     else "before its first yield")
            op = f", in {u['op']}" if u.get("op") else ""
            parts.append(f"microbatch {u['ubatch']} {u['state']} {where}{op}")
        return "; ".join(parts) if parts else "no microbatch had started"

    def _record(self, event: str, error: str | None, *, live: bool) -> dict[str, Any]:
        sched = self.scheduler
        rank, world = self._rank()
        started = self.watch.started_at if self.watch is not None else time.monotonic()
        return build_record(
            event=event, rank=rank, world=world, step=self.step,
            positions=(sched.positions() if live else
                       sched.last_positions if self._ran else []),
            monitor=self.monitor, elapsed_s=time.monotonic() - started,
            limit_s=self.watch.limit_s if self.watch is not None else None,
            phase=self.phase,
            schedule=None if self.agreed is None else (self.agreed.sites, self.agreed.kinds),
            trace=(sched.live_trace() if live else sched.last_trace if self._ran else []),
            error=error)

    def _dump_path(self, step: int) -> str:
        rank, _ = self._rank()
        return os.path.join(self.dump_dir,
                            f"coop_dbo-runner{self._uid}-step{step}-rank{rank}.json")

    def _write(self, record: dict[str, Any]) -> str | None:
        path = self._dump_path(record["step"])
        try:
            os.makedirs(self.dump_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)
        except OSError:
            return None
        self.last_dump = path
        try:
            render_record(record)
        except Exception:
            pass
        return path

    def _on_fire(self, step: int) -> None:
        """The watchdog thread: the step passed its limit."""
        assert self.watch is not None
        record = self._record("watchdog", None, live=True)
        self._fired = record
        group = self.group_of()
        if group is not None:
            message = (f"rank {record['rank']}'s watchdog ended step {step} after "
                       f"{self.watch.limit_s:g} s")
            self._announce(step, "watchdog", message, dump=self._dump_path(step))
            record["broke"] = self._break(step)
        record["dump"] = self._write(record)

    def _failed(self, err: BaseException | None, fired: bool) -> BaseException:
        """The error to raise for a step that raised ``err`` (or passed its limit)."""
        step = self.step
        group = self.group_of()
        rank, _ = self._rank()
        sched = self.scheduler
        if (self._ran and self.check_schedule and not sched.last_complete
                and self._expected() is None):
            self.partial = (self.signature, Schedule.of(sched.last_sites, sched.last_kinds))
        if fired:
            return self._timeout_error(err)
        assert err is not None
        if group is None or self.phase != "run" or self._together:
            if self.phase == "run" and self.dumps:
                self._write(self._record("failure", f"{type(err).__name__}: {err}",
                                         live=False))
            return err
        if isinstance(err, YieldAsymmetryError):
            failure: BaseException = self._deviation_error(err, rank)
            self._announce(step, "schedule", str(failure),
                           index=getattr(failure, "index", None),
                           sites=list(getattr(failure, "sites", {}).items()),
                           sequences=list(getattr(failure, "sequences", {}).items()))
            self._break(step)
        else:
            peers = self._lookup(step)
            if peers:
                failure = self._peer_error(peers, err, rank)
                self._mark_broken(step, peers[0]["rank"])
            elif self.watch is not None:
                self._announce(step, "failure", f"{type(err).__name__}: {err}")
                how = self._break(step)
                err.add_note(f"coop_dbo: rank {rank} {how} so that its peers stop too. "
                             f"{_RECOVER}")
                failure = err
            else:
                failure = err
        if self.dumps:
            self._write(self._record("failure", f"{type(failure).__name__}: {failure}",
                                     live=False))
        return failure

    def _deviation_error(self, err: YieldAsymmetryError, rank: int) -> BaseException:
        """A microbatch of this rank left the agreed schedule (or its microbatches
        disagreed): the error this rank raises, and announces."""
        step = self.step
        k = err.index
        if not err.agreed or self.agreed is None:
            err.add_note(f"coop_dbo: rank {rank} stopped before its next transfer and "
                         f"broke the process group so that its peers stop too. {_RECOVER}")
            return err
        agreed = self.agreed
        mine = list(agreed.sites[:k]) + ([err.actual_site] if err.actual_site is not None
                                         else [])
        did = (f"yielded at {err.actual_site!r}" if err.actual_site is not None
               else "returned")
        want = (f"{err.expected_site!r}" if err.expected_site is not None
                else "no more yields")
        return ScheduleMismatchError(
            f"rank {rank} left the DBO schedule the ranks agreed on, in step {step}: at "
            f"yield {k} its microbatch {err.ubatch} {did} where the schedule has {want}. "
            f"agreed: {sequence_text(agreed.sites, k)}; rank {rank}, microbatch "
            f"{err.ubatch}: {sequence_text(mine, k)}. It stopped before its next transfer "
            "and broke the process group, so that no rank waits for it. Make the yields "
            "independent of the data (call moe_exchange in every MoE layer, also when no "
            f"token is routed). {_RECOVER}", step=step, index=k,
            sites={-1: err.expected_site, rank: err.actual_site},
            sequences={-1: list(agreed.sites), rank: mine})

    def _peer_error(self, peers: list[dict[str, Any]], err: BaseException,
                    rank: int) -> BaseException:
        """This rank's step failed because a peer ended it (the first announcement)."""
        first = peers[0]
        tail = (f" This rank ({rank}) stopped when its collectives with rank "
                f"{first['rank']} failed ({type(err).__name__}).")
        if first["kind"] == "schedule":
            return ScheduleMismatchError(f"{first['message']}{tail}", step=self.step,
                                         index=first.get("index"),
                                         sites=dict(first.get("sites") or []),
                                         sequences=dict(first.get("sequences") or []))
        if first["kind"] == "watchdog":
            return StepTimeoutError(
                f"{first['message']} (its dump: {first.get('dump')}).{tail} {_RECOVER}",
                step=self.step, limit_s=self.watch.limit_s if self.watch else 0.0,
                dump=first.get("dump"), rank=first["rank"])
        return PeerRankError(
            f"rank {first['rank']} failed in step {self.step}: {first['message']}.{tail} "
            f"{_RECOVER}", step=self.step, rank=first["rank"], error=first["message"])

    def _timeout_error(self, err: BaseException | None) -> StepTimeoutError:
        assert self.watch is not None
        record = self._fired or self._record("watchdog", None, live=False)
        rank = record["rank"]
        where = self._positions_text(record["ubatches"])
        broke = f" It {record['broke']}." if record.get("broke") else ""
        recover = f" {_RECOVER}" if record.get("broke") else ""
        return StepTimeoutError(
            f"CoopDBORunner step {self.step} ran longer than the watchdog limit of "
            f"{self.watch.limit_s:g} s on rank {rank} ({record['phase']} phase): {where}. "
            f"Dump: {record.get('dump')}.{broke}{recover}",
            step=self.step, limit_s=self.watch.limit_s, dump=record.get("dump"), rank=rank)
