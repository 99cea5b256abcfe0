"""Deciding by measuring: alternation, warm-up, ties, noise, ranks that disagree, outputs.

The timer is the one stand-in here: a ``StepTimer`` that returns times chosen by the test
for the path the runner actually took (read from the runner after each step), so that a
decision can be forced both ways. Everything else is the real runner and the reference
decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
from fault_workers import end_group
from helpers import decode_inputs, rendezvous_files
from test_runner import init_gloo, spawn

from coop_dbo import CoopDBORunner
from coop_dbo.autotune import BucketTrials, MeasuredDecider, bucket_of
from coop_dbo.cost_model import CostModel
from coop_dbo.models import MoEConfig, MoEDecoder

CFG = MoEConfig.tiny(num_layers=2, num_experts=8, top_k=2)


class PathTimer:
    """Times a step as ``times[path](k)``, ``k`` counting that path's steps from 0; the
    path is the one the runner recorded for the step."""

    def __init__(self, times: dict[str, Callable[[int], float]]) -> None:
        self.times = times
        self.runner: CoopDBORunner | None = None
        self.counts = {"plain": 0, "dbo": 0}
        self.order: list[str] = []

    def start(self) -> int:
        return 0

    def stop(self, token: int) -> float:
        assert self.runner is not None
        path = "plain" if self.runner.last_path == "plain" else "dbo"
        self.order.append(path)
        k = self.counts[path]
        self.counts[path] += 1
        return self.times[path](k)


def measured_runner(model, times: dict[str, Callable[[int], float]], **kw) -> CoopDBORunner:
    timer = PathTimer(times)
    runner = CoopDBORunner(model, decide="measure", timer=timer, **kw)
    timer.runner = runner
    return runner


# -- the decider alone ---------------------------------------------------------------------

def test_bucket_is_the_next_power_of_two() -> None:
    assert [bucket_of(b) for b in (0, 1, 2, 3, 4, 5, 8, 9, 1000)] == [1, 1, 2, 4, 4, 8, 8, 16,
                                                                      1024]
    with pytest.raises(ValueError, match=r"batch must be >= 0, got -1\."):
        bucket_of(-1)


def test_paths_alternate_plain_first_until_both_are_full() -> None:
    d = MeasuredDecider(num_trials=2, warmup=1)
    seen = []
    while not d.ready(8):
        path = d.next_path(8)
        assert path is not None
        seen.append(path)
        d.record(8, path, 1.0, 8)
    assert seen == ["plain", "dbo"] * 3
    assert d.next_path(8) == "dbo"  # not decided until decide() runs
    d.decide(8)
    assert d.next_path(8) is None


def decided(plain: list[float], dbo: list[float], **kw) -> BucketTrials:
    d = MeasuredDecider(num_trials=len(plain) - 1, **kw)
    for p, q in zip(plain, dbo):
        d.record(4, "plain", p, 4)
        d.record(4, "dbo", q, 4)
    assert d.ready(4)
    return d.decide(4)


def test_warmup_steps_do_not_count() -> None:
    # A slow first DBO step (capture, allocator) must not decide against DBO.
    t = decided([10.0, 10.0, 10.0, 10.0], [500.0, 5.0, 5.0, 5.0])
    assert (t.plain_median_ms, t.dbo_median_ms, t.use_dbo) == (10.0, 5.0, True)


def test_a_tie_keeps_the_plain_path() -> None:
    assert decided([1, 2.0, 2.0, 2.0], [1, 2.0, 2.0, 2.0]).use_dbo is False
    # within min_speedup (1.02 by default) is a tie too
    assert decided([1, 2.03, 2.03, 2.03], [1, 2.0, 2.0, 2.0]).use_dbo is False
    assert decided([1, 2.05, 2.05, 2.05], [1, 2.0, 2.0, 2.0]).use_dbo is True


def test_one_noisy_step_does_not_decide() -> None:
    # medians: one outlier per path is ignored
    t = decided([1, 3.0, 30.0, 3.0], [1, 2.0, 2.0, 40.0])
    assert (t.plain_median_ms, t.dbo_median_ms, t.use_dbo) == (3.0, 2.0, True)


def test_agree_replaces_the_local_medians() -> None:
    d = MeasuredDecider(num_trials=1)
    for path in ("plain", "dbo", "plain", "dbo"):
        d.record(2, path, 1.0 if path == "plain" else 0.5, 2)  # locally DBO is 2x faster
    got: list[list[float]] = []

    def agree(medians: list[float]) -> list[float]:
        got.append(medians)
        return [1.0, 3.0]  # a peer's DBO was slow

    t = d.decide(2, agree)
    assert got == [[1.0, 0.5]]
    assert t.use_dbo is False
    assert t.describe() == ("measured at batch bucket 2: plain 1.000 ms, DBO 3.000 ms "
                            "(0.33x): plain")


def test_bad_decider_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_trials must be an int >= 1, got 0\."):
        MeasuredDecider(0)
    with pytest.raises(ValueError, match=r"warmup must be an int >= 0, got -1\."):
        MeasuredDecider(2, warmup=-1)
    with pytest.raises(ValueError, match=r"no bucket has been decided yet"):
        MeasuredDecider(2).calibration(2)


# -- through the runner --------------------------------------------------------------------

@pytest.mark.parametrize("dbo_faster", [True, False])
def test_runner_measures_then_keeps_the_faster_path(dbo_faster: bool) -> None:
    model = MoEDecoder(CFG)
    plain_ms, dbo_ms = (2.0, 1.0) if dbo_faster else (1.0, 2.0)
    runner = measured_runner(model, {"plain": lambda k: plain_ms, "dbo": lambda k: dbo_ms},
                             measure_trials=2)
    inputs = decode_inputs(CFG, 6)
    ref = model(*inputs)
    paths, reasons = [], []
    for _ in range(8):
        out = runner(*inputs)
        # measuring steps and decided steps give the model's own result
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
        paths.append(runner.last_path)
        reasons.append(runner.last_reason)
    assert paths[:6] == ["plain", "eager-dbo"] * 3
    assert reasons[0] == "measuring batch bucket 8: plain step 1 of 3"
    assert reasons[5] == "measuring batch bucket 8: dbo step 3 of 3"
    want = "eager-dbo" if dbo_faster else "plain"
    assert paths[6:] == [want, want]
    speedup = plain_ms / dbo_ms
    assert reasons[6] == (f"measured at batch bucket 8: plain {plain_ms:.3f} ms, DBO "
                          f"{dbo_ms:.3f} ms ({speedup:.2f}x): "
                          f"{'DBO' if dbo_faster else 'plain'}")


def test_each_bucket_decides_on_its_own() -> None:
    model = MoEDecoder(CFG)
    # DBO wins at batch 6 (bucket 8), loses at batch 3 (bucket 4): the timer looks at the
    # batch of the step to tell them apart
    runner = measured_runner(model, {
        "plain": lambda k: 2.0,
        "dbo": lambda k: 1.0 if runner.last_step.batch_size == 6 else 4.0}, measure_trials=1)
    big, small = decode_inputs(CFG, 6), decode_inputs(CFG, 3, seed=1)
    for _ in range(4):
        runner(*big)
        runner(*small)
    runner(*big)
    assert runner.last_path == "eager-dbo"
    runner(*small)
    assert runner.last_path == "plain"
    assert sorted(runner._decider.buckets) == [4, 8]


def test_calibration_round_trip_seeds_a_new_runner(tmp_path) -> None:
    model = MoEDecoder(CFG)
    runner = measured_runner(model, {"plain": lambda k: 3.0, "dbo": lambda k: 2.0},
                             measure_trials=1)
    inputs = decode_inputs(CFG, 8)
    for _ in range(4):
        runner(*inputs)
    cm = runner.calibration(gpu="cpu", comm="test")
    assert cm.points == {4: 1.5}  # 8 tokens in 2 microbatches, 3.0 / 2.0
    path = cm.save(tmp_path / "calibration.json")
    assert json.loads(path.read_text())["profiles"][0]["points"] == [
        {"tokens_per_ubatch": 4, "speedup": 1.5}]
    seeded = CoopDBORunner(model, cost_model=CostModel.load(path, "test"))
    seeded(*inputs)
    assert seeded.last_path == "eager-dbo"  # no measuring: the file decided


def test_auto_does_not_measure_on_cpu_and_always_never_measures() -> None:
    model = MoEDecoder(CFG)
    inputs = decode_inputs(CFG, 4)
    for decide in ("auto", "always"):
        runner = CoopDBORunner(model, decide=decide)
        runner(*inputs)
        assert (runner.last_path, runner.last_reason) == ("eager-dbo", "")


def test_bad_runner_arguments() -> None:
    model = MoEDecoder(CFG)
    with pytest.raises(ValueError, match=r"decide must be 'auto', 'measure' or 'always', got "
                                         r"'sometimes'\."):
        CoopDBORunner(model, decide="sometimes")
    cm = CostModel(points={4: 1.5})
    with pytest.raises(ValueError, match=r"decide='measure' and a cost_model both choose"):
        CoopDBORunner(model, decide="measure", cost_model=cm)
    with pytest.raises(TypeError, match=r"timer must have start\(\) -> token and stop"):
        CoopDBORunner(model, decide="measure", timer=object())


# -- ranks decide together -----------------------------------------------------------------

def ranks_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    init_gloo(rank, world, rendezvous)
    import torch.distributed as dist

    try:
        model = MoEDecoder(CFG)
        # Rank 0 sees DBO 2x faster, rank 1 sees it 2x slower: the maximum over ranks of
        # each median decides, the same on both (plain 2.0 vs DBO 4.0 -> plain).
        dbo = 1.0 if rank == 0 else 4.0
        runner = measured_runner(model, {"plain": lambda k: 2.0, "dbo": lambda k: dbo},
                                 measure_trials=1, process_group=dist.group.WORLD)
        inputs = decode_inputs(CFG, 4 + rank, seed=rank)  # buckets agree on the max batch
        paths = []
        for _ in range(6):
            runner(*inputs)
            paths.append(runner.last_path)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"paths": paths, "reason": runner.last_reason}, f)
    finally:
        end_group(out_dir, rank, world)


def test_ranks_that_measure_differently_decide_the_same(tmp_path) -> None:
    rendezvous = rendezvous_files(tmp_path, 1)[0]
    spawn(ranks_worker, (rendezvous, str(tmp_path)), world=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]
    assert got[0]["paths"] == ["plain", "eager-dbo", "plain", "eager-dbo", "plain", "plain"]
    assert got[0]["reason"] == ("measured at batch bucket 8: plain 2.000 ms, DBO 4.000 ms "
                                "(0.50x): plain")
