"""Does a third microbatch hide what two leave? (GPU; ``--dry-run-cpu`` checks the path)

With two microbatches a layer at comm = compute costs ``2(a + e) + |a - e|`` when the
stretch before the dispatch (``a``) and the experts' stretch (``e``) differ (the
planner's module doc). With three, each transfer has two other microbatches' stretches
to hide behind, and the planner's simulator hides nearly all of it. This probe measures
that on the reference decoder: for each shape and size ``T`` (tokens per microbatch), the
stretches are profiled at comm = compute (``bench.profile_layer.profile_with_comm``), and
for ``n`` = 2 and 3 microbatches of ``T`` tokens (batches of ``n T``): the same ``n``
microbatches one after the other without comm and with it, the DBO graph at the placement
the planner picks for ``n`` microbatches, and the transfers alone; share hidden as
``bench.shapes`` computes it, and the simulator's prediction.

    python3 -m bench.probes.ubatch_count [--shapes bench deepseek-v3-like] [--tokens 64 512]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import (
    MODEL_SHAPES,
    alternate,
    make_config,
    make_model,
    median,
    transfer_step,
)
from bench.profile_layer import capture_placed, profile_with_comm
from bench.shapes import dry_shape
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.planner import best_placement, share_hidden


def point(model: Any, T: int, n: int, prof: Any, comm: SingleProcessBackend,
          dev: torch.device, timing: tuple[int, int]) -> dict[str, Any]:
    """One (size, microbatch count) point: times in ms, share hidden, prediction."""
    cfg = model.cfg
    placement, predicted_us, _ = best_placement(prof, num_ubatches=n)
    zero = SingleProcessBackend(cfg.num_experts, num_max_tokens_per_rank=T)
    graphs = {"compute": capture_placed(model, T, placement, zero, dev, num_ubatches=1,
                                        num_parts=n),
              "nodbo": capture_placed(model, T, placement, comm, dev, num_ubatches=1,
                                      num_parts=n),
              "dbo": capture_placed(model, T, placement, comm, dev, num_ubatches=n,
                                    num_parts=n)}
    fns = {name: g.graphs[n * T].replay for name, g in graphs.items()}
    fns["comm"] = transfer_step(comm, cfg, T, n * cfg.num_layers, dev)
    ms = {name: median(v["all"]) for name, v in alternate(fns, *timing, dev).items()}
    ideal = max(ms["compute"], ms["comm"])
    return {"T": T, "n": n, "placement": "+".join(placement.before()) or "none", **ms,
            "share": share_hidden(ms["nodbo"], ms["dbo"], ideal),
            "predicted_dbo": predicted_us / 1e3}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["bench", "deepseek-v3-like"],
                   choices=sorted(MODEL_SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 512])
    p.add_argument("--counts", type=int, nargs="+", default=[2, 3])
    p.add_argument("--dry-run-cpu", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device("cpu" if a.dry_run_cpu else "cuda")
    tokens = [4, 8] if a.dry_run_cpu else a.tokens
    timing = (1, 2) if a.dry_run_cpu else (2, 8)
    if dev.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | tokens per microbatch | microbatches | placement before the dispatch | "
          "no-DBO ms | DBO ms | compute / comm ms | share hidden | predicted DBO ms |")
    print("| --- | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |")
    for name in a.shapes:
        shape = dry_shape(MODEL_SHAPES[name]) if a.dry_run_cpu else MODEL_SHAPES[name]
        cfg = make_config(shape, max_batch=max(a.counts) * max(tokens))
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model = make_model(cfg, SingleProcessBackend(cfg.num_experts), dtype=dtype,
                           device=dev)
        for T in tokens:
            prof, comm = profile_with_comm(model, T, dev, repeats=1 if a.dry_run_cpu else 3)
            for n in a.counts:
                r = point(model, T, n, prof, comm, dev, timing)
                share = "-" if r["share"] is None else f"{r['share']:.0%}"
                print(f"| {name} | {T} | {n} | {r['placement']} | {r['nodbo']:.3f} | "
                      f"{r['dbo']:.3f} | {r['compute']:.3f} / {r['comm']:.3f} | {share} | "
                      f"{r['predicted_dbo']:.3f} |", flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
