"""Smoke tests of `make bench` (CPU): the pieces run and write sane JSON.

Performance is measured by the benchmark, never asserted here: these tests only check
that every stage runs, that the output files have the expected keys and positive times,
and the cost model's decision rule.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_multigpu, common, gpu_bench, report, run_bench, shapes
from bench.thread_baseline import ThreadUBatchRunner, thread_yield
from coop_dbo import dbo_current_ubatch_id, dbo_yield, dbo_yield_and_switch
from coop_dbo.cost_model import CostModel
from coop_dbo.schedule import SchedulePolicy

YIELD_KEYS = {"loop_only_us", "greenlet_yield_us", "greenlet_switch_yield_us",
              "thread_event_yield_us", "thread_event_switch_yield_us",
              "thread_yield_direct_us", "plain_vs_thread", "switch_vs_thread"}
VARIANTS = ("unsplit", "sequential", "greenlet_dbo", "thread_dbo")


def test_cpu_stage_quick_writes_sane_json(tmp_path: Path) -> None:
    result = run_bench.main(["--quick", "--cpu-only", "--out", str(tmp_path)])
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1 and Path(result["path"]) == files[0]
    data = json.loads(files[0].read_text())
    assert set(data) >= {"env", "cpu", "gpu"} and data["gpu"] is None
    for key in ("python", "torch", "greenlet", "cpu", "date", "command"):
        assert data["env"][key]
    y = data["cpu"]["yield_cost"]
    assert set(y) >= YIELD_KEYS
    assert all(y[k] > 0 for k in YIELD_KEYS)
    step = data["cpu"]["model_step"]
    for v in VARIANTS:
        for m in ("wall_ms", "cpu_ms"):
            assert step["median"][v][m] > 0
            assert len(step["samples"][v][m]) == step["repeats"]
    assert set(step["ratios"]["cpu_ms"]) >= {"greenlet_dbo_vs_sequential",
                                            "greenlet_dbo_vs_unsplit"}
    # Same kernels, same microbatches: both drivers compute exactly the sequential result.
    assert step["outputs_equal_sequential"] == {"greenlet_dbo": True, "thread_dbo": True}
    names = [t[0] for t in report.targets(data)]
    assert any("1/10" in n for n in names) and any("1.05x" in n for n in names)


def test_thread_baseline_drives_the_yield_protocol() -> None:
    order: list[tuple[int | None, str]] = []

    def mb(tag: str):
        def fn() -> str:
            order.append((dbo_current_ubatch_id(), f"{tag}0"))
            dbo_yield("a")
            order.append((dbo_current_ubatch_id(), f"{tag}1"))
            dbo_yield_and_switch("comm", "b")  # a plain yield without CUDA
            order.append((dbo_current_ubatch_id(), f"{tag}2"))
            thread_yield("c")
            return tag
        return fn

    runner = ThreadUBatchRunner(2)
    assert runner.run([mb("x"), mb("y")]) == ["x", "y"]
    assert order == [(0, "x0"), (1, "y0"), (0, "x1"), (1, "y1"), (0, "x2"), (1, "y2")]
    assert runner.last_yield_counts == [3, 3]
    assert dbo_current_ubatch_id() is None  # nothing leaks into the caller

    def boom() -> None:
        dbo_yield("a")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        runner.run([mb("x"), boom])
    assert runner.run([mb("p"), mb("q")]) == ["p", "q"]  # usable afterwards


def test_gpu_stage_dry_run_on_cpu(tmp_path: Path) -> None:
    """The 1-GPU code path on the CPU (tiny model, eager in place of graphs)."""
    grad = torch.is_grad_enabled()
    res = gpu_bench.run(tmp_path, dry_run_cpu=True, log=lambda msg: None)
    assert torch.is_grad_enabled() == grad
    rows = res["sweep"]
    assert len(rows) == len(gpu_bench.DRY_TOKENS) * len(gpu_bench.QUICK_RATIOS)
    for r in rows:
        for k in ("t_compute_ms", "nodbo_graph_ms", "dbo_graph_ms", "dbo_eager_greenlet_ms",
                  "dbo_eager_thread_ms", "nodbo_eager_ms", "speedup", "ideal_speedup"):
            assert r[k] > 0, k
        assert r["cost_model"]["vs_nodbo"] > 0
        assert "share_hidden" in r and r["explain"]
    assert res["host_overhead"]["median"]["greenlet_dbo"]["cpu_ms"] > 0
    cm = CostModel.load(res["cost_model"]["file"], comm="sim-ratio-1")
    assert cm.gpu == "cpu-dry-run" and sorted(cm.points) == list(gpu_bench.DRY_TOKENS)
    assert res["trace_file"] and Path(res["trace_file"]).exists()
    if res["plot_file"] is not None:
        assert Path(res["plot_file"]).stat().st_size > 0
    from rich.console import Console

    buf = io.StringIO()
    report.print_run(Console(file=buf, width=200), {"env": res["env"], "cpu": None, "gpu": res})
    assert "1 GPU, simulated comm" in buf.getvalue()
    # The folder summary (gpu_suite.sh's last step) reads what run_bench writes.
    common.write_json(tmp_path / "bench-20000101-000000.json",
                      {"env": res["env"], "cpu": None, "gpu": res})
    buf = io.StringIO()
    report.print_summary(Console(file=buf, width=200), tmp_path)
    out = buf.getvalue()
    assert "DBO graph speedup (ideal) [share hidden]" in out and "calibration-" in out
    assert "by depth" not in out  # no depth/ folder here


def test_gpu_bench_cli_depth_stage_and_summary(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The depth stage's command line (graphs only, ratio 1, a schedule-policy override)
    and the summary's depth table over its JSON."""
    depth = tmp_path / "depth"
    res = gpu_bench.main(["--dry-run-cpu", "--graphs-only", "--tokens", "4", "--ratios", "1",
                          "--layers", "2", "--set", "values_gather_early_tokens=(0, 0)",
                          "--out", str(depth)])
    assert res["config_overrides"] == {"values_gather_early_tokens": (0, 0)}
    assert res["shape"]["num_layers"] == 2 and len(list(depth.glob("bench-1gpu-*.json"))) == 1
    capsys.readouterr()
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "by depth" in out and "values_gather_early_tokens=[0, 0]" in out
    assert "no bench-<stamp>.json" in out


def test_set_routes_fields_to_the_schedule_policy_or_the_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    p = argparse.ArgumentParser()
    common.add_config_overrides(p)
    items = ["values_gather_early_tokens=(0, 0)", "shared_after_dispatch_min_tokens=0",
             "top_k=1"]
    overrides = common.config_overrides(p, p.parse_args(
        [a for item in items for a in ("--set", item)]).set)
    assert overrides == {"values_gather_early_tokens": (0, 0),
                         "shared_after_dispatch_min_tokens": 0, "top_k": 1}
    cfg_fields, policy_fields = common.split_overrides(overrides)
    assert cfg_fields == {"top_k": 1}
    assert set(policy_fields) == {"values_gather_early_tokens",
                                  "shared_after_dispatch_min_tokens"}
    cfg = common.make_config({**common.CPU_SHAPE, **overrides}, max_batch=16)
    assert cfg.top_k == 1 and cfg.max_batch == 16
    built: dict[str, object] = {}

    class Recorder(torch.nn.Module):
        def __init__(self, cfg: object, backend: object = None, **kw: object) -> None:
            super().__init__()
            built.update(cfg=cfg, backend=backend, **kw)

    monkeypatch.setattr(common, "MoEDecoder", Recorder)
    common.make_model(cfg, None, overrides, dtype=torch.float32)
    assert built["cfg"] is cfg and built["dtype"] is torch.float32
    assert built["schedule"] == SchedulePolicy(values_gather_early_tokens=(0, 0),
                                               shared_after_dispatch_min_tokens=0)
    common.make_model(cfg)
    assert built["schedule"] == SchedulePolicy()
    for bad in ("no_such_field=1", "top_k", "top_k=two"):
        with pytest.raises(SystemExit):
            common.config_overrides(p, [bad])


def test_gpu_stage_dry_run_with_decode_steps_per_graph(tmp_path: Path) -> None:
    """``--steps``: the graphs run several greedy decode steps; graphs only."""
    res = gpu_bench.run(tmp_path, dry_run_cpu=True, log=lambda msg: None, tokens=(4,),
                        ratios=(1.0,), num_steps=3)
    (row,) = res["sweep"]
    assert res["shape"]["decode_steps_per_graph"] == 3 and row["decode_steps"] == 3
    assert row["dbo_graph_ms"] > 0 and row["t_comm_ms"] > 0
    assert row["graph_vs_eager_token_mismatch"] == 0.0  # eager stand-in: same tokens
    assert res["host_overhead"] is None and res["trace_file"] is None  # graphs only


def test_share_cells_mark_only_a_sweep_rows_own_comm_mismatch() -> None:
    # "?" comes from the 1-GPU sweep's comm_mismatch field alone: a multi-GPU row's no-DBO
    # and DBO comm differ by design (0.4 against 1.0 ms on 2 H100s) and must not be marked.
    row = {"share_hidden": 0.9, "t_comm_ms": 0.4, "t_comm_dbo_ms": 1.0,
           "nodbo_graph_ms": 10.0, "dbo_graph_ms": 6.5, "t_compute_ms": 4.0}
    assert report.share_cell(row) == "90%"
    assert report.share_cell({**row, "comm_mismatch": 0.031}) == "90%?"
    assert report.share_cell({**row, "comm_mismatch": 0.03}) == "90%"
    # from the graphs: comm 10 - 4 = 6 ms, ideal 6, share (10 - 6.5) / (10 - 6)
    assert report.share_graphs_cell(row) == "88%"
    assert report.share_cell(None) == report.share_graphs_cell(None) == "-"


def _multigpu_dry_run(out: Path, *args: str, **env_extra: str) -> None:
    """bench_multigpu.py under torchrun with 2 ranks on gloo (CPU), into ``out``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **env_extra}
    if "NCCL_P2P_DISABLE" not in env_extra:  # the default link, whatever the caller's
        env.pop("NCCL_P2P_DISABLE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "bench" / "bench_multigpu.py"), "--dry-run-cpu", "--no-trace",
           "--out", str(out), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170, cwd=ROOT,
                       check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.timeout(240)
def test_multigpu_bench_dry_run_gloo(tmp_path: Path) -> None:
    """bench_multigpu.py under torchrun with 2 ranks on gloo (CPU): the code path only,
    over the default link and with ``--slow-link``; the summary shows both."""
    _multigpu_dry_run(tmp_path)
    files = list(tmp_path.glob("bench-multigpu-ep2-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["env"]["world_size"] == 2 and data["link"] == "NVLink"
    assert data["env"]["nccl_p2p_disable"] is None
    for r in data["sweep"]:
        assert r["nodbo_graph_ms"] > 0 and r["dbo_graph_ms"] > 0 and r["t_comm_ms"] > 0
    cm = CostModel.load(data["cost_model"]["file"], comm="nccl-ep2")
    assert cm.points

    _multigpu_dry_run(tmp_path, "--slow-link", "--tokens", "4", "--quick")
    (slow_file,) = tmp_path.glob("bench-multigpu-ep2-slowlink-*.json")
    slow = json.loads(slow_file.read_text())
    assert slow["link"] == "slow link (NCCL_P2P_DISABLE=1)" == bench_multigpu.SLOW_LINK
    assert slow["env"]["nccl_p2p_disable"] == "1" and slow["tokens"] == [4]
    (row,) = slow["sweep"]
    # the same loss breakdown as the NVLink rows
    assert set(row) == set(data["sweep"][0])
    assert row["explain"] and row["split_penalty"] == pytest.approx(
        row["t_compute_split_ms"] / row["t_compute_ms"] - 1)
    assert sorted(CostModel.load(slow["cost_model"]["file"], comm="nccl-ep2-slowlink").points
                  ) == [4]
    assert CostModel.load(data["cost_model"]["file"], comm="nccl-ep2").points == cm.points
    from rich.console import Console

    buf = io.StringIO()
    report.print_summary(Console(file=buf, width=250), tmp_path)
    out = buf.getvalue()
    assert "all-to-all over NVLink" in out
    assert "all-to-all over slow link (NCCL_P2P_DISABLE=1)" in out

    # several decode steps per graph: graphs only, the comm graphs hold every step's calls
    _multigpu_dry_run(tmp_path, "--slow-link", "--tokens", "4", "--quick", "--steps", "2")
    (multi_file,) = tmp_path.glob("bench-multigpu-ep2-slowlink-steps2-*.json")
    multi = json.loads(multi_file.read_text())
    assert multi["decode_steps_per_graph"] == 2 and "file" not in multi["cost_model"]
    (mrow,) = multi["sweep"]
    assert mrow["decode_steps"] == 2 and mrow["dbo_graph_ms"] > 0
    assert math.isnan(mrow["dbo_eager_greenlet_ms"])


def test_multigpu_link_label_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = ("slow link (NCCL_P2P_DISABLE=1)", "-slowlink")
    assert bench_multigpu.link_label({}) == ("NVLink", "")
    assert bench_multigpu.link_label({"NCCL_P2P_DISABLE": "0"}) == ("NVLink", "")
    assert bench_multigpu.link_label({"NCCL_P2P_DISABLE": "1"}) == slow
    monkeypatch.setenv("NCCL_P2P_DISABLE", "0")
    with pytest.raises(SystemExit):  # --slow-link against an exported 0: refused at once
        bench_multigpu.main(["--slow-link", "--dry-run-cpu"])


# -- shapes stage --------------------------------------------------------------------------

def test_shapes_are_the_requested_ones_and_build() -> None:
    assert list(common.MODEL_SHAPES) == ["bench", "deepseek-v3-like", "qwen3-moe-like",
                                         "held-out"]
    assert common.MODEL_SHAPES["bench"] is common.GPU_SHAPE
    held = common.MODEL_SHAPES["held-out"]
    assert {k: held[k] for k in ("hidden", "num_heads", "head_dim", "num_experts", "top_k",
                                 "moe_intermediate", "shared_intermediate", "num_layers")} == {
        "hidden": 2560, "num_heads": 20, "head_dim": 128, "num_experts": 48, "top_k": 6,
        "moe_intermediate": 896, "shared_intermediate": 1792, "num_layers": 6}
    for shape in common.MODEL_SHAPES.values():
        cfg = common.make_config(shape, max_batch=8)
        assert cfg.top_k <= cfg.num_experts and cfg.num_experts % 2 == 0  # EP over 2
    assert common.MODEL_SHAPES["qwen3-moe-like"]["shared_intermediate"] == 1
    with pytest.raises(ZeroDivisionError):  # why not 0: the decoder always has one
        common.make_model(common.make_config({**common.CPU_SHAPE, "shared_intermediate": 0}))


def test_shapes_stage_dry_run_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    """``python3 -m bench.shapes --dry-run-cpu``: every shape, size and decode-step count
    planned and measured, the JSON, the table and the markdown."""
    res = shapes.main(["--dry-run-cpu", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bench-shapes-*.json")
    data = json.loads(path.read_text())
    names = list(common.MODEL_SHAPES)
    assert list(data["shapes"]) == names
    want = {(n, t, k) for n in names for t in shapes.DRY_TOKENS for k in shapes.DRY_STEPS}
    assert {(r["shape"], r["tokens_per_ubatch"], r["decode_steps"]) for r in data["rows"]} \
        == want and len(data["rows"]) == len(want)
    for r in data["rows"]:
        for k in ("nodbo_graph_ms", "dbo_graph_ms", "dbo_fallback_graph_ms", "t_compute_ms",
                  "t_comm_ms", "predicted_dbo_ms", "predicted_fallback_ms",
                  "predicted_nodbo_ms", "speedup", "ideal_speedup"):
            assert r[k] > 0, k
        # the CPU is deterministic: every path gives the same outputs bit for bit
        assert r["diff_vs_nodbo"] == r["diff_fallback_vs_nodbo"] == r["replay_spread"] == 0
        assert r["outputs"] == ("logits" if r["decode_steps"] == 1 else "tokens")
        assert r["prediction_error"] == pytest.approx(
            r["predicted_dbo_ms"] / r["dbo_graph_ms"] - 1)
    for n in names:
        assert data["shapes"][n]["planning_seconds"] > 0
        assert data["shapes"][n]["shape"]["num_layers"] == 2  # the tiny stand-in
    assert res["path"] == str(path)
    out = capsys.readouterr().out
    table = out[out.index(f"wrote {path}"):]  # printed last
    assert "torch" in table and "CUDA" in table and all(n in table for n in names)
    report.main([str(tmp_path), "--markdown"])
    md = capsys.readouterr().out
    assert md.count("| held-out |") == len(shapes.DRY_TOKENS) * len(shapes.DRY_STEPS)
    report.main([str(tmp_path)])
    assert "model shapes" in capsys.readouterr().out


def test_shapes_measure_a_planned_placement_other_than_the_fallback() -> None:
    """When the plan moves a piece, both DBO graphs are measured and give the no-DBO
    graph's logits."""
    from coop_dbo.schedule import Placement

    dev = torch.device("cpu")
    cfg = common.make_config({**shapes.dry_shape(common.GPU_SHAPE)}, max_batch=8)
    model = common.make_model(cfg, None, dtype=torch.float32)
    with torch.no_grad():
        (plan,) = shapes.plan_sizes(model, [4], [1], dev, repeats=1).values()
        fb = model.schedule.fallback_placement(4)
        moved = Placement(keys_before=True, values_before=True, shared_before=False)
        assert moved != fb
        plan.placements[1] = (moved, 1000.0, fb, 1200.0)
        row = shapes.measure(model, plan, 1, dev, (1, 2))
    assert row["planned_placement"] == ["keys", "values"] and not row["same_placement"]
    assert row["diff_vs_nodbo"] == row["diff_fallback_vs_nodbo"] == 0
    assert row["dbo_graph_ms"] > 0 and row["dbo_fallback_graph_ms"] > 0
    assert row["predicted_dbo_ms"] == 1.0 and row["predicted_fallback_ms"] == 1.2


# -- cost model ---------------------------------------------------------------------------

def test_cost_model_conservative_between_points_nearest_outside() -> None:
    cm = CostModel({64: 0.7, 256: 1.10, 1024: 1.30, 2048: 0.98})
    per_ub = {32: False, 64: False, 100: False, 256: True, 500: True, 1024: True,
              1500: False, 2048: False, 8192: False}
    for t, want in per_ub.items():
        assert cm.should_overlap_ubatch(t) is want, t
        assert cm.should_overlap(2 * t) is want, t  # num_tokens: the step, before the split
    assert cm.should_overlap(1) is False  # fewer tokens than microbatches
    assert CostModel({128: 1.01}).should_overlap(10_000) is False  # within the margin
    assert CostModel({128: 1.01}, min_speedup=1.0).should_overlap(10_000) is True
    assert cm.speedup_estimate(640) == pytest.approx(1.2)


def test_cost_model_file_round_trip_and_profiles(tmp_path: Path) -> None:
    path = tmp_path / "calibration-x.json"
    a = CostModel({64: 0.8, 512: 1.2}, gpu="G", comm="nccl-ep2", model_shape={"hidden": 8})
    b = CostModel({64: 1.5}, gpu="G", comm="sim-ratio-1", model_shape={"hidden": 8})
    a.save(path)
    b.save(path)
    CostModel({64: 0.9, 512: 1.3}, gpu="G", comm="nccl-ep2", model_shape={"hidden": 8}).save(path)
    assert len(CostModel.load_all(path)) == 2  # same profile replaced, other kept
    got = CostModel.load(path, comm="nccl-ep2")
    assert got.points == {64: 0.9, 512: 1.3} and got.model_shape == {"hidden": 8}
    with pytest.raises(KeyError, match="nccl-ep2"):
        CostModel.load(path)  # two profiles: must pick one
    with pytest.raises(KeyError):
        CostModel.load(path, comm="nccl-ep8")
    with pytest.raises(ValueError):
        CostModel({})
    with pytest.raises(ValueError):
        CostModel({0: 1.0})
