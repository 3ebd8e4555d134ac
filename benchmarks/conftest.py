"""Shared measurement helpers for the pytest-benchmark suite (not part of the ordinary test run).

Every benchmark goes through `measure()`: warm-up rounds, then GROUPS groups of rounds; the
median round time is what pytest-benchmark reports, and the spread of the group medians
((max - min) / min) goes into extra_info["spread"] for the gate's stability check. On CUDA the
device is synchronised inside the timed function, so the timer sees finished work.
"""

from __future__ import annotations

import fnmatch
import os
import platform
import statistics
import time
from typing import Callable

import pytest
import torch

SLOWDOWN_ENV = "GANBENCH_BENCH_SLOWDOWN"  # tests of the gate only: "<benchmark glob>=<fraction>"
GROUPS = 5                                 # round groups whose medians define a benchmark's spread


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _injected_slowdown(name: str) -> float:
    spec = os.environ.get(SLOWDOWN_ENV, "")
    pattern, _, fraction = spec.partition("=")
    return float(fraction) if spec and fnmatch.fnmatchcase(name, pattern) else 0.0


def measure(benchmark, fn: Callable[[], None], *, images_per_call: int = 0, rounds: int = 20,
            warmup: int = 3, **info) -> float:
    """Benchmark `fn` (one call = one round); returns the median seconds per call.

    images_per_call: images one call processes, for the img_per_s extra info (0 = not an image op).
    """
    slowdown = _injected_slowdown(benchmark.name)

    def timed() -> None:
        t0 = time.perf_counter() if slowdown else 0.0
        fn()
        synchronize()
        if slowdown:  # an exact fractional slowdown of this benchmark, for the gate's own tests
            time.sleep((time.perf_counter() - t0) * slowdown)

    rounds = max(GROUPS, rounds - rounds % GROUPS)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    data = list(benchmark.stats.stats.data)
    size = len(data) // GROUPS
    medians = [statistics.median(data[i * size:(i + 1) * size]) for i in range(GROUPS)]
    median = statistics.median(data)
    benchmark.extra_info.update({
        "device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "spread": (max(medians) - min(medians)) / min(medians),
        **info,
    })
    if images_per_call:
        benchmark.extra_info["img_per_s"] = images_per_call / median
    return median


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerator():
    """Make an Accelerator of a given precision (Accelerate keeps one state per process: reset it)."""
    from accelerate.state import AcceleratorState

    from ganlib.distributed import make_accelerator

    def make(precision: str):
        AcceleratorState._reset_state(True)
        return make_accelerator(precision)

    yield make
    AcceleratorState._reset_state(True)
