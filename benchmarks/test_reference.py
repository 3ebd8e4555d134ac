"""Our loop against the plain-PyTorch reference (issue: as fast as the code users write by hand).

Same `dcgan` 28 px network (default width) and batch, one process run: the reference first, then
our step in fp32 and bf16; each reports images/s and its ratio to the reference, plus model FLOPs
per step and the fraction of this device's matmul peak (same dtype, measured in this run).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.conftest import device, measure
from benchmarks.reference_loop import ReferenceLoop
from ganlib.config import TrainConfig
from ganlib.data import load_images
from ganlib.flops import matmul_peak_flops, precision_dtype
from ganlib.nets import NetConfig, build_networks

BATCH = 64
WIDTH = 64
# README's figure, asserted with a margin: fp32 ours/reference measured 1.15-1.26x on a CPU, 2.5-5.7x on
# an H200; below 1.0 the claim "faster than the loop people write" is false. (bf16 is not asserted:
# its speed-up on a CPU depends on AMX.)
MIN_FP32_RATIO = 1.0
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def images():
    return load_images("mnist5k", 28, 1).images


def test_reference_loop(benchmark, images):
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, 1, 100, WIDTH))
    loop = ReferenceLoop(G, D, images, BATCH, device=device())
    _medians["reference"] = measure(benchmark, loop.step, images_per_call=BATCH, rounds=20, warmup=3)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_our_loop(benchmark, precision, tmp_path, fresh_accelerator):
    from ganlib.train import Trainer

    accelerator = fresh_accelerator(precision)
    cfg = TrainConfig(net="dcgan", size=28, width=WIDTH, data="mnist5k", batch=BATCH, steps=10**6,
                      out=str(tmp_path), progress=False)
    trainer = Trainer(cfg, accelerator)
    step = iter(range(10**6))
    with FlopCounterMode(display=False) as counter:
        trainer.step(next(step))
    flops = counter.get_total_flops()
    median = measure(benchmark, lambda: trainer.step(next(step)), images_per_call=BATCH, rounds=20, warmup=3)
    peak = matmul_peak_flops(trainer.device, precision_dtype(precision))
    benchmark.extra_info.update({
        "flops_per_step": flops, "achieved_tflops": flops / median / 1e12, "peak_tflops": peak / 1e12,
        "peak_fraction": flops / median / peak, "precision": precision,
    })
    if "reference" in _medians and median == median:  # both timed (NaN: --benchmark-disable)
        ratio = _medians["reference"] / median
        benchmark.extra_info["ratio_to_reference"] = ratio
        if precision == "no":
            assert ratio >= MIN_FP32_RATIO, f"fp32 step {ratio:.2f}x the reference loop's speed"
