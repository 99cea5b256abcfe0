"""GPU time of the reference model's small building blocks, alone (CUDA only).

Each candidate is captured 20 times back to back in a CUDA graph and the replay timed with
CUDA events (median of 15 replays, per call), so launch cost does not count. Used to pick
the cheaper of equal-result formulations in ``coop_dbo/models/moe_decoder.py`` and the
backends' pack and unpack; results in ``bench/RESULTS.md``.

* KV cache (heads 16, 32 positions, head_dim 128, bf16): gathering a microbatch's cache
  rows, writing the step's key and value, and SDPA backends against a written-out
  matmul-softmax-matmul, for 32 / 128 / 512 sequences.
* RMSNorm of ``[tokens, 2048]`` bf16: the written-out fp32 formula against
  ``F.rms_norm``.
* Stable argsort of expert ids (16 experts) as int64, int32, int16 and uint8 keys.

    python3 -m bench.probes.kernel_probe
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import capture_plain, median, time_cuda


def graph_us(fn: Callable[[], object], reps: int = 20) -> float:
    """GPU microseconds per call of ``fn``, from a graph of ``reps`` calls (captured after
    a warm-up by ``StepGraph``), median of 15 replays."""
    g = capture_plain(lambda: [fn() for _ in range(reps)], torch.device("cuda"))
    return median(time_cuda(g.replay, 15)) * 1e3 / reps


def _attention_cells(dev: torch.device, b: int, heads: int, seq: int, head_dim: int
                     ) -> list[float]:
    """One row of the attention table: ``b`` sequences (us per call)."""
    g = torch.Generator(device=dev).manual_seed(b)
    k_cache = torch.randn(2 * b, heads, seq, head_dim, device=dev, dtype=torch.bfloat16,
                          generator=g)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(2 * b, device=dev, generator=g)[:b]
    pos = torch.randint(0, seq, (b,), device=dev, generator=g)
    q, k, v = (torch.randn(b, heads, head_dim, device=dev, dtype=torch.bfloat16,
                           generator=g) for _ in range(3))
    keys, values = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
    visible = (torch.arange(seq, device=dev)[None, :] <= pos[:, None])[:, None, None, :]

    def gather() -> object:
        return k_cache.index_select(0, slots), v_cache.index_select(0, slots)

    def write() -> None:
        k_cache[slots, :, pos] = k
        v_cache[slots, :, pos] = v

    def sdpa(backend: SDPBackend | None = None) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            if backend is None:
                return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                                      attn_mask=visible)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                                      attn_mask=visible)
        return run

    def written_out() -> torch.Tensor:
        scores = (q.unsqueeze(2) @ keys.transpose(-1, -2)).float() * head_dim ** -0.5
        p = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype)
        return p @ values

    ref = sdpa()().float()
    for name, fn in (("mem-eff", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
                     ("math", sdpa(SDPBackend.MATH)), ("written out", written_out)):
        err = (fn().float() - ref).abs().max().item()
        assert err < 0.05, f"{name} differs from the default SDPA by {err}"
    return [graph_us(f) for f in (gather, write, sdpa(), sdpa(SDPBackend.EFFICIENT_ATTENTION),
                                  sdpa(SDPBackend.MATH), written_out)]


def _attention(dev: torch.device, heads: int = 16, seq: int = 32, head_dim: int = 128) -> None:
    """Gathering and writing the KV cache, and the SDPA variants."""
    print(f"KV cache and attention, {heads} heads x {seq} positions x {head_dim}, bf16 "
          "(us per call):")
    print(f"{'sequences':>9}  {'gather K,V':>10} {'write k,v':>9} {'SDPA default':>12} "
          f"{'SDPA mem-eff':>12} {'SDPA math':>9} {'matmul/softmax':>14}")
    for b in (32, 128, 512):
        cells = _attention_cells(dev, b, heads, seq, head_dim)
        print(f"{b:9d}  {cells[0]:10.1f} {cells[1]:9.1f} {cells[2]:12.1f} {cells[3]:12.1f} "
              f"{cells[4]:9.1f} {cells[5]:14.1f}")


def _rms_norm_written_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def _rms_norm(dev: torch.device, hidden: int = 2048) -> None:
    """The written-out fp32 RMSNorm against ``F.rms_norm``."""
    print(f"\nRMSNorm of [tokens, {hidden}] bf16 (us per call):")
    print(f"{'tokens':>9}  {'fp32 formula':>12} {'F.rms_norm':>10} {'max diff':>8}")
    for b in (128, 512):
        x = torch.randn(b, hidden, device=dev, dtype=torch.bfloat16)
        w = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
        written = partial(_rms_norm_written_out, x, w)
        fused = partial(F.rms_norm, x, (hidden,), w, 1e-6)
        diff = (written().float() - fused().float()).abs().max().item()
        print(f"{b:9d}  {graph_us(written):12.1f} {graph_us(fused):10.1f} {diff:8.3g}")


def _sorted_by(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.sort(ids.to(dtype), stable=True).indices


def _sort(dev: torch.device, num_experts: int = 16) -> None:
    """Stable argsort of expert ids with keys of each integer width."""
    print(f"\nstable argsort of expert ids < {num_experts} (us per call, key conversion "
          "included):")
    dtypes = (torch.int64, torch.int32, torch.int16, torch.uint8)
    print(f"{'ids':>9}  " + " ".join(f"{str(d).removeprefix('torch.'):>7}" for d in dtypes))
    for n in (64, 256, 1024):
        ids = torch.randint(0, num_experts, (n,), device=dev)
        ref = torch.argsort(ids, stable=True)
        cells = []
        for d in dtypes:
            run = partial(_sorted_by, ids, d)
            assert torch.equal(run(), ref)
            cells.append(graph_us(run))
        print(f"{n:9d}  " + " ".join(f"{c:7.1f}" for c in cells))


def main() -> None:
    """Print the three tables (CUDA only)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.probes.kernel_probe times CUDA kernels: run it on a GPU host.")
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    _attention(dev)
    _rms_norm(dev)
    _sort(dev)


if __name__ == "__main__":
    main()
