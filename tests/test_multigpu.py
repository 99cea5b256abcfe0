"""Multi-GPU tests: NCCL expert parallelism under torchrun (skipped with fewer than 2 GPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 or more CUDA GPUs"),
]

HERE = os.path.dirname(__file__)


@pytest.mark.timeout(900)
def test_nccl_ep_dbo_eager_and_graphs() -> None:
    n = min(torch.cuda.device_count(), 4)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           os.path.join(HERE, "mgpu_worker.py"), "--replays", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=850)
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == n, f"expected {n} RESULT lines:\n" + proc.stdout[-3000:]
    assert all("failures=0" in line for line in results), "\n".join(results)
