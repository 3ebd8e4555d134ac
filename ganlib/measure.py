"""Honest training measurements: step times, images/s over a timed window, peak memory.

On CUDA each step is bracketed by CUDA events (no host sync inside the loop); the events are read
once at the end. On CPU the work is synchronous, so perf_counter around the step is exact.
"""

from __future__ import annotations

import resource
import time

import torch


class StepClock:
    """Times each training step after `warmup` steps; reports p50/p90 and images/s."""

    def __init__(self, device: torch.device, warmup: int):
        self.device = device
        self.warmup = warmup
        self._cuda = device.type == "cuda"
        self._open: tuple | None = None
        self._marks: list[tuple] = []  # (start, end) perf_counter pairs or CUDA events
        self._seen = 0
        self.paused_s = 0.0

    def start(self) -> None:
        self._seen += 1
        if self._seen <= self.warmup:
            self._open = None
            return
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._open = (ev,)
        else:
            self._open = (time.perf_counter(),)

    def stop(self) -> None:
        if self._open is None:
            return
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((self._open[0], ev))
        else:
            self._marks.append((self._open[0], time.perf_counter()))
        self._open = None

    def step_times_s(self) -> list[float]:
        """Seconds per timed step (synchronises CUDA once)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in self._marks]
        return [b - a for a, b in self._marks]

    def window_s(self) -> float:
        """Wall seconds from the first timed step's start to the last's end (gaps included)."""
        if not self._marks:
            return 0.0
        if self._cuda:
            torch.cuda.synchronize(self.device)
            return self._marks[0][0].elapsed_time(self._marks[-1][1]) / 1e3
        return self._marks[-1][1] - self._marks[0][0]

    @property
    def timed_steps(self) -> int:
        return len(self._marks)


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile (q in [0, 100]) of a non-empty list (torch.quantile)."""
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100.0))


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window; a no-op on CPU, whose peak RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """This process's peak memory in GB (1e9 bytes) and what kind of figure it is.

    CUDA: peak bytes allocated by the caching allocator on `device`. CPU: peak resident set size
    of the process (ru_maxrss, KiB on Linux), which includes the Python runtime and libraries.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "cpu_peak_rss"
