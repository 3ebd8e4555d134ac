"""The calibration kernel on its own: this run's speed of the machine, in the gate's units.

Every other benchmark runs the same kernel between its rounds (benchmarks/timing.py) and is
compared in multiples of it; this benchmark records the kernel's own time and achieved FLOP/s, and
the gate refuses a run without it (a run that cannot say how fast its machine was that night).
"""

from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import calibration_kernel, measure


def test_calibration_kernel(benchmark):
    kernel = calibration_kernel()
    with FlopCounterMode(display=False) as counter:
        kernel()
    median = measure(benchmark, kernel, rounds=100, warmup=5, interleave=False, kernel=kernel.description)
    benchmark.extra_info.update({"flops": counter.get_total_flops(),
                                 "achieved_tflops": counter.get_total_flops() / median / 1e12})
