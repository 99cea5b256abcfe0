"""The ``hf`` stage: transformers MoE models through the runner, decode and prefill (GPU).

    python3 -m bench.hf_bench [--models qwen3_moe deepseek_v3] [--batches 64 256 1024]
                              [--ratios 0 1 2] [--quick] [--out DIR]

Models (random weights, bf16, built on the GPU): a Qwen3-MoE at a realistic width (hidden
2048, 12 layers, 32 heads x 128, 4 KV heads, 64 experts top-8, expert MLP 768, vocab
32000) and a DeepSeek-V3-like one (MLA attention, one shared expert, 64 routed experts
top-8, 8 layers, the first dense). MoE blocks go through ``install_moe_hooks`` with a
``SingleProcessBackend`` whose transfers are pinned host-to-device copies on the comm
stream (``transfer="copy_engine"``: time passes on the comm stream, no SM held), their
time proportional to the tokens moved (``us_per_tokens``).

Decode: a ``StaticCache`` is filled by a prefill, then one decode step is called as
``generate`` calls it (``input_ids [B, 1]``, a fixed-length 4-D mask, the cache) and timed
with CUDA events, the cache's counters put back between blocks. Variants: ``plain eager``
(hooks, no overlap), ``plain graph`` (the same call captured), ``DBO eager``, ``DBO graph``
(``CoopDBORunner(decide="always", cuda_graph_sizes=[B])``; also the host time to issue
one step through the runner, and the bare replay's: its copies and launch), and
``default`` (the runner as a user gets it: ``decide="auto"``, graph sizes; it measures its
first steps and keeps the faster path; the table shows what it picked and its time after
the choice).

Comm: ``ratio`` r = the comm per layer and microbatch over the compute of one microbatch
in one layer, that compute taken as half of the plain graph's step time at r = 0 over the
layers. The backend spends r x that per layer and microbatch (half each way) and twice as
much on a whole batch, so every variant moves the same total comm. ``ideal`` =
max(compute, comm) of the plain step; ``share`` = (plain graph - DBO graph) / (plain
graph - ideal).

Prefill: batch 4 prompts of 1024 and 4096 tokens (4k and 16k tokens), eager, plain and
DBO, at r = 0 and 1 (the compute measured the same way).

Writes ``hf-<stamp>.json`` and ``hf-<stamp>.png`` into ``--out`` and prints rich tables.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    git_rev,
    gpu_env,
    host_env,
    make_console,
    median,
    stamp,
    time_cuda,
    write_json,
)
from coop_dbo import CoopDBORunner, install_moe_hooks, remove_moe_hooks
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.cudagraph_capture import CallGraph
from coop_dbo.hf.cache import cache_snapshot
from coop_dbo.split import DefaultSplitter

PROMPT = 16  # tokens of the decode benchmark's prompt
DECODE_ROOM = 48  # decode steps a cache has room for


def build(family: str, quick: bool, num_layers: int | None = None) -> Any:
    """A bf16 random-weight model on the GPU, eval mode; ``num_layers`` overrides the
    depth (4 with ``quick``)."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    layers = num_layers or (4 if quick else None)
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(vocab_size=32000, hidden_size=2048, intermediate_size=6144,
                             moe_intermediate_size=768, num_hidden_layers=layers or 12,
                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
                             max_position_embeddings=32768)
        cls: Any = Qwen3MoeForCausalLM
    elif family == "deepseek_v3":
        cfg = DeepseekV3Config(vocab_size=32000, hidden_size=2048, intermediate_size=6144,
                               moe_intermediate_size=768, num_hidden_layers=layers or 8,
                               first_k_dense_replace=1, num_attention_heads=16,
                               num_key_value_heads=16, n_routed_experts=64,
                               n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                               topk_group=4, kv_lora_rank=512, q_lora_rank=768,
                               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                               max_position_embeddings=32768)
        cls = DeepseekV3ForCausalLM
    else:
        raise ValueError(f"unknown model {family!r}: qwen3_moe or deepseek_v3.")
    cfg._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        model = cls(cfg).to(torch.bfloat16).eval()
    return model


def num_experts(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_experts", None) or cfg.n_routed_experts)


def moe_layers(model: Any) -> int:
    cfg = model.config
    return int(cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0))


def set_comm(model: Any, us: float, per_tokens: int) -> None:
    """(Re)install the MoE hooks with a backend spending ``us`` each way per
    ``per_tokens`` tokens (so a whole batch and its microbatches move the same total)."""
    remove_moe_hooks(model)
    install_moe_hooks(model, SingleProcessBackend(num_experts(model), dispatch_us=us,
                                                  combine_us=us, transfer="copy_engine",
                                                  us_per_tokens=per_tokens))


class Decode:
    """One decode step of batch ``batch`` over a filled ``StaticCache``."""

    def __init__(self, model: Any, batch: int) -> None:
        from transformers import StaticCache

        self.model = model
        g = torch.Generator(device="cuda").manual_seed(batch)
        vocab = model.config.vocab_size
        self.cache = StaticCache(model.config, max_cache_len=PROMPT + DECODE_ROOM)
        ids = torch.randint(3, vocab, (batch, PROMPT), device="cuda", generator=g)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.kwargs = {
            "input_ids": torch.randint(3, vocab, (batch, 1), device="cuda", generator=g),
            "attention_mask": torch.ones(batch, 1, 1, PROMPT + DECODE_ROOM, dtype=torch.bool,
                                         device="cuda"),
            "past_key_values": self.cache, "use_cache": True, "return_dict": True}
        self.restore = cache_snapshot(self.cache)

    def timed(self, fn: Callable[[], Any], iters: int) -> float:
        """Median ms of ``fn`` over ``iters`` steps (3 warm-up), counters put back."""
        self.restore()
        with torch.no_grad():
            ms = time_cuda(fn, iters, warmup=3)
        self.restore()
        return median(ms)


def host_ms(dec: Decode, fn: Callable[[], Any], iters: int) -> float:
    """Median host time (ms) to issue one call of ``fn`` (no sync inside the timed part)."""
    times = []
    with torch.no_grad():
        for _ in range(iters):
            dec.restore()  # (the step advances the cache's counters; a cache has room
            torch.cuda.synchronize()  # for DECODE_ROOM steps)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
    dec.restore()
    return median(times)


def decode_point(model: Any, batch: int, ratio: float, c_ub_us: float, iters: int
                 ) -> dict[str, Any]:
    """Every decode variant at one batch and comm ratio."""
    n_layers = moe_layers(model)
    d_dbo = ratio * c_ub_us / 2  # per direction, per layer and microbatch
    row: dict[str, Any] = {"batch": batch, "ratio": ratio, "us_per_call_dbo": d_dbo}
    set_comm(model, d_dbo, batch // 2)  # d_dbo per microbatch; a whole batch twice that
    dec = Decode(model, batch)
    call = DefaultSplitter().plan((), dec.kwargs).static_call()
    assert call is not None
    pool = torch.cuda.graph_pool_handle()
    with torch.no_grad():
        plain_graph = CallGraph(model, call, pool=pool)
    row["plain_eager_ms"] = dec.timed(lambda: model(**dec.kwargs), iters)
    row["plain_graph_ms"] = dec.timed(lambda: plain_graph.replay(call), iters)
    # the bare replay's host time (the graph launch, which grows with its node count)
    row["plain_graph_host_ms"] = host_ms(dec, lambda: plain_graph.replay(call), 4 * iters)
    eager = CoopDBORunner(model, decide="always")
    row["dbo_eager_ms"] = dec.timed(lambda: eager(**dec.kwargs), iters)
    graphs = CoopDBORunner(model, decide="always", cuda_graph_sizes=[batch])
    row["dbo_graph_ms"] = dec.timed(lambda: graphs(**dec.kwargs), iters)
    assert graphs.last_path == f"graph:{batch}", graphs.last_path
    row["dbo_graph_host_ms"] = host_ms(dec, lambda: graphs(**dec.kwargs), 4 * iters)
    # the DBO graph's own launch, without the runner (its planning and the cache check)
    own = graphs._splitter.plan((), dec.kwargs).static_call()
    assert own is not None
    dbo_graph = graphs._call_graphs[("dbo", own.key)]
    row["dbo_graph_bare_host_ms"] = host_ms(dec, lambda: dbo_graph.replay(own), 4 * iters)
    default = CoopDBORunner(model, cuda_graph_sizes=[batch])
    dec.restore()
    with torch.no_grad():
        for _ in range(2 * (1 + default._decider.num_trials) + 1):  # measuring, then one
            default(**dec.kwargs)
    row["default_picked"] = default.last_path
    row["default_reason"] = default.last_reason
    row["default_ms"] = dec.timed(lambda: default(**dec.kwargs), iters)
    # A batch between captured sizes: padded to the next one (an eighth more rows). The
    # first call moves the cache into larger tensors, so the counters' snapshot is taken
    # again after it (the earlier one would put the old tensors back).
    rows = batch + max(1, batch // 8)
    padded = CoopDBORunner(model, decide="always", cuda_graph_sizes=[rows])
    dec.restore()
    with torch.no_grad():
        padded(**dec.kwargs)
    assert padded.last_path == f"graph:{rows}", padded.last_path
    dec.restore = cache_snapshot(dec.cache)
    row["padded_rows"] = rows
    row["dbo_graph_padded_ms"] = dec.timed(lambda: padded(**dec.kwargs), iters)
    row["dbo_graph_padded_host_ms"] = host_ms(dec, lambda: padded(**dec.kwargs), iters)
    comm = 2 * d_dbo * 2 * n_layers / 1e3  # ms: both directions, both microbatches
    compute = row["plain_graph_ms"] if ratio == 0 else None
    row["comm_ms"] = comm
    row["compute_ms"] = compute
    gc.collect()
    torch.cuda.empty_cache()
    return row


def prefill_point(model: Any, seq: int, ratio: float, c_ub_us: float, iters: int
                  ) -> dict[str, Any]:
    d_dbo = ratio * c_ub_us / 2
    g = torch.Generator(device="cuda").manual_seed(seq)
    ids = torch.randint(3, model.config.vocab_size, (4, seq), device="cuda", generator=g)
    row: dict[str, Any] = {"tokens": 4 * seq, "ratio": ratio}
    set_comm(model, d_dbo, 2 * seq)
    with torch.no_grad():
        row["plain_ms"] = median(time_cuda(lambda: model(input_ids=ids, use_cache=False),
                                           iters, warmup=1))
        runner = CoopDBORunner(model, decide="always")
        row["dbo_ms"] = median(time_cuda(lambda: runner(input_ids=ids, use_cache=False),
                                         iters, warmup=1))
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run(out_dir: Path, models: list[str], batches: list[int], ratios: list[float],
        quick: bool, log: Callable[[str], None] = print, layers: int | None = None,
        prefill: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"env": {**host_env(), **gpu_env(), "git": git_rev(),
                                      "command": " ".join(sys.argv)},
                              "models": {}}
    iters = 5 if quick else 15
    for family in models:
        model = build(family, quick, layers)
        n_layers = moe_layers(model)
        rows, prefill = [], []
        for batch in batches:
            base = decode_point(model, batch, 0.0, 0.0, iters)
            c_ub_us = base["plain_graph_ms"] * 1e3 / 2 / n_layers
            base["c_ub_us"] = c_ub_us
            rows.append(base)
            log(f"{family} batch {batch} r=0: {fmt(base)}")
            for r in ratios:
                if r == 0:
                    continue
                row = decode_point(model, batch, r, c_ub_us, iters)
                row["c_ub_us"] = c_ub_us
                row["compute_ms"] = base["plain_graph_ms"]
                rows.append(row)
                log(f"{family} batch {batch} r={r}: {fmt(row)}")
        for seq in ([] if not prefill else [1024] if quick else [1024, 4096]):
            base = prefill_point(model, seq, 0.0, 0.0, iters)
            c_ub = base["plain_ms"] * 1e3 / 2 / n_layers
            prefill += [base, prefill_point(model, seq, 1.0, c_ub, iters)]
            log(f"{family} prefill {4 * seq} tokens: {prefill[-2:]}")
        result["models"][family] = {"layers": model.config.num_hidden_layers,
                                    "moe_layers": n_layers, "decode": rows,
                                    "prefill": prefill}
        del model
        gc.collect()
        torch.cuda.empty_cache()
    path = write_json(out_dir / f"hf-{stamp()}.json", result)
    result["path"] = str(path)
    plot(result, out_dir / f"hf-{stamp()}.png")
    return result


def fmt(row: dict[str, Any]) -> str:
    keys = ("plain_eager_ms", "plain_graph_ms", "dbo_eager_ms", "dbo_graph_ms", "default_ms")
    return ", ".join(f"{k[:-3]} {row[k]:.3f}" for k in keys) + f", picked {row['default_picked']}"


def share(row: dict[str, Any]) -> float | None:
    compute = row.get("compute_ms")
    if not compute or not row["comm_ms"]:
        return None
    ideal = max(compute, row["comm_ms"])
    gain = row["plain_graph_ms"] - ideal
    return (row["plain_graph_ms"] - row["dbo_graph_ms"]) / gain if gain > 0 else None


def print_tables(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    env = result["env"]
    for family, data in result["models"].items():
        t = Table(title=f"{family} decode ({data['layers']} layers), {env.get('gpu', '?')}, "
                        f"torch {env.get('torch')}, CUDA {env.get('cuda')}: ms per step")
        for col in ("batch", "r", "plain eager", "plain graph", "DBO eager", "DBO graph",
                    "DBO graph / plain graph", "share", "default picks", "default",
                    "default / plain graph", "plain graph host", "DBO graph host",
                    "DBO graph bare host", "padded to",
                    "padded DBO graph", "padded host"):
            t.add_column(col, justify="right")
        for r in data["decode"]:
            s = share(r)
            t.add_row(str(r["batch"]), f"{r['ratio']:g}", f"{r['plain_eager_ms']:.3f}",
                      f"{r['plain_graph_ms']:.3f}", f"{r['dbo_eager_ms']:.3f}",
                      f"{r['dbo_graph_ms']:.3f}",
                      f"{r['plain_graph_ms'] / r['dbo_graph_ms']:.2f}x",
                      "-" if s is None else f"{100 * s:.0f}%", r["default_picked"],
                      f"{r['default_ms']:.3f}", f"{r['plain_graph_ms'] / r['default_ms']:.2f}x",
                      f"{r.get('plain_graph_host_ms', float('nan')):.3f}",
                      f"{r.get('dbo_graph_host_ms', float('nan')):.3f}",
                      f"{r.get('dbo_graph_bare_host_ms', float('nan')):.3f}",
                      str(r.get("padded_rows", "-")),
                      f"{r.get('dbo_graph_padded_ms', float('nan')):.3f}",
                      f"{r.get('dbo_graph_padded_host_ms', float('nan')):.3f}")
        console.print(t)
        if data["prefill"]:
            console.print(prefill_table(family, data))


def prefill_table(family: str, data: dict[str, Any]) -> Any:
    from rich.table import Table

    p = Table(title=f"{family} prefill, batch 4, eager: ms")
    for col in ("tokens", "r", "plain", "DBO", "plain / DBO"):
        p.add_column(col, justify="right")
    for r in data["prefill"]:
        p.add_row(str(r["tokens"]), f"{r['ratio']:g}", f"{r['plain_ms']:.2f}",
                  f"{r['dbo_ms']:.2f}", f"{r['plain_ms'] / r['dbo_ms']:.2f}x")
    return p


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(result["models"]), figsize=(6 * len(result["models"]), 4),
                             squeeze=False)
    for ax, (family, data) in zip(axes[0], result["models"].items(), strict=True):
        for r in sorted({row["ratio"] for row in data["decode"]}):
            rows = [row for row in data["decode"] if row["ratio"] == r]
            ax.plot([row["batch"] for row in rows],
                    [row["plain_graph_ms"] / row["dbo_graph_ms"] for row in rows], "o-",
                    label=f"DBO graph, r={r:g}")
            ax.plot([row["batch"] for row in rows],
                    [row["plain_graph_ms"] / row["default_ms"] for row in rows], "x--",
                    label=f"default runner, r={r:g}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (decode)")
        ax.set_ylabel("speedup over plain graph")
        ax.set_title(family)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3_moe", "deepseek_v3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.0, 1.0, 2.0])
    parser.add_argument("--quick", action="store_true", help="4 layers, fewer steps")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default 12 / 8; 4 with --quick)")
    parser.add_argument("--no-prefill", action="store_true", help="decode only")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 2:
        parser.error(f"--layers must be >= 2, got {args.layers}")
    if not torch.cuda.is_available():
        raise SystemExit("the hf stage needs a CUDA GPU.")
    console = make_console()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, args.models, args.batches, args.ratios, args.quick,
                 log=console.log, layers=args.layers, prefill=not args.no_prefill)
    print_tables(console, result)
    console.print(f"wrote {result['path']}")
    return result


if __name__ == "__main__":
    main()
