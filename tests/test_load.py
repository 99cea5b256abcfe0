"""Load on CPU: 10,000 consecutive runner steps at random batch sizes, every output exact,
with a failing step now and then; memory (RSS) and live greenlets do not grow.

Figures are printed (``pytest -s tests/test_load.py``) and quoted in ``docs/FAULTS.md``.
"""

from __future__ import annotations

import gc
import os
import random
import time

import greenlet
import pytest
import torch
from fault_workers import SMALL_CFG_KW, InjectedFault, YieldFaults

from coop_dbo import CoopDBORunner
from coop_dbo.models import MoEConfig, MoEDecoder
from coop_dbo.split import balanced_sizes

CFG = MoEConfig.tiny(**SMALL_CFG_KW)
STEPS = 10_000
WARMUP = 1_000  # steps before the memory baseline (allocator pools, caches, hypothesis...)
MAX_BATCH = 16
FAULT_EVERY = 100  # on average: a step fails at a random yield, then is retried
RSS_SLACK_MIB = 8.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_greenlets() -> int:
    """Greenlet objects alive (the runner's worker greenlets included), besides the one
    running this (the main greenlet)."""
    me = greenlet.getcurrent()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o is not me)


def reference(model: MoEDecoder, inputs, num_ubatches: int) -> torch.Tensor:
    """The plain model on the runner's microbatches, one after the other (bitwise equal
    to DBO: same shapes, same kernels); the whole batch when the runner runs it plainly."""
    batch = inputs[0].shape[0]
    if batch < num_ubatches:
        return model(*inputs)
    sizes = balanced_sizes(batch, num_ubatches)
    return torch.cat([model(*c) for c in zip(*(t.split(sizes) for t in inputs))])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_10k_runner_steps_exact_no_growth() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: intra-op threads only add contention
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    model, ref_model = MoEDecoder(CFG), MoEDecoder(CFG)  # same weights, separate KV caches
    faults = YieldFaults(None)
    runner = CoopDBORunner(faults.wrap(model))
    yields = 4 * CFG.num_layers
    paths: dict[str, int] = {}
    failed = 0
    base_rss = base_greenlets = 0.0
    samples: list[tuple[float, int]] = []  # (RSS MiB, gc objects) every 1000 steps
    t0 = time.perf_counter()
    try:
        with faults.installed():
            for step in range(STEPS):
                if step >= WARMUP and step % 1000 == 0:
                    gc.collect()
                    samples.append((rss_mib(), len(gc.get_objects())))
                    if step == WARMUP:
                        base_rss, base_greenlets = samples[0][0], live_greenlets()
                batch = rng.randint(1, MAX_BATCH)
                inputs = (torch.randint(0, CFG.vocab_size, (batch,), generator=gen),
                          torch.randint(0, CFG.max_seq_len, (batch,), generator=gen),
                          torch.randperm(CFG.max_batch, generator=gen)[:batch])
                runner.trace = rng.random() < 0.1
                if batch >= 2 and rng.random() < 1 / FAULT_EVERY:
                    ub, index = rng.randrange(2), rng.randrange(yields + 1)
                    faults.set(ub, index)
                    with pytest.raises(InjectedFault) as info:
                        runner(*inputs)
                    assert info.value.ubatch_id == ub
                    del info
                    faults.set(None)
                    failed += 1  # retried below on the same inputs, as a server would
                out = runner(*inputs)
                paths[runner.last_path] = paths.get(runner.last_path, 0) + 1
                expected = reference(ref_model, inputs, runner.num_ubatches)
                if not torch.equal(out, expected):
                    pytest.fail(f"step {step} (batch {batch}, path {runner.last_path}): "
                                f"max abs diff {(out - expected).abs().max().item()}")
        elapsed = time.perf_counter() - t0
        gc.collect()
        end_rss, end_greenlets = rss_mib(), live_greenlets()
        samples.append((end_rss, len(gc.get_objects())))
    finally:
        torch.set_num_threads(threads)
    print(f"\n{STEPS} steps in {elapsed:.1f} s ({elapsed / STEPS * 1e3:.2f} ms per step "
          f"with its reference), paths {paths}, {failed} failed steps retried; RSS after "
          f"{WARMUP} steps {base_rss:.1f} MiB, at the end {end_rss:.1f} MiB "
          f"({end_rss - base_rss:+.2f} MiB); live greenlets {base_greenlets} -> "
          f"{end_greenlets}; RSS every 1000 steps {[round(r, 1) for r, _ in samples]} "
          f"MiB; gc objects {[n for _, n in samples]}")
    assert paths["eager-dbo"] + paths["plain"] == STEPS
    assert paths["plain"] > 0 and paths["eager-dbo"] > 0.9 * STEPS
    assert failed > 50
    assert end_greenlets <= base_greenlets
    assert max(r for r, _ in samples) - base_rss < RSS_SLACK_MIB
    assert samples[-1][1] - samples[0][1] < 200  # no Python objects pile up either
