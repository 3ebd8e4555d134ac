"""The in-run calibration kernel: a fixed matmul whose median is the machine's speed tonight.

The gate divides every other median by this one, so a slower or busier machine does not read as a
regression. It also gives the matmul peak FLOP/s that the training step's utilisation is quoted against.
"""

import torch

from benchmarks.conftest import device, measure

N = 1024  # matrix side: big enough for the BLAS peak, small enough to take milliseconds


def test_calibration_matmul(benchmark):
    a = torch.randn(N, N, device=device())
    b = torch.randn(N, N, device=device())
    median = measure(benchmark, lambda: a @ b, rounds=50, warmup=5)
    benchmark.extra_info["tflops"] = 2 * N**3 / median / 1e12
