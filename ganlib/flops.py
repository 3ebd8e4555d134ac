"""Model FLOPs of a training step and the machine's measured matmul peak, for utilisation figures.

FLOPs are counted by torch.utils.flop_counter on a real step (matmuls and convolutions, forward
and backward; elementwise work is not counted, as in MFU conventions). The peak is not a spec-sheet
number: it is a large matmul in the same dtype timed on this device, in this run.
"""

from __future__ import annotations

import time

import torch

PEAK_MATMUL_SIDE = 2048  # square matmul side for the peak (GPU: 8192, see matmul_peak_flops)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 10) -> float:
    """Median FLOP/s of a large square matmul in `dtype` on `device` (synchronised timing)."""
    n = 8192 if device.type == "cuda" else PEAK_MATMUL_SIDE
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype whose matmul peak a step in `mixed_precision` is compared with."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
