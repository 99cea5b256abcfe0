"""Where the host time of a stream-switching yield goes (CUDA only): one line per piece.

Host microseconds per call of each CUDA call a stream-switching yield makes, through the
public torch API and through torch's C layer (20,000 calls after 100 of warm-up).

    python3 -m bench.probes.profile_switch
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def per_call_us(fn: Callable[[], object], n: int = 20_000) -> float:
    """Host microseconds per call of ``fn`` (mean of ``n`` calls after 100 of warm-up)."""
    for _ in range(100):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    """Print one line per call."""
    torch.cuda.init()
    s = torch.cuda.Stream()
    cur = torch.cuda.current_stream()
    ev = torch.cuda.Event()
    base = torch._C._CudaEventBase
    get = torch._C._cuda_getCurrentStream
    setk = torch._C._cuda_setStream
    key = get(0)
    rows: dict[str, Callable[[], object]] = {
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(),
        "_cuda_getCurrentStream(0)": lambda: get(0),
        "_cuda_setStream(key)": lambda: setk(stream_id=key[0], device_index=key[1],
                                             device_type=key[2]),
        "Event.record(stream)": lambda: ev.record(cur),
        "_CudaEventBase.record(ev, stream)": lambda: base.record(ev, cur),
        "Stream.wait_event(ev)": lambda: s.wait_event(ev),
        "_CudaEventBase.wait(ev, stream)": lambda: base.wait(ev, s),
    }
    for name, fn in rows.items():
        print(f"{name:40s} {per_call_us(fn):6.2f} us")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
