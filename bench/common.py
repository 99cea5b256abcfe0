"""Shared helpers of the benchmarks: environment, model and inputs, timers, graphs, cost
model, plots and output files. Each helper exists once, here; the stages import it."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.schedule import SchedulePolicy
from coop_dbo.split import merge_outputs, split_tensors

RESULTS_DIR = Path(__file__).parent / "results"

# The model the GPU benchmarks run (1 GPU and torchrun). Big enough that a decode step is
# real GPU work (per layer: attention 2048 -> 16 heads x 128, 16 routed experts top-2 with
# a SwiGLU MLP of 1408, one shared expert of 1408; bf16), small enough that the 1-GPU
# sweep of 25 configurations takes a few minutes on an H100. ``max_batch`` (KV-cache
# slots) is set per run to the largest batch.
GPU_SHAPE: dict[str, int] = {"vocab_size": 8192, "hidden": 2048, "num_layers": 6,
                              "num_heads": 16, "head_dim": 128, "num_experts": 16, "top_k": 2,
                              "moe_intermediate": 1408, "shared_intermediate": 1408,
                              "max_seq_len": 32}

# The shapes of ``bench/shapes.py`` (its docstring says what each scales down and why);
# ``max_batch`` is set per run, as for GPU_SHAPE. A shared expert of width 1 stands for
# none: the decoder always has one, and a width of 0 fails when its weights are made.
DEEPSEEK_V3_LIKE_SHAPE: dict[str, int] = {
    "vocab_size": 8192, "hidden": 7168, "num_layers": 4, "num_heads": 56, "head_dim": 128,
    "num_experts": 32, "top_k": 8, "moe_intermediate": 2048, "shared_intermediate": 2048,
    "max_seq_len": 32}
QWEN3_MOE_LIKE_SHAPE: dict[str, int] = {
    "vocab_size": 8192, "hidden": 2048, "num_layers": 6, "num_heads": 32, "head_dim": 128,
    "num_experts": 64, "top_k": 8, "moe_intermediate": 768, "shared_intermediate": 1,
    "max_seq_len": 32}
# Fixed before any tuning; never tune a default or a threshold for it.
HELD_OUT_SHAPE: dict[str, int] = {
    "vocab_size": 8192, "hidden": 2560, "num_layers": 6, "num_heads": 20, "head_dim": 128,
    "num_experts": 48, "top_k": 6, "moe_intermediate": 896, "shared_intermediate": 1792,
    "max_seq_len": 32}
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "bench": GPU_SHAPE, "deepseek-v3-like": DEEPSEEK_V3_LIKE_SHAPE,
    "qwen3-moe-like": QWEN3_MOE_LIKE_SHAPE, "held-out": HELD_OUT_SHAPE}

# The CPU model: tiny widths, a few layers, so the host work (launching ops, yields)
# dominates, as in a host-bound decode step.
CPU_SHAPE: dict[str, int] = {"vocab_size": 512, "hidden": 64, "num_layers": 4, "num_heads": 4,
                              "head_dim": 16, "num_experts": 8, "top_k": 2,
                              "moe_intermediate": 32, "shared_intermediate": 32,
                              "max_seq_len": 32, "max_batch": 64}


def make_console() -> Any:
    """A rich Console; 200 columns wide when the output is not a terminal (logs)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def slug(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9._-]`` (file names safe in any shell or folder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "unknown"


def stamp() -> str:
    """Local time as ``YYYYmmdd-HHMMSS``, for output file names."""
    return time.strftime("%Y%m%d-%H%M%S")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_env() -> dict[str, Any]:
    """Host facts that do not initialise CUDA."""
    import greenlet

    return {"host": platform.node(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "greenlet": greenlet.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def gpu_env(dev: torch.device | None = None) -> dict[str, Any]:
    """GPU facts (initialises CUDA). On a CPU device (dry run), placeholders."""
    if dev is not None and dev.type != "cuda":
        return {"gpu": "cpu-dry-run", "gpu_count": 0, "sm_count": None,
                "gpu_memory_gib": None, "cuda": None, "nccl": None, "dry_run": True}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    nccl = None
    try:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # no NCCL in this build: None
        pass
    return {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "sm_count": props.multi_processor_count,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "nccl": nccl}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def add_config_overrides(p: argparse.ArgumentParser) -> None:
    """``--set FIELD=VALUE`` (repeatable): a ``SchedulePolicy`` or ``MoEConfig`` field to
    override, for A/B runs of a placement threshold and the like; read with
    ``config_overrides``, applied by ``make_config`` and ``make_model``."""
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a SchedulePolicy or MoEConfig field, e.g. "
                        "'values_gather_early_tokens=(0, 0)' (quoted in a shell)")


def config_overrides(p: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """The ``--set`` items as ``{field: value}`` (values are Python literals); a bad item
    ends the program through ``p.error`` with what was wrong."""
    fields = _fields(SchedulePolicy) | _fields(MoEConfig)
    config: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            p.error(f"--set takes FIELD=VALUE with a SchedulePolicy or MoEConfig field, got "
                    f"{item!r}")
        try:
            config[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--set {name}: {value!r} is not a Python literal")
    return config


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MoEConfig fields, SchedulePolicy fields)`` of ``config_overrides``' result: a
    field goes to the schedule policy when it is one of its fields."""
    policy = _fields(SchedulePolicy)
    return ({k: v for k, v in overrides.items() if k not in policy},
            {k: v for k, v in overrides.items() if k in policy})


def make_config(shape: dict[str, Any], max_batch: int | None = None) -> MoEConfig:
    """``MoEConfig(**shape)``, ``max_batch`` replaced when given; schedule-policy fields
    in ``shape`` (from ``--set``) are left to ``make_model``."""
    kw, _ = split_overrides(dict(shape))
    if max_batch is not None:
        kw["max_batch"] = max_batch
    return MoEConfig(**kw)


def make_model(cfg: MoEConfig, backend: Any = None, overrides: dict[str, Any] | None = None,
               **kw: Any) -> MoEDecoder:
    """``MoEDecoder(cfg, backend, schedule=SchedulePolicy(...), **kw)`` with the
    schedule-policy fields of ``overrides`` (the defaults without), no gradients."""
    _, policy = split_overrides(overrides or {})
    model = MoEDecoder(cfg, backend, schedule=SchedulePolicy(**policy), **kw)
    return model.requires_grad_(False)


def decode_inputs(cfg: MoEConfig, batch: int, *, seed: int = 0,
                  device: torch.device | str = "cpu", num_steps: int = 1
                  ) -> tuple[torch.Tensor, ...]:
    """``(tokens, positions, slots)`` of one decode step, ``batch`` distinct slots; the
    positions leave room for ``num_steps`` steps (``MoEDecoder.decode``)."""
    if not 1 <= num_steps <= cfg.max_seq_len:
        raise ValueError(f"num_steps must be in [1, max_seq_len={cfg.max_seq_len}], got "
                         f"{num_steps}: use fewer decode steps per graph.")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    positions = torch.randint(0, cfg.max_seq_len - num_steps + 1, (batch,), generator=g)
    slots = torch.randperm(cfg.max_batch, generator=g)[:batch]
    return tokens.to(device), positions.to(device), slots.to(device)


# Largest accepted |comm DBO / T_comm - 1| of a 1-GPU sweep point: the premise of its
# ratio is that the no-DBO and the DBO step had the same comm (gpu_bench measures a point
# again above it; tables mark the share).
COMM_TOLERANCE = 0.03


def share_hidden(t_nodbo: float, t_dbo: float, t_ideal: float) -> float | None:
    """(T_noDBO - T_DBO) / (T_noDBO - T_ideal); ``None`` when T_noDBO - T_ideal is under
    2% of T_noDBO (nothing worth hiding: the share would be noise)."""
    gap = t_nodbo - t_ideal
    if gap <= 0.02 * t_nodbo:
        return None
    return (t_nodbo - t_dbo) / gap


def share_from_graphs(t_nodbo: float, t_dbo: float, t_compute: float) -> float | None:
    """``share_hidden`` with the comm the no-DBO graph had, ``T_noDBO - T_compute`` (it
    waits for each transfer), in place of the transfers timed alone."""
    return share_hidden(t_nodbo, t_dbo, max(t_compute, t_nodbo - t_compute))


def set_backend(model: MoEDecoder, backend: Any) -> None:
    """Point the model and every layer at ``backend`` (the layers keep their weights)."""
    if backend.num_experts != model.cfg.num_experts:
        raise ValueError("backend routes a different number of experts than the model.")
    model.backend = backend
    for layer in model.layers:
        layer.backend = backend


def median(xs: Sequence[float]) -> float:
    """``statistics.median`` as a float."""
    return float(statistics.median(xs))


def free_memory(dev: torch.device) -> None:
    """Collect garbage and, on CUDA, hand the allocator's cached blocks back (between sweep
    points, so that one point's graphs do not crowd the next)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def calibrate_spin(dev: torch.device) -> None:
    """Warm the GPU up (clocks), then calibrate ``SingleProcessBackend``'s spin kernel once
    for this process, outside any capture. Nothing on CPU."""
    if dev.type != "cuda":
        return
    from coop_dbo.backends import SingleProcessBackend
    from coop_dbo.backends.single_process import calibrate_sleep_cycles_per_us

    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    for _ in range(50):
        a @ a
    torch.cuda.synchronize()
    SingleProcessBackend._cycles_per_us = calibrate_sleep_cycles_per_us(dev)


def sync(dev: torch.device | None = None) -> None:
    """``torch.cuda.synchronize`` on a CUDA device, nothing on CPU."""
    if dev is None or dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_device(fn: Callable[[], Any], iters: int, warmup: int = 2,
                dev: torch.device | None = None) -> list[float]:
    """``time_cuda`` on a CUDA device; per-call ``perf_counter`` ms on CPU (dry runs)."""
    if dev is None or dev.type == "cuda":
        return time_cuda(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


class _EagerGraph:
    """CPU dry run: ``StepGraph``'s ``replay()`` / ``static_outputs``, run eagerly."""

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> None:
        self.fn = fn
        self.static_inputs = tuple(inputs)
        self.static_outputs: Any = None

    def capture(self) -> None:
        self.replay()

    def replay(self, inputs: Sequence[torch.Tensor] | None = None) -> Any:
        self.static_outputs = self.fn(*self.static_inputs)
        return self.static_outputs


class EagerStandIn:
    """CPU dry run: ``DBOGraphRunner``'s interface (``graphs[size].replay()``, ``step``)
    with every "replay" an eager step, so the GPU benchmarks' logic runs without a GPU."""

    def __init__(self, fn: Callable[..., Any],
                 example_inputs: Callable[[int], Sequence[torch.Tensor]],
                 sizes: Sequence[int], *, num_ubatches: int = 2) -> None:
        from coop_dbo import UBatchScheduler

        self.fn = fn
        self.num_ubatches = num_ubatches
        self.scheduler = UBatchScheduler(num_ubatches)
        self.graphs = {s: _EagerGraph(self.step, example_inputs(s)) for s in sizes}
        for g in self.graphs.values():
            g.capture()

    def step(self, *inputs: torch.Tensor) -> Any:
        if self.num_ubatches == 1:
            return self.fn(*inputs)
        chunks = split_tensors(inputs, self.num_ubatches)
        fn = self.fn
        return merge_outputs(self.scheduler.run([lambda c=c: fn(*c) for c in chunks]))


class DecodeSteps:
    """``model.decode(tokens, positions, slots, num_steps)`` as a step function, so that a
    graph covers several decode steps (``capture_step`` binds ``model``'s backend)."""

    def __init__(self, model: MoEDecoder, num_steps: int) -> None:
        self.model = model
        self.num_steps = num_steps

    @property
    def backend(self) -> Any:
        return self.model.backend

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, positions, slots, self.num_steps)


class SequentialUbatches:
    """``fn`` over ``num_ubatches`` microbatches one after the other, outputs merged: the
    step DBO overlaps, without the overlap (``capture_step`` binds ``model``'s backend,
    so ``fn`` is a ``MoEDecoder`` or a ``DecodeSteps``)."""

    def __init__(self, fn: Callable[..., Any], num_ubatches: int = 2) -> None:
        self.fn = fn
        self.model: MoEDecoder = getattr(fn, "model", fn)
        self.num_ubatches = num_ubatches

    @property
    def backend(self) -> Any:
        return self.model.backend

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return merge_outputs([self.fn(*c) for c in split_tensors(inputs, self.num_ubatches)])


def step_fn(model: MoEDecoder, num_steps: int) -> Any:
    """What a graph runs: one forward (``num_steps`` = 1, logits) or ``num_steps`` greedy
    decode steps (tokens)."""
    return model if num_steps == 1 else DecodeSteps(model, num_steps)


def capture_step(fn: Callable[..., Any], example_inputs: Callable[[int], Sequence[torch.Tensor]],
                 batch: int, num_ubatches: int, dev: torch.device) -> Any:
    """``DBOGraphRunner(fn, example_inputs, [batch], num_ubatches=...)`` on CUDA; the eager
    stand-in on CPU (dry run). ``fn``: a ``MoEDecoder`` or a ``DecodeSteps``."""
    if dev.type == "cuda":
        from coop_dbo.cudagraph_capture import DBOGraphRunner

        return DBOGraphRunner(fn, example_inputs, [batch], num_ubatches=num_ubatches)
    backend = getattr(fn, "backend", None)
    if backend is None:
        return EagerStandIn(fn, example_inputs, [batch], num_ubatches=num_ubatches)

    def bound(*args: Any) -> Any:  # a graph keeps the backend it was captured with
        set_backend(getattr(fn, "model", fn), backend)  # type: ignore[arg-type]
        return fn(*args)
    return EagerStandIn(bound, example_inputs, [batch], num_ubatches=num_ubatches)


def capture_plain(fn: Callable[[], Any], dev: torch.device) -> Any:
    """``StepGraph(fn, ())`` captured on CUDA; the eager stand-in on CPU (dry run)."""
    if dev.type == "cuda":
        from coop_dbo.cudagraph_capture import StepGraph

        g: Any = StepGraph(fn, ())
    else:
        g = _EagerGraph(fn, ())
    g.capture()
    return g


def transfer_payloads(backend: Any, cfg: MoEConfig, tokens: int, dev: torch.device
                      ) -> tuple[Any, Any]:
    """``(dispatch payload, combine payload)`` of ``tokens`` random tokens routed top-k
    through ``backend`` (a ``SingleProcessBackend``), packed as a layer packs them: what
    its ``dispatch_transfer`` / ``combine_transfer`` take, to time the transfers alone
    (bf16 on CUDA, fp32 on a CPU dry run)."""
    g = torch.Generator(device="cpu").manual_seed(tokens)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(tokens, cfg.hidden, generator=g).to(dev, dtype)
    idx = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.top_k]
                       for _ in range(tokens)]).to(dev)
    w = torch.full((tokens, cfg.top_k), 1.0 / cfg.top_k, device=dev, dtype=x.dtype)
    packed = backend.dispatch_pack(x, idx, w)
    batch = backend.dispatch_unpack(backend.dispatch_transfer(packed))
    return packed, backend.combine_pack(batch.x, batch)


def transfer_step(backend: Any, cfg: MoEConfig, tokens: int, calls: int, dev: torch.device
                  ) -> Callable[[], None]:
    """``calls`` dispatch + combine transfers of ``backend`` for ``tokens`` tokens, alone:
    the whole transfer phases (the receive-buffer copies and the simulated transfer time),
    i.e. everything the comm stream runs in a step."""
    packed, packed_back = transfer_payloads(backend, cfg, tokens, dev)

    def fn() -> None:
        for _ in range(calls):
            backend.dispatch_transfer(packed)
            backend.combine_transfer(packed_back)
    return fn


def time_cuda(fn: Callable[[], Any], iters: int, warmup: int = 2) -> list[float]:
    """Per-call GPU time in ms of ``fn`` (CUDA events on the current stream), ``iters`` calls.

    Calls are back to back (no sync between them), so a graph replay is timed as the GPU
    runs it in a steady stream and an eager step includes any gap the host leaves.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def alternate(fns: dict[str, Callable[[], Any]], blocks: int, per_block: int | dict[str, int],
              dev: torch.device, before_block: Callable[[], None] | None = None
              ) -> dict[str, dict[str, list[float]]]:
    """Time each fn in alternating blocks (``per_block`` calls each, or per name;
    ``before_block`` runs before each fn's block, e.g. a barrier across ranks); samples
    split into halves A (even blocks) and B (odd blocks) and all."""
    out: dict[str, dict[str, list[float]]] = {k: {"A": [], "B": [], "all": []} for k in fns}
    for b in range(blocks):
        for name, fn in fns.items():
            if before_block is not None:
                before_block()
            n = per_block if isinstance(per_block, int) else per_block[name]
            ts = time_device(fn, n, warmup=1, dev=dev)
            out[name]["A" if b % 2 == 0 else "B"].extend(ts)
            out[name]["all"].extend(ts)
    return out


def host_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
               sync: Callable[[], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Host wall (perf_counter) and process CPU time (process_time) per call, in ms.

    The variants run round-robin (one call of each per round), so slow drifts of the
    machine hit all of them alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before
    and after each timed call, outside the timed region, so on a GPU the figure is the
    host time to issue the step.
    """
    out: dict[str, dict[str, list[float]]] = {k: {"wall_ms": [], "cpu_ms": []} for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if sync is not None:
                sync()
            out[name]["wall_ms"].append((t1 - t0) * 1e3)
            out[name]["cpu_ms"].append((c1 - c0) * 1e3)
    return out


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def git_rev() -> str | None:
    """The checkout's short commit, or ``None`` outside a git checkout."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=Path(__file__).parent, timeout=5, check=False)
        return r.stdout.strip() or None
    except Exception:  # not a git checkout
        return None


def open_speedup_plot() -> tuple[Any, Any, Any] | None:
    """``(plt, fig, ax)`` for a speedup-vs-tokens plot, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'coop-dbo[bench]').")
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    return plt, fig, ax


def save_speedup_plot(plot: tuple[Any, Any, Any], ticks: Sequence[int], xlabel: str,
                      ylabel: str, title: str, shape: dict[str, Any], path: Path) -> str:
    """Finish a plot from ``open_speedup_plot`` (log2 token axis, 1.0 line, the model
    shape under the title) and write it to ``path``."""
    plt, fig, ax = plot
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{shape['num_layers']} layers, hidden {shape['hidden']}, "
                 f"{shape['num_experts']} experts top-{shape['top_k']}, {shape['dtype']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def trace_dbo_step(graphs: Any, inputs: Sequence[torch.Tensor], batch: int,
                   dev: torch.device, path: Path | None) -> str | None:
    """Run one eager greenlet DBO step and one DBO graph replay of ``graphs`` (a
    ``DBOGraphRunner``); with ``path``, under torch.profiler, written there as a Chrome
    trace. Without ``path`` the same steps run unprofiled (ranks that do not trace must
    still issue the same collectives)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        with (profile(activities=activities) if path is not None else nullcontext()) as prof:
            with record_function("eager greenlet DBO step"):
                graphs.step(*inputs)
            sync(dev)
            with record_function("DBO graph replay"):
                graphs.graphs[batch].replay()
            sync(dev)
        if path is None or prof is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        return str(path)
    except Exception as e:  # the trace is a by-product; keep the numbers
        print(f"chrome trace failed: {e!r}")
        return None


def calibrate_and_judge(rows: list[dict[str, Any]], gpu: str, comm: str,
                        shape: dict[str, Any], path: Path, source: str) -> list[float]:
    """Write the cost model of ``rows`` (one comm setting) into ``path`` and judge it on
    held-out timings: fitted on block half A, applied to half B. Each row gets a
    ``cost_model`` entry; returns ``t_with_cost_model / t_noDBO`` per row (half B)."""
    from coop_dbo.cost_model import CostModel

    full = CostModel({r["tokens_per_ubatch"]: r["speedup"] for r in rows}, gpu=gpu,
                     comm=comm, model_shape=shape,
                     meta={"source": source, "date": host_env()["date"]})
    full.save(path)
    fit_a = CostModel({r["tokens_per_ubatch"]: r["halves"]["nodbo"]["A"]
                       / r["halves"]["dbo"]["A"] for r in rows}, gpu=gpu, comm=comm,
                      model_shape=shape)
    ratios = []
    for r in rows:
        nod_b, dbo_b = r["halves"]["nodbo"]["B"], r["halves"]["dbo"]["B"]
        use = fit_a.should_overlap(r["batch"])
        t_cm = dbo_b if use else nod_b
        r["cost_model"] = {"overlap": use, "t_ms": t_cm, "t_nodbo_B_ms": nod_b,
                           "t_dbo_B_ms": dbo_b, "t_min_B_ms": min(nod_b, dbo_b),
                           "vs_nodbo": t_cm / nod_b,
                           "overlap_full_fit": full.should_overlap(r["batch"])}
        ratios.append(t_cm / nod_b)
    return ratios


def fit_cost_models(groups: dict[str, list[dict[str, Any]]], gpu: str, shape: dict[str, Any],
                    out_dir: Path, source: str) -> dict[str, Any]:
    """``calibrate_and_judge`` for each comm setting (``{comm: rows}``) into one file
    ``calibration-<gpu>.json`` in ``out_dir``; the summary the result JSON carries."""
    path = out_dir / f"calibration-{slug(gpu)}.json"
    checks: list[float] = []
    for comm, rows in groups.items():
        checks += calibrate_and_judge(rows, gpu, comm, shape, path, source)
    return {"file": str(path), "worst_vs_nodbo": max(checks) if checks else None,
            "min_speedup": 1.02}


def explain(row: dict[str, Any], residual_causes: str) -> str:
    """One line on where a sweep row's time went, for the tables: the split penalty, comm
    too small to hide, and the time above the split schedule's own ideal (whose likely
    ``residual_causes`` the stage names)."""
    parts = []
    split = row["split_penalty"]
    if split > 0.05:
        parts.append(f"split costs +{split:.0%} compute (weights re-read per microbatch)")
    comm_share = row["t_comm_ms"] / row["nodbo_graph_ms"]
    if comm_share < 0.15:
        parts.append(f"comm is {comm_share:.0%} of the step: little to hide")
    resid = row["dbo_graph_ms"] - row["t_ideal_split_ms"]
    if resid > 0.05 * row["dbo_graph_ms"]:
        parts.append(f"{resid * 1e3:.0f} us above the split schedule's ideal "
                     f"({residual_causes})")
    return "; ".join(parts) or "close to ideal"
