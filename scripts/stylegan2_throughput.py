"""Training throughput of the stylegan2 family: img/s, peak memory and matmul-peak fraction of one D+G step.

The figures issue 15's closing note asks for, measured the way the loop measures a run (Trainer.step,
FLOPs counted on a warm-up step, the device synchronised around every timed step, the median step):

  CPU, the stylegan2-small preset's network (run on a quiet machine, nothing else running):
    OMP_NUM_THREADS=2 python scripts/stylegan2_throughput.py --net stylegan2-tanh --size 32 --width 4 \
        --latent-dim 64 --batch 32
  GPU, config F at 256 px (one GPU):
    python scripts/stylegan2_throughput.py --size 256 --width 64 --latent-dim 512 --channels 3 \\
        --batch 16 32 --precision no bf16

Prints one line per (batch, precision) and the same as JSON. Peak memory is CUDA's peak allocated
bytes on a GPU and the process's peak RSS on the CPU (which cannot be reset between cases: on the
CPU run one case per invocation for a per-case figure). The matmul peak is measured on the same
device in the same dtype (ganlib.flops.matmul_peak_flops), so the fraction needs no datasheet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from accelerate.state import AcceleratorState
from torch.utils.flop_counter import FlopCounterMode

from ganlib.config import TrainConfig
from ganlib.distributed import make_accelerator
from ganlib.flops import matmul_peak_flops, precision_dtype
from ganlib.measure import peak_memory_gb, reset_peak_memory
from ganlib.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(net: str, size: int, width: int, latent_dim: int, channels: int, batch: int, precision: str, steps: int,
            warmup: int, r1_gamma: float) -> dict:
    """One case: `warmup` untimed steps (the first counts FLOPs), then `steps` timed ones."""
    AcceleratorState._reset_state(True)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(net=net, size=size, width=width, latent_dim=latent_dim, channels=channels,
                          data="mnist5k", batch=batch, steps=10**6, mixed_precision=precision, out=out,
                          r1_gamma=r1_gamma, progress=False)
        trainer = Trainer(cfg, make_accelerator(precision))
        device = trainer.device
        step = 1  # step 0 is a lazy-R1 step, and the FLOP counter cannot run inside autograd.grad
        with FlopCounterMode(display=False) as counter:
            trainer.step(step)
        flops = counter.get_total_flops()
        for step in range(step + 1, step + warmup):
            trainer.step(step)
        reset_peak_memory(device)
        times = []
        for step in range(step + 1, step + 1 + steps):  # lazy R1 (every 16) falls in the window as in a run
            _sync(device)
            t0 = time.perf_counter()
            trainer.step(step)
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak_gb, mem_kind = peak_memory_gb(device)
        median = statistics.median(times)
        matmul_peak = matmul_peak_flops(device, precision_dtype(precision))
        return {"net": net, "size": size, "width": width, "batch": batch, "precision": precision, "device": str(device),
                "img_per_s": batch / median, "step_time_p50_ms": median * 1e3, "peak_mem_gb": peak_gb,
                "mem_kind": mem_kind, "flops_per_step": flops, "achieved_tflops": flops / median / 1e12,
                "matmul_peak_tflops": matmul_peak / 1e12, "peak_fraction": flops / median / matmul_peak,
                "timed_steps": steps, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="stylegan2", help="stylegan2 | stylegan2-tanh (the stylegan2-small preset's)")
    parser.add_argument("--size", type=int, default=32, help="image side, px")
    parser.add_argument("--width", type=int, default=4, help="width multiplier (64 = config F)")
    parser.add_argument("--latent-dim", type=int, default=64, help="latent length (512 = config F)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (3 = FFHQ)")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="images per step (one case each)")
    parser.add_argument("--precision", nargs="+", default=["no"], help="no | bf16 (one case each)")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per case (the first counts FLOPs)")
    parser.add_argument("--r1-gamma", type=float, default=0.05, help="R1 weight (lazy, every 16 steps)")
    args = parser.parse_args()
    rows = []
    for precision in args.precision:
        for batch in args.batch:
            row = measure(args.net, args.size, args.width, args.latent_dim, args.channels, batch, precision, args.steps,
                          args.warmup, args.r1_gamma)
            rows.append(row)
            print(f"{row['net']} {row['size']}px width {row['width']} batch {batch} {precision} on {row['device']}: "
                  f"{row['img_per_s']:.1f} img/s (step p50 {row['step_time_p50_ms']:.0f} ms), peak memory "
                  f"{row['peak_mem_gb']:.2f} GB ({row['mem_kind']}), {row['achieved_tflops']:.3f} TFLOP/s = "
                  f"{row['peak_fraction']:.1%} of the measured matmul peak {row['matmul_peak_tflops']:.2f} TFLOP/s",
                  flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
