"""CUDA stream bookkeeping for the greenlet scheduler.

torch keeps one *current stream* per OS thread. All microbatch greenlets share one thread,
so the scheduler saves the current stream of a microbatch when it yields and puts it back
when it resumes. Doing that with ``torch.cuda.current_stream()`` / ``set_stream()``
builds a Python ``Stream`` object on every call, several microseconds per yield; this
module works on the raw ``(stream_id, device_index, device_type)`` keys that
torch's C layer hands out, and keeps one cached ``Stream`` object per key for the few
places (event record / wait) that need an object.

Only imported once CUDA is initialised: ``greenlet_sched`` does not need torch.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StreamKey", "DeviceStreams", "comm_stream_for"]

#: ``(stream_id, device_index, device_type)`` as returned by ``torch._C._cuda_getCurrentStream``.
StreamKey = tuple[int, int, int]

_get_stream = torch._C._cuda_getCurrentStream
_set_stream = torch._C._cuda_setStream

# One comm stream per device for the whole process: a graph captured with one comm stream
# replays fine whichever stream later runs eagerly, and a fixed stream keeps its pool of
# cached blocks instead of creating a new one per scheduler.
_COMM_STREAMS: dict[int, torch.cuda.Stream] = {}


def comm_stream_for(device_index: int) -> torch.cuda.Stream:
    """The process-wide comm stream of ``device_index`` (created on first use)."""
    stream = _COMM_STREAMS.get(device_index)
    if stream is None:
        stream = torch.cuda.Stream(device=device_index)
        _COMM_STREAMS[device_index] = stream
    return stream


class DeviceStreams:
    """The compute and comm streams of one ``run`` on one device, plus raw get/set.

    Invariants:
        ``compute_key`` is the caller's current stream when ``run`` started, and is the
        current stream again when ``run`` returns or raises.
        ``objects`` maps every key handed to ``stream_object`` to one ``Stream``.
    """

    __slots__ = ("device_index", "compute", "comm", "compute_key", "comm_key", "objects",
                 "comm_used")

    def __init__(self) -> None:
        self.device_index: int = torch.cuda.current_device()
        self.compute_key: StreamKey = tuple(_get_stream(self.device_index))
        self.compute = torch.cuda.Stream(
            stream_id=self.compute_key[0], device_index=self.compute_key[1],
            device_type=self.compute_key[2])
        self.comm = comm_stream_for(self.device_index)
        self.comm_key: StreamKey = (self.comm.stream_id, self.comm.device_index,
                                    self.comm.device_type)
        self.objects: dict[StreamKey, Any] = {self.compute_key: self.compute,
                                                self.comm_key: self.comm}
        # Set once the comm stream has waited on the compute stream (the first completed
        # switch to it; under capture that fork brings it into the capture): the step
        # then ends with a join (compute waits for comm) so a capture never ends with an
        # unjoined stream. Never set by a switch that was unwound before its wait.
        self.comm_used = False

    def current_key(self) -> StreamKey:
        return _get_stream(self.device_index)

    @staticmethod
    def set_key(key: StreamKey) -> None:
        _set_stream(stream_id=key[0], device_index=key[1], device_type=key[2])

    def stream_object(self, key: StreamKey) -> torch.cuda.Stream:
        obj = self.objects.get(key)
        if obj is None:
            obj = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
            self.objects[key] = obj
        return obj

    def name(self, key: StreamKey) -> str:
        if key == self.compute_key:
            return "compute"
        if key == self.comm_key:
            return "comm"
        return f"stream{key[0]:#x}"

    def join_and_restore(self) -> None:
        """Make the compute stream wait for the comm stream, and make compute current."""
        self.set_key(self.compute_key)
        if self.comm_used:
            self.compute.wait_stream(self.comm)
