"""Cross-rank forensics: the schedule fingerprint, the agreed schedule, the watchdog, the
merged view (``coop_dbo.forensics``, ``coop_dbo.watchdog``, ``coop_dbo.trace.merge``).

The gloo tests run ``forensics_workers.forensics_worker`` on 2 and 4 ranks (one spawn
each, under a parent-side deadline) and check every rank's outcome of every step.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import threading
import time
from contextlib import redirect_stdout

import pytest
import torch
from fault_workers import SMALL_CFG_KW, FaultySingleProcessBackend, spawn_bounded, step_inputs
from forensics_workers import STEPS, forensics_worker
from helpers import rendezvous_files, run_sequential

from coop_dbo import CoopDBORunner, UBatchScheduler, YieldAsymmetryError, dbo_yield
from coop_dbo.errors import StepTimeoutError
from coop_dbo.forensics import sequence_text
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.moe_hooks import layer_sites
from coop_dbo.trace.__main__ import main as trace_main
from coop_dbo.trace.merge import chrome_trace, first_divergence, load_rank_file

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CFG = MoEConfig.tiny(**SMALL_CFG_KW)
AGREED = layer_sites("switch", CFG.num_layers)  # one microbatch's sites of the decoder
RECOVER = ("The process group is broken: destroy it and create a new one on every rank "
           "(dist.destroy_process_group(); dist.init_process_group(...)), then set "
           "runner.process_group (docs/FAULTS.md).")


# -- the agreed schedule in the scheduler ----------------------------------------------------

def program(sites: list[str]):
    def run() -> int:
        for s in sites:
            dbo_yield(s)
        return len(sites)
    return run


def test_scheduler_holds_every_microbatch_to_an_agreed_schedule() -> None:
    sched = UBatchScheduler(2)
    assert sched.run([program(["a", "b"]), program(["a", "b"])]) == [2, 2]
    assert (list(sched.last_sites), list(sched.last_kinds), sched.last_complete) == (
        ["a", "b"], ["yield", "yield"], True)
    schedule = (sched.last_sites, sched.last_kinds)
    assert sched.run([program(["a", "b"])] * 2, schedule=schedule) == [2, 2]
    cases = [  # (the microbatches' programs, expected message start)
        ((["a", "b"], ["a", "c"]), "Microbatch 1 yielded at index 1 at site 'c', but the "
         "agreed schedule has site 'b' there."),
        ((["a", "b"], ["a"]), "Microbatch 1 returned after 1 yields, but the agreed schedule "
         "has 2 (next: site 'b')."),
        ((["a", "b", "c"], ["a", "b"]), "Microbatch 0 yielded at index 2 (site 'c'), but the "
         "agreed schedule ends after 2 yields."),
    ]
    for progs, message in cases:
        with pytest.raises(YieldAsymmetryError) as info:
            sched.run([program(p) for p in progs], schedule=schedule)
        assert str(info.value).startswith(message)
        assert info.value.agreed is True
    # the same asymmetric program when nothing was agreed: the microbatches' own check
    with pytest.raises(YieldAsymmetryError) as info:
        sched.run([program(["a", "b"]), program(["a", "c"])])
    assert str(info.value).startswith("Microbatch 1 yielded at index 1 at site 'c', but the "
                                      "microbatch that reached index 1 first yielded at site "
                                      "'b'.")
    assert info.value.agreed is False
    # all microbatches may deviate alike from a schedule: it still raises, at microbatch 0
    with pytest.raises(YieldAsymmetryError) as info:
        sched.run([program(["a"]), program(["a"])], schedule=schedule)
    assert (info.value.ubatch, info.value.index, info.value.expected_site) == (0, 1, "b")
    assert [(p.ubatch, p.state, p.index, p.site) for p in sched.last_positions] == [
        (0, "raised", 1, "a"), (1, "unwound", 1, "a")]
    assert (list(sched.last_sites), sched.last_complete) == (["a"], False)


def test_positions_read_from_another_thread_while_a_microbatch_waits() -> None:
    sched = UBatchScheduler(2)
    release = threading.Event()
    seen: list = []

    def waits() -> None:
        dbo_yield("x")
        while not release.is_set():  # a host-side wait, as a transfer's poll loop
            time.sleep(0.001)
        dbo_yield("y")

    def look() -> None:
        time.sleep(0.05)
        seen.extend((p.ubatch, p.state, p.index, p.site) for p in sched.positions())
        release.set()

    t = threading.Thread(target=look)
    t.start()
    sched.run([waits, waits])
    t.join()
    assert seen == [(0, "running", 1, "x"), (1, "parked", 1, "x")]
    assert sched.positions() == []


# -- the watchdog in one process ---------------------------------------------------------------

def test_watchdog_ends_a_hung_transfer_dumps_and_the_next_step_is_exact(tmp_path) -> None:
    backend = FaultySingleProcessBackend(CFG.num_experts)
    backend.arm_fault(None)
    model = MoEDecoder(CFG, backend)
    assert CoopDBORunner(model).forensics is None  # off by default: nothing is armed
    limit = 1.0
    runner = CoopDBORunner(model, watchdog_s=limit, dump_dir=str(tmp_path), trace=True)
    inputs = step_inputs(CFG, 6, 0, seed=1)
    runner(*inputs)
    backend.arm_fault("combine_transfer", ubatch=1, call=1, kind="hang")
    backend.timeout_s = 60.0  # a host-side loop polling a transfer that never completes
    t0 = time.monotonic()
    with pytest.raises(StepTimeoutError) as info:
        runner(*step_inputs(CFG, 6, 1, seed=2))
    elapsed = time.monotonic() - t0
    uid = runner.forensics._uid  # type: ignore[union-attr]  # the runner's number
    dump = str(tmp_path / f"coop_dbo-runner{uid}-step2-rank0.json")
    # microbatch 1 hangs in layer 1's combine transfer (its second one); microbatch 0
    # yielded at layer 1's moe.post and waits for it
    assert str(info.value) == (
        f"CoopDBORunner step 2 ran longer than the watchdog limit of {limit:g} s on rank 0 "
        "(run phase): microbatch 0 parked at yield 8 ('L1.moe.post'); microbatch 1 running "
        f"at yield 7 ('L1.moe.combine'), in combine_transfer. Dump: {dump}.")
    assert (info.value.step, info.value.limit_s, info.value.dump, info.value.rank) == (
        2, limit, dump, 0)
    assert limit <= elapsed < limit + 2.0  # the grace period is half the limit
    record = load_rank_file(dump)
    assert (record["event"], record["step"], record["phase"]) == ("watchdog", 2, "run")
    by_ub = {u["ubatch"]: u for u in record["ubatches"]}
    assert (by_ub[1]["state"], by_ub[1]["site"], by_ub[1]["op"]) == (
        "running", "L1.moe.combine", "combine_transfer")
    assert (by_ub[0]["state"], by_ub[0]["index"], by_ub[0]["op"]) == ("parked", 8, None)
    assert limit - 0.2 < by_ub[1]["op_s"] < limit + 0.5
    assert len(record["trace"]) == 15  # 8 yields of microbatch 0, 7 of microbatch 1
    # the fault removed, the same runner is exact again and nothing stays armed
    backend.arm_fault(None)
    ref = MoEDecoder(CFG, FaultySingleProcessBackend(CFG.num_experts))
    for step in (2, 3):
        inputs = step_inputs(CFG, 7, step, seed=10 + step)
        assert torch.equal(runner(*inputs), run_sequential(ref, inputs, 2))
    time.sleep(limit + 0.2)  # a watchdog that stayed armed would fire into this sleep


@pytest.mark.parametrize("bad", [0, -1.0, "2", True, float("nan")])
def test_watchdog_limit_must_be_positive_seconds(bad) -> None:
    with pytest.raises(ValueError) as info:
        CoopDBORunner(MoEDecoder(CFG), watchdog_s=bad)
    assert str(info.value) == f"watchdog_s must be a number of seconds > 0, got {bad!r}."


def test_sequence_text_keeps_start_divergence_and_end_of_long_sequences() -> None:
    sites = [f"s{i}" for i in range(30)]
    assert sequence_text(sites, 14) == ("['s0', 's1', ..., 's12', 's13', >'s14'<, 's15', "
                                        "'s16', ..., 's29'] (30 yields)")
    assert sequence_text(sites[:3], 3) == "['s0', 's1', 's2', >end<] (3 yields)"


# -- the merged view --------------------------------------------------------------------------

def _record(rank: int, sites: list[tuple[int, str]], ubatches: list[dict] | None = None):
    return {"format": "coop_dbo.rank/1", "event": "failure", "rank": rank, "world": 2,
            "step": 3, "phase": "run", "elapsed_s": 0.01, "limit_s": None, "error": None,
            "ubatches": ubatches or [], "schedule": None,
            "trace": [{"ubatch": ub, "index": i // 2, "site": s, "stream": "cpu",
                       "kind": "yield", "time_us": 10.0 * (i + 1)}
                      for i, (ub, s) in enumerate(sites)]}


def test_merge_cli_marks_the_first_divergence_and_writes_a_chrome_trace(tmp_path) -> None:
    same = [(0, "L0.d"), (1, "L0.d"), (0, "L0.c"), (1, "L0.c")]
    a = _record(0, same + [(0, "L1.d"), (1, "L1.d")])
    b = _record(1, same + [(0, "L2.d")])
    paths = []
    for r in (a, b):
        paths.append(str(tmp_path / f"rank{r['rank']}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    out = str(tmp_path / "merged.json")
    buf = io.StringIO()
    with redirect_stdout(buf):
        trace_main(["merge", *paths, "-o", out])
    text = " ".join(buf.getvalue().split())
    assert ("First divergence at yield 4 of the step: rank 0: ub0 2: L1.d; rank 1: ub0 2: "
            "L2.d.") in text
    assert re.search(r"4 X │ ub0 2: L1\.d +│ ub0 2: L2\.d", text), text
    assert f"Chrome trace: {out}" in text
    with open(out) as f:
        chrome = json.load(f)
    events = chrome["traceEvents"]
    assert chrome["otherData"]["coop_dbo_first_divergence"] == 4
    marks = [e for e in events if e.get("cat") == "divergence"]
    assert [(m["pid"], m["ts"]) for m in marks] == [(0, 50.0)]
    slices = [(e["pid"], e["tid"], e["name"], e["ts"], e["dur"]) for e in events
              if e["ph"] == "X"]
    assert slices[:2] == [(0, 0, "L0.d", 0.0, 10.0), (0, 1, "L0.d", 10.0, 10.0)]
    assert len(slices) == 6 + 5
    # traces that agree, positions that differ (a watchdog dump where one rank is stuck)
    pos = [{"ubatch": 1, "state": "running", "index": 1, "site": "L0.d", "op": op,
            "since_yield_s": 2.0} for op in ("dispatch_transfer", None)]
    c = _record(0, same, [pos[0]])
    d = _record(1, same, [dict(pos[1], index=2, site="L0.c")])
    assert first_divergence([c, d]) is None
    assert chrome_trace([c, d])["otherData"]["coop_dbo_first_divergence"] is None
    for r, path in ((c, paths[0]), (d, paths[1])):
        with open(path, "w") as f:
            json.dump(r, f)
    buf = io.StringIO()
    with redirect_stdout(buf):
        trace_main(["merge", *paths, "-o", out])
    assert ("The ranks' traces agree at every yield, but their microbatches stood at "
            "different points: rank 0: ub1 running @1 L0.d in dispatch_transfer, 2.00 s "
            "since yield; rank 1: ub1 running @2 L0.c, 2.00 s since yield.") in " ".join(
                buf.getvalue().split())


def test_merge_cli_rejects_files_that_are_not_rank_records(tmp_path, capsys) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(SystemExit):
        trace_main(["merge", str(bad)])
    assert (f"error: {bad} is not a coop_dbo rank record (its format field is "
            "'something else', expected 'coop_dbo.rank/1').") in capsys.readouterr().err
    good = tmp_path / "r.json"
    good.write_text(json.dumps(_record(0, [(0, "a")])))
    with pytest.raises(SystemExit):
        trace_main(["merge", str(good), str(good)])
    assert ("error: two files are of the same rank (ranks [0, 0]): pass one file per rank, "
            "of one step.") in capsys.readouterr().err


def test_trace_demo_still_prints(capsys) -> None:
    trace_main(["--demo"])
    out = capsys.readouterr().out
    assert "L1.post" in out and "YieldAsymmetryError" in out


# -- several ranks (gloo) ---------------------------------------------------------------------

GLOO_TIMEOUT_S = 60.0  # the group's own timeout: every fault must end well within it
# The watchdog's limit: generous, since a good step of 4 ranks on 2 busy cores was seen
# to take 1.7 s, and a step over the limit is a failure.
LIMIT_S = 6.0
FAST_S = 15.0  # "at once": a quarter of the group's timeout, for a busy 2-core box


def _sites_text(sites: list[str], k: int, ended: bool = True) -> str:
    return sequence_text(sites, k, ended=ended)


def _expected(world: int, dumps: str) -> dict[str, object]:
    """Per step name, ``fn(rank) -> (error type, exact message or set of messages)``."""
    odd = world - 1
    renamed = [s.replace("L", "X", 1) for s in AGREED]
    skip = (f"rank {odd} left the DBO schedule the ranks agreed on, in step 2: at yield 4 "
            f"its microbatch 0 returned where the schedule has 'L1.moe.dispatch'. agreed: "
            f"{_sites_text(AGREED, 4)}; rank {odd}, microbatch 0: {_sites_text(AGREED[:4], 4)}"
            ". It stopped before its next transfer and broke the process group, so that no "
            "rank waits for it. Make the yields independent of the data (call moe_exchange "
            f"in every MoE layer, also when no token is routed). {RECOVER}")

    def peer_tail(rank: int, by: int) -> str:
        return (f" This rank ({rank}) stopped when its collectives with rank {by} failed "
                "(RuntimeError).")

    def own_timeout(rank: int) -> str:
        return (f"CoopDBORunner step 2 ran longer than the watchdog limit of {LIMIT_S:g} s "
                f"on rank {rank} (run phase): microbatch 0 parked at yield 2 "
                "('L0.moe.experts'); microbatch 1 running at yield 1 ('L0.moe.dispatch'), in "
                f"dispatch_transfer. Dump: {dump_of(rank)}. It closed its gloo connections. "
                f"{RECOVER}")

    def dump_of(rank: int) -> str:
        found = glob.glob(os.path.join(dumps, f"coop_dbo-runner4-step2-rank{rank}.json"))
        return found[0] if found else "(missing)"

    def peer_timeout(rank: int, by: int) -> str:
        return (f"rank {by}'s watchdog ended step 2 after {LIMIT_S:g} s (its dump: "
                f"{dump_of(by)}).{peer_tail(rank, by)} {RECOVER}")

    setups = "; ".join(f"rank {r}: {3 if r == odd else 2} microbatches, eager"
                       for r in range(world))
    return {
        "odd rank skips layer 1's exchange": lambda r: (
            "ScheduleMismatchError", skip if r == odd else skip + peer_tail(r, odd)),
        "call on the broken group": lambda r: (
            "GroupBrokenError", f"the process group of this runner was broken in step 2 (by "
            f"rank {odd}) so that no rank waited for a failed one (see that step's error), "
            f"and it is still runner.process_group. {RECOVER}"),
        "same runners, next step": lambda r: (
            "ScheduleMismatchError", "the ranks disagree on the DBO schedule of step 2: at "
            f"yield 0 rank 0 yields at 'L0.moe.dispatch' and rank {odd} yields at "
            f"'X0.moe.dispatch'. rank 0: {_sites_text(AGREED, 0)}; rank {odd}: "
            f"{_sites_text(renamed, 0)}. Every rank must run the same model with the same "
            "yield points (each sequence is the last completed step with these call "
            "arguments on that rank); the step did not run on any rank."),
        "verify_schedule, odd rank renames its sites": lambda r: (
            "ScheduleMismatchError", "verify_schedule: the ranks yielded different sequences "
            f"in step 1: rank 0: {_sites_text(AGREED, 0)}; rank {odd}: "
            f"{_sites_text(renamed, 0)}."),
        "odd rank has 3 microbatches": lambda r: (
            "ScheduleMismatchError", f"the ranks disagree on the setup of step 1: {setups}. "
            "Every rank must split each step into the same number of microbatches and, where "
            "a call may replay a CUDA graph, capture the same sizes (pass the same "
            "num_ubatches, split and cuda_graph_sizes on every rank); the step did not run on "
            "any rank."),
        "watchdog: odd rank stuck inside a transfer": lambda r: (
            "StepTimeoutError", {own_timeout(r)} | {peer_timeout(r, q) for q in range(world)
                                                    if q != r}),
        "watchdog: odd rank's send raises": lambda r: (
            ("InjectedFault", "_exchange failed (microbatch 0, call 2)") if r == odd else
            ("PeerRankError", f"rank {odd} failed in step 4: InjectedFault: _exchange failed "
             f"(microbatch 0, call 2).{peer_tail(r, odd)} {RECOVER}")),
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_that_differ_or_stall_all_raise_named_errors_gloo(tmp_path, world) -> None:
    groups = rendezvous_files(tmp_path, 4)
    codes, wall = spawn_bounded(forensics_worker,
                                (groups, GLOO_TIMEOUT_S, LIMIT_S, str(tmp_path)),
                                world=world, deadline_s=260)
    assert codes == [0] * world, f"workers exited with {codes} after {wall:.0f} s"
    results = [torch.load(tmp_path / f"forensics{r}.pt", weights_only=False)
               for r in range(world)]
    dumps = str(tmp_path / "dumps")
    expected = _expected(world, dumps)
    single = MoEDecoder(CFG)  # every expert in one process: the reference
    odd = world - 1
    assert [[rec["name"] for rec in res] for res in results] == [[n for n, _ in STEPS]] * world
    for step, (name, _) in enumerate(STEPS):
        for rank in range(world):
            rec = results[rank][step]
            if name not in expected:  # a good step: exact on every rank
                assert rec["path"] == "eager-dbo", (name, rank, rec.get("error"))
                torch.testing.assert_close(rec["out"], single(*rec["inputs"]),
                                           rtol=1e-5, atol=1e-5)
                continue
            want_type, want = expected[name](rank)  # type: ignore[operator]
            err = rec["error"]
            assert err["type"] == want_type, (name, rank, err)
            if isinstance(want, set):
                assert err["msg"] in want, (name, rank, err["msg"])
            else:
                assert err["msg"] == want, (name, rank)
            # never the group's timeout: the named error comes at once (or at the limit)
            bound = LIMIT_S + 5.0 if name.startswith("watchdog: odd rank stuck") else FAST_S
            assert rec["elapsed"] < bound, (name, rank, rec["elapsed"])
        if name == "odd rank skips layer 1's exchange":
            for rank in range(world):
                attrs = results[rank][step]["attrs"]
                assert attrs["index"] == 4 and attrs["sites"] == {-1: "L1.moe.dispatch",
                                                                  odd: None}
        if name == "watchdog: odd rank stuck inside a transfer":
            for rank in range(world):  # every rank dumped where it stood, naming the site
                assert results[rank][step]["elapsed"] > LIMIT_S - 0.5
                rec = load_rank_file(os.path.join(dumps, f"coop_dbo-runner4-step2-rank{rank}"
                                                  ".json"))
                where = {u["ubatch"]: (u["index"], u["site"], u["op"])
                         for u in rec["ubatches"]}
                assert where == {0: (2, "L0.moe.experts", None),
                                 1: (1, "L0.moe.dispatch", "dispatch_transfer")}, rank
                assert rec["event"] in ("watchdog", "failure")
                assert rec["ubatches"][1]["since_yield_s"] > LIMIT_S - 0.5
        if name == "watchdog: odd rank's send raises":
            notes = results[odd][step]["error"]["notes"]
            assert notes[-1] == (f"coop_dbo: rank {odd} closed its gloo connections so that "
                                 f"its peers stop too. {RECOVER}")
    # the skip step's dumps, merged: rank 0's microbatch 0 went on to layer 1's dispatch
    # (yield 8 of the step) where the odd rank's trace ends
    files = sorted(glob.glob(os.path.join(dumps, "coop_dbo-runner0-step2-rank*.json")))
    assert len(files) == world
    buf = io.StringIO()
    with redirect_stdout(buf):
        trace_main(["merge", *files, "-o", str(tmp_path / "merged.json")])
    text = " ".join(buf.getvalue().split())
    assert re.search("First divergence at yield 8 of the step: " + "; ".join(
        f"rank {r}: " + (r"\(end\)" if r == odd else r"ub0 4: L1\.moe\.dispatch( ->comm)?")
        for r in range(world)) + r"\.", text), text


# -- the cost figure's script ------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_forensics_cost_script_writes_sane_figures(tmp_path) -> None:
    """``bench/forensics_cost.py`` runs and writes positive figures (the figures
    themselves are measured by the script, not asserted here)."""
    import subprocess
    import sys

    out = tmp_path / "cost.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.forensics_cost", "--quick", "--json",
                           str(out)], cwd=root, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r) == {"bookkeeping_us", "all_reduce_us", "step_ms", "share_of_cpu_step",
                      "share_of_h100_61_layer_step", "watchdog_probe_us_per_exchange"}
    assert all(v > 0 for v in r["bookkeeping_us"].values())
    assert r["step_ms"]["with"] > 0 and r["step_ms"]["without"] > 0
    assert "fingerprint bookkeeping per step" in proc.stdout
