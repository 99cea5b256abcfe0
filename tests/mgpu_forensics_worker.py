"""Cross-rank forensics over NCCL under torchrun: a rank stuck in a transfer ends with the
watchdog's dump on every rank instead of a hang, and ranks with other graph sizes raise
the fingerprint error.

    torchrun --nproc_per_node=2 tests/mgpu_forensics_worker.py --out DIR [--limit 10]

Steps, bf16, the reference decoder with experts sharded over the ranks, exact NCCL
all-to-all (``TorchDistributedBackend``), ``CoopDBORunner(watchdog_s=limit)``:

1. a good eager DBO step (within 1e-2 of one GPU holding every expert);
2. the last rank hangs inside microbatch 1's first payload exchange (a host-side loop
   waiting for a transfer that never completes; its peers wait in NCCL): every rank
   raises ``StepTimeoutError`` within ``limit`` + 30 s (the group's own timeout is 600 s),
   and every rank's dump names the site and the backend call;
3. the group, aborted by the watchdog, is destroyed and made again (file rendezvous);
   a good step on the same runner is within 1e-2 again;
4. runners with other ``cuda_graph_sizes`` per rank: every rank raises
   ``ScheduleMismatchError`` naming both setups, before anything is captured.

Prints one ``RESULT`` line per rank (``failures=0`` when every check held) and exits
non-zero on a failure. ``--cpu`` runs steps 1-3 over gloo on the CPU (fp32), to try the
script without GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from fault_workers import FaultyTorchDistributedBackend, wait_for_peers
from helpers import decode_inputs

from coop_dbo import CoopDBORunner
from coop_dbo.backends import SingleProcessBackend
from coop_dbo.errors import ScheduleMismatchError, StepTimeoutError
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.trace.merge import load_rank_file


def emit(line: str) -> None:
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line[:4000] + "\n").encode())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def init(rank: int, world: int, path: str, backend: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="a directory every rank can write")
    p.add_argument("--limit", type=float, default=10.0, help="watchdog limit, seconds")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU, steps 1-3")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu:
        dev, dtype, comm = torch.device("cpu"), torch.float32, "gloo"
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dev = torch.device("cuda", torch.cuda.current_device())
        dtype, comm = torch.bfloat16, "nccl"
    os.makedirs(args.out, exist_ok=True)
    init(rank, world, os.path.join(args.out, "group0"), comm)
    odd = world - 1
    failures: list[str] = []
    cfg = MoEConfig.tiny(num_layers=2, hidden=256, num_heads=4, head_dim=64,
                         num_experts=4 * world, top_k=2, moe_intermediate=256,
                         shared_intermediate=256, max_batch=96, max_seq_len=16, seed=5)

    def inputs_of(step: int) -> tuple[torch.Tensor, ...]:
        """24-25 rows on KV-cache slots of their own (32 per step): a step reads no
        cache row an earlier one wrote, so one GPU's model is the reference."""
        tokens, positions, _ = decode_inputs(cfg, 24 + rank, seed=100 * step + rank,
                                             device=dev)
        return tokens, positions, torch.arange(24 + rank, device=dev) + 32 * (step - 1)
    backend = FaultyTorchDistributedBackend(cfg.num_experts)
    backend.arm_fault(None)
    model = MoEDecoder(cfg, backend, dtype=dtype, device=dev)
    single = MoEDecoder(cfg, SingleProcessBackend(cfg.num_experts), dtype=dtype, device=dev)
    dumps = os.path.join(args.out, "dumps")
    runner = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always",
                           watchdog_s=args.limit, dump_dir=dumps, trace=True)

    def good(step: int) -> None:
        inputs = inputs_of(step)
        try:
            out = runner(*inputs)
        except BaseException as exc:
            failures.append(f"step {step}: {type(exc).__name__}: {exc}")
            return
        err = rel_err(out, single(*inputs))
        if runner.last_path != "eager-dbo" or not err < 1e-2:
            failures.append(f"step {step}: path {runner.last_path}, rel err {err:.2e}")

    good(1)
    # 2. the odd rank hangs inside a transfer; its peers wait in NCCL
    if rank == odd:
        backend.arm_fault("_exchange", ubatch=1, call=0, kind="hang")
        backend.timeout_s = 300.0
    inputs = inputs_of(2)
    t0 = time.monotonic()
    try:
        runner(*inputs)
        failures.append("stuck step: returned")
    except StepTimeoutError as exc:
        elapsed = time.monotonic() - t0
        if not elapsed < args.limit + 30:
            failures.append(f"stuck step: raised after {elapsed:.1f} s")
        emit(f"STUCK rank={rank} after={elapsed:.1f}s error={exc}")
    except BaseException as exc:
        failures.append(f"stuck step: {type(exc).__name__}: {exc}")
    backend.arm_fault(None)
    dump = os.path.join(dumps, f"coop_dbo-runner0-step2-rank{rank}.json")
    try:
        where = {u["ubatch"]: (u["site"], u["op"]) for u in load_rank_file(dump)["ubatches"]}
        emit(f"DUMP rank={rank} {where}")
        if not any(site is not None and op is not None for site, op in where.values()):
            failures.append(f"dump names no site in a backend call: {where}")
    except (OSError, ValueError) as exc:
        failures.append(f"dump: {exc}")
    # 3. a new group; the same runner is right again
    wait_for_peers(args.out, "regroup", rank, world, 120.0)
    dist.destroy_process_group()
    init(rank, world, os.path.join(args.out, "group1"), comm)
    runner.process_group = dist.group.WORLD
    good(3)
    # 4. other graph sizes per rank: the fingerprint stops every rank before capture
    if not args.cpu:
        graph_sizes_differ(model, cfg, rank, world, dev, failures)
    emit(f"RESULT rank={rank} world={world} failures={len(failures)}")
    for f in failures[:20]:
        emit(f"FAIL rank={rank} {f}")
    if not args.cpu:
        torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(1 if failures else 0)


def graph_sizes_differ(model: MoEDecoder, cfg: MoEConfig, rank: int, world: int,
                       dev: torch.device, failures: list[str]) -> None:
    """Runners with other ``cuda_graph_sizes`` per rank raise the fingerprint error."""
    graphs = CoopDBORunner(model, process_group=dist.group.WORLD, decide="always",
                           cuda_graph_sizes=[16] if rank == 0 else [32])
    try:
        graphs(*decode_inputs(cfg, 12, seed=3 + rank, device=dev))
        failures.append("graph sizes differ: no error")
    except ScheduleMismatchError as exc:
        want = ("the ranks disagree on the setup of step 1: rank 0: 2 microbatches, graph "
                "sizes [16]; " + "; ".join(f"rank {r}: 2 microbatches, graph sizes [32]"
                                            for r in range(1, world)) + ".")
        if not str(exc).startswith(want):
            failures.append(f"graph sizes differ: {exc}")
    except BaseException as exc:
        failures.append(f"graph sizes differ: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
