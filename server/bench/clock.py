"""Timing on the device's own timeline.

On a GPU, kernels run after the host has queued them, so a host clock read right after a call says when
the host was done, not the device. A :class:`DeviceClock` marks the device's timeline instead: CUDA events,
which the device timestamps when it reaches them in its stream. On a CPU the device is the host and every
op has finished when its call returns, so a mark is the host clock. Read spans only after
:meth:`synchronize`.
"""

from __future__ import annotations

import time

import torch


class DeviceClock:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def mark(self) -> torch.cuda.Event | float:
        if not self.is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
        """Device time from ``start`` to ``end`` (both reached: call :meth:`synchronize` first)."""
        if not self.is_cuda:
            assert isinstance(start, float) and isinstance(end, float), "a host clock marks host times"
            return end - start
        assert isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event)
        return start.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        """Wait until the device has run everything queued so far."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run everything queued so far (a no-op on the CPU)."""
    DeviceClock(device).synchronize()
