"""Shared test helpers: decode inputs, DBO vs reference runs, trace checks, free ports."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
from pathlib import Path

import torch

from coop_dbo import UBatchScheduler
from coop_dbo.models import MoEConfig, MoEDecoder


def decode_inputs(cfg: MoEConfig, batch: int, *, seed: int = 0, device="cpu",
                  num_steps: int = 1):
    """``(tokens, positions, slots)``: ``batch`` distinct slots, positions with room for
    ``num_steps`` decode steps (``MoEDecoder.decode``)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    positions = torch.randint(0, cfg.max_seq_len - num_steps + 1, (batch,), generator=g)
    slots = torch.randperm(cfg.max_batch, generator=g)[:batch]
    return tokens.to(device), positions.to(device), slots.to(device)


def routed_tokens(num_tokens: int, hidden: int, *, num_experts: int = 8, top_k: int = 2,
                  seed: int = 0):
    """``(x, topk_idx, topk_weights)`` for ``moe_exchange``: ``[num_tokens, hidden]`` fp32
    activations, ``top_k`` distinct int64 expert ids per token, weights in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k]
                       for _ in range(num_tokens)])
    return x, idx, torch.rand(num_tokens, top_k, generator=g)


def split_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_inputs(inputs, parts: int):
    sizes = split_sizes(inputs[0].shape[0], parts)
    return list(zip(*(t.split(sizes) for t in inputs)))


def run_dbo(model: MoEDecoder, inputs, sched: UBatchScheduler) -> torch.Tensor:
    chunks = split_inputs(inputs, sched.num_ubatches)
    outs = sched.run([lambda c=c: model(*c) for c in chunks])
    return torch.cat(outs)


def run_sequential(model: MoEDecoder, inputs, parts: int) -> torch.Tensor:
    """The same microbatches, one after the other, no scheduler (the no-DBO reference)."""
    return torch.cat([model(*c) for c in split_inputs(inputs, parts)])


def yields_per_layer(trace, num_ubatches: int) -> dict[int, list[str]]:
    """Sites yielded by each microbatch, in order."""
    out: dict[int, list[str]] = {u: [] for u in range(num_ubatches)}
    for e in trace:
        out[e.ubatch].append(e.site)
    return out


class StandInCallGraph:
    """Does with the call what a ``CallGraph`` does (warm-up runs with the state put back,
    replays on the captured arguments with the new tensors copied in), running the step
    eagerly instead of a graph. As a CUDA capture runs no kernel (and no collective), the
    capture itself runs nothing: the step runs ``num_warmup`` times, then once per replay.
    ``fail``: raise where a real capture would fail (after the warm-up)."""

    fail = False

    def __init__(self, step, call, *, pool=None, num_warmup: int = 2) -> None:
        self.key, self.step, self.replays = call.key, step, 0
        self.static = [t.clone() for t in call.tensors]
        self.args, self.kwargs = call.rebuild(self.static)
        restores = [snapshot() for snapshot in call.snapshots]
        for _ in range(num_warmup):
            step(*self.args, **self.kwargs)
            for restore in restores:
                restore()
        if type(self).fail:
            raise RuntimeError("operation not permitted when stream is capturing (stand-in)")

    def replay(self, call):
        assert call.key == self.key
        self.replays += 1
        for static, new in zip(self.static, call.tensors, strict=True):
            static.copy_(new)
        return self.step(*self.args, **self.kwargs)


class StandInStepGraph:
    """``StepGraph`` run eagerly: ``capture()`` runs the warm-up (the capture itself runs
    nothing, as on a GPU), ``replay`` copies the inputs in and runs the step. ``fail``:
    ``capture()`` raises after the warm-up, where a real capture would fail."""

    fail = False

    def __init__(self, fn, static_inputs, *, pool=None, num_warmup: int = 2,
                 keep_state=None) -> None:
        self.fn, self.static_inputs, self.num_warmup = fn, tuple(static_inputs), num_warmup
        self.capture_ms, self.pool_bytes = 0.0, 0

    def capture(self) -> None:
        for _ in range(self.num_warmup):
            self.fn(*self.static_inputs)
        if type(self).fail:
            raise RuntimeError("operation not permitted when stream is capturing (stand-in)")

    def replay(self, inputs=None):
        if inputs is not None:
            for dst, src in zip(self.static_inputs, inputs, strict=True):
                dst.copy_(src)
        return self.fn(*self.static_inputs)


def stand_in_graphs(set_attr, graph_class=StandInCallGraph,
                    step_graph_class=StandInStepGraph) -> None:
    """Make the runner's graph paths run on the CPU: calls look like CUDA calls
    (``SplitPlan.device``), whole-call graphs are ``graph_class`` stand-ins and the
    batch-tensor path's ``DBOGraphRunner`` captures ``step_graph_class`` ones.
    ``set_attr``: ``monkeypatch.setattr`` in a test, ``setattr`` in a worker process."""
    import coop_dbo.cudagraph_capture as capture
    from coop_dbo.split import _DefaultPlan

    set_attr(capture, "CallGraph", graph_class)
    set_attr(capture, "StepGraph", step_graph_class)
    set_attr(capture, "require_cuda", lambda what="": None)
    set_attr(torch.cuda, "graph_pool_handle", lambda: object())
    set_attr(_DefaultPlan, "device", property(
        lambda plan: None if plan.__dict__.get("_device") is None else torch.device("cuda"),
        lambda plan, device: plan.__dict__.__setitem__("_device", device)))


def rendezvous_files(tmp_path: Path, count: int) -> list[str]:
    """``count`` fresh paths for ``init_group``: one per process group a test creates.

    Ranks meet through a file in the test's own directory, so no TCP port is picked,
    released and then bound again by rank 0 (another process can take a port in between;
    ``free_port`` has that race and only the multi-GPU tests still use it)."""
    return [str(tmp_path / f"group{i}.rendezvous") for i in range(count)]


def init_group(backend: str, rank: int, world: int, rendezvous: str,
               timeout_s: float | None = None) -> None:
    """Join a ``world``-rank process group through the file ``rendezvous`` (from
    ``rendezvous_files``; one file per group). ``timeout_s``: the group's collective
    timeout, so a collective that cannot complete fails instead of hanging."""
    import torch.distributed as dist

    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_without_torch(body: str) -> str:
    """Run ``body`` in a fresh interpreter where importing torch fails and ``coop_dbo``
    is a bare package of this checkout (its ``__init__`` imports torch); check that
    torch stayed out and return what it printed."""
    package = Path(__file__).resolve().parent.parent / "coop_dbo"
    code = ("import sys, types\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "pkg = types.ModuleType('coop_dbo')\n"
            f"pkg.__path__ = [{str(package)!r}]\n"
            "sys.modules['coop_dbo'] = pkg\n"
            f"{body}\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout
