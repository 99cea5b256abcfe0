"""Cross-rank forensics over NCCL (2 GPUs, torchrun): ``tests/mgpu_forensics_worker.py``."""

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


@pytest.mark.timeout(600)
def test_nccl_stuck_transfer_ends_with_dumps_and_the_next_step_is_right(tmp_path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           os.path.join(HERE, "mgpu_forensics_worker.py"), "--out", str(tmp_path),
           "--limit", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    print(proc.stdout[-6000:], proc.stderr[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2, f"expected 2 RESULT lines:\n{proc.stdout[-3000:]}"
    assert all("failures=0" in line for line in results), "\n".join(results)
    stuck = [line for line in proc.stdout.splitlines() if line.startswith("STUCK")]
    assert len(stuck) == 2, "every rank ends the stuck step with StepTimeoutError"
