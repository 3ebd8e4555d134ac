"""How every benchmark is timed: warm-up, rounds interleaved with a calibration kernel, medians.

Clock: on a GPU (or any accelerator) a round is wall time, the device synchronised before the timer
is read. On a CPU it is the process's CPU time: on a shared machine the wall clock mostly measures
the neighbours (round times swung 2-3x between identical runs on our 2-core CI box, while CPU time
moved ~20%). pytest-benchmark's own statistics stay wall-clock; ours go into extra_info.

Calibration: the same machine still runs slower or faster from one minute to the next (caches and
memory bandwidth shared with other tenants, clocks). `measure()` runs a small fixed workload
(`CalibrationKernel`) before every round, outside the round's timer, and records each round's time
divided by the mean of the kernel times just before and just after it. The median of those ratios,
`extra_info["normalised"]` (in calibration-kernel units), is what the nightly gate compares.

Stability: the rounds are split into GROUPS consecutive groups; `extra_info["spread"]` is
(max - min) / min of the groups' median ratios. The gate calls a benchmark whose spread exceeds
its bound unstable and judges it only on changes larger than that spread.

Threads: the suite runs torch (and numpy's BLAS) with GANBENCH_BENCH_THREADS threads (default 1).
On a busy machine a 2-thread OpenMP pool spins at every barrier for a descheduled thread, which made
step times swing 60x on our 2-core CI box; one thread measures the same code repeatably.
Allocator: glibc keeps freed memory for reuse (`configure_allocator`). Thread count and allocator
mode are recorded, and the gate refuses to compare runs made with different ones.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

SLOWDOWN_ENV = "GANBENCH_BENCH_SLOWDOWN"  # tests of the gate only: "<benchmark name or glob>=<fraction>"
THREADS_ENV = "GANBENCH_BENCH_THREADS"    # torch/BLAS threads for the suite; 0 = leave the defaults
DEFAULT_THREADS = 1
ALLOCATOR_ENV = "GANBENCH_BENCH_ALLOCATOR"  # "keep" (default): glibc keeps freed memory; "default": untouched
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024          # glibc's largest: blocks up to 32 MiB come from the heap
GROUPS = 5                                # round groups whose medians define a benchmark's spread


def device() -> torch.device:
    """The device the suite measures on (the first GPU when there is one)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name() -> str:
    """What the numbers were measured on: the GPU's name, or `cpu <model> x<logical cores>`."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {_cpu_model()} x{os.cpu_count()}"


def configure_threads() -> int:
    """Limit torch and the BLAS/OpenMP pools to GANBENCH_BENCH_THREADS (default 1); returns torch's count."""
    wanted = int(os.environ.get(THREADS_ENV, DEFAULT_THREADS))
    if wanted > 0:
        torch.set_num_threads(wanted)
        try:  # numpy's BLAS (torch-fidelity's KID runs there); present through scikit-learn
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(limits=wanted)
    return torch.get_num_threads()


def configure_allocator() -> str:
    """Make glibc keep freed memory for reuse (unless GANBENCH_BENCH_ALLOCATOR=default); returns the mode.

    By default glibc hands large freed blocks back to the OS, so the next allocation page-faults
    and zeroes them again: generator sampling spent ~40% of its CPU time there on our CI box, and
    how long that takes depends on the host's memory pressure, not on our code. Keeping the memory
    (what jemalloc/tcmalloc do, and what PyTorch's CPU tuning guides recommend) measures our code's
    work. Returns "keep", or "default" when asked to, or off glibc (e.g. macOS).
    """
    if os.environ.get(ALLOCATOR_ENV, "keep") != "keep":
        return "default"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "default"
    kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return "keep" if kept else "default"


_allocator = "default"


def configure_session() -> None:
    """Threads and allocator for a benchmark session (the conftest calls it once, before any benchmark)."""
    global _allocator
    configure_threads()
    _allocator = configure_allocator()


def synchronize() -> None:
    """Wait for queued device work, so a timer read afterwards sees it finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def round_clock(dev: torch.device | None = None) -> tuple[str, Callable[[], float]]:
    """(name, clock) that times a round: CPU time of this process on a CPU, else wall time."""
    dev = dev or device()
    return ("process_time", time.process_time) if dev.type == "cpu" else ("perf_counter", time.perf_counter)


class CalibrationKernel:
    """A fixed small workload on the suite's device; `run(clock)` returns its synchronised seconds.

    Two parts, fp32, fixed seeds: compute like a small GAN step (one forward+backward of a 3x3 conv,
    16 -> 32 channels, batch 32 at 14x14, and MLP_REPEATS of a two-layer 256-wide MLP, batch 64) and
    memory traffic (one elementwise pass over STREAM_FLOATS floats, 3x the L2 of our CI box). `run`
    executes it once untimed first, so the timed run does not pay for the caches the benchmark's
    round just evicted. On our shared CPU box this pair tracked the machine's moment-to-moment
    speed for training steps, FID and sampling alike (run-to-run changes of the ratios ~2%), where a
    bare matmul left 10-15% (it ignores memory and dispatch speed).
    """

    MLP_REPEATS = 2
    STREAM_FLOATS = 2 * 1024 * 1024  # 8 MiB read + 8 MiB written

    def __init__(self, dev: torch.device | None = None):
        dev = dev or device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(16, 32, 3, padding=1).to(dev)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).to(dev)
            self.conv_in = torch.randn(32, 16, 14, 14).to(dev)
            self.mlp_in = torch.randn(64, 256).to(dev)
            self.stream_in = torch.randn(self.STREAM_FLOATS).to(dev)
        self.stream_out = torch.empty_like(self.stream_in)

    @property
    def description(self) -> str:
        """Recorded with every benchmark: runs are comparable only with the same kernel."""
        return (f"conv16-32x3 b32@14 + {self.MLP_REPEATS}x mlp256x2 b64 fwd+bwd + stream {self.STREAM_FLOATS} floats, "
                "fp32, warm")

    def __call__(self) -> None:
        params = list(self.conv.parameters())
        torch.autograd.grad(self.conv(self.conv_in).sum(), params)
        params = list(self.mlp.parameters())
        for _ in range(self.MLP_REPEATS):
            torch.autograd.grad(self.mlp(self.mlp_in).sum(), params)
        torch.mul(self.stream_in, 1.0001, out=self.stream_out)

    def run(self, clock: Callable[[], float]) -> float:
        self()
        synchronize()
        t0 = clock()
        self()
        synchronize()
        return clock() - t0


_kernel: CalibrationKernel | None = None


def calibration_kernel() -> CalibrationKernel:
    """The session's calibration kernel (built once)."""
    global _kernel
    if _kernel is None:
        _kernel = CalibrationKernel()
    return _kernel


def injected_slowdown(name: str) -> float:
    """The fraction by which GANBENCH_BENCH_SLOWDOWN slows benchmark `name` (0 when not named).

    The pattern matches the exact name, or as an fnmatch glob (where `[...]` is a character class,
    so name a parametrised benchmark exactly or with `*`, e.g. `*dcgan28-finetune-fp32*`).
    """
    spec = os.environ.get(SLOWDOWN_ENV, "")
    pattern, _, fraction = spec.partition("=")
    if spec and (name == pattern or fnmatch.fnmatchcase(name, pattern)):
        return float(fraction)
    return 0.0


def group_spread(values: list[float], groups: int = GROUPS) -> float:
    """(max - min) / min of the medians of `groups` consecutive equal groups of `values`."""
    size = len(values) // groups
    medians = [statistics.median(values[i * size:(i + 1) * size]) for i in range(groups)]
    return (max(medians) - min(medians)) / min(medians)


def measure(benchmark, fn: Callable[[], None], *, images_per_call: int = 0, rounds: int = 50,
            warmup: int = 3, interleave: bool = True, tolerance: float | None = None, **info) -> float:
    """Benchmark `fn` (one call = one round, device-synchronised); returns the median seconds per call.

    Seconds are on `round_clock()` (CPU time on a CPU, wall time on a GPU), as is img_per_s.
    images_per_call: images one call processes, for the img_per_s extra info (0 = not an image op).
    rounds:          timed rounds, rounded down to a multiple of GROUPS (at least 2 per group).
    interleave:      run the calibration kernel before each round and record time ratios (only the
                     calibration benchmark itself turns this off).
    tolerance:       a wider slowdown tolerance for this benchmark than the gate's (say why where used).
    info:            recorded in extra_info as given (what was measured: net, batch, precision...).
    """
    slowdown = injected_slowdown(benchmark.name)
    clock_name, clock = round_clock()
    kernel = calibration_kernel()
    kernel_times: list[float] = []
    round_times: list[float] = []

    def calibrate() -> None:
        kernel_times.append(kernel.run(clock))

    def timed() -> None:
        t0 = clock()
        fn()
        synchronize()
        if slowdown:  # an exact fractional slowdown of this benchmark on the round's clock, for the gate's tests
            end = clock() + (clock() - t0) * slowdown
            while clock() < end:
                pass
        round_times.append(clock() - t0)

    rounds = max(2 * GROUPS, rounds - rounds % GROUPS)
    benchmark.pedantic(timed, setup=calibrate if interleave else None, rounds=rounds, iterations=1,
                       warmup_rounds=warmup)
    if benchmark.stats is None:  # --benchmark-disable: fn ran once as a smoke test, nothing was timed
        return float("nan")
    times = round_times[-rounds:]
    median = statistics.median(times)
    extra = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "threads": torch.get_num_threads(), "allocator": _allocator, "clock": clock_name,
             "calibration": kernel.description,
             "rounds": rounds, "median_s": median}
    if interleave:
        calibrate()  # the kernel after the last round closes the last pair
        kernels = kernel_times[-(rounds + 1):]
        ratios = [t / ((before + after) / 2) for t, before, after in zip(times, kernels, kernels[1:])]
        extra.update({"normalised": statistics.median(ratios), "spread": group_spread(ratios),
                      "calibration_s": statistics.median(kernels)})
    else:
        extra["spread"] = group_spread(times)
    if tolerance is not None:
        extra["tolerance"] = tolerance
    extra.update(info)
    if images_per_call:
        extra["img_per_s"] = images_per_call / median
    benchmark.extra_info.update(extra)
    return median
