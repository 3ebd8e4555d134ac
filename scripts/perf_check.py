"""Our training loop against the plain-PyTorch reference, in one process, on this machine's device.

For each batch size: the reference DCGAN loop (per-sample ToTensor/Normalize, DataLoader, two
Adams), our loop in fp32 and in bf16 (ganlib.train, its own CUDA-event step timing), the FLOPs of
one step (torch.utils.flop_counter) and the fraction of this device's measured matmul peak
(same dtype) that the step achieves. Prints a table; --json writes the figures.

    python scripts/perf_check.py --batches 64 256 --steps 80 --json perf.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_loop import ReferenceLoop  # noqa: E402
from ganlib.config import TrainConfig  # noqa: E402
from ganlib.data import load_images  # noqa: E402
from ganlib.distributed import make_accelerator  # noqa: E402
from ganlib.flops import matmul_peak_flops  # noqa: E402
from ganlib.nets import NetConfig, build_networks  # noqa: E402
from ganlib.train import train  # noqa: E402


def reference_img_per_s(device: torch.device, batch: int, width: int, steps: int, warmup: int) -> float:
    """Images/s of the reference loop over `steps` timed steps after `warmup` (synchronised)."""
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("dcgan", 28, 1, 100, width))
    loop = ReferenceLoop(G, D, load_images("mnist5k", 28, 1).images, batch, device=device)
    for _ in range(warmup):
        loop.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def accelerator_for(precision: str):
    """A fresh Accelerator in `precision` (Accelerate keeps one state per process; reset it between)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return make_accelerator(precision)


def ours(accelerator, batch: int, width: int, steps: int, warmup: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(net="dcgan", size=28, width=width, data="mnist5k", steps=steps + warmup, batch=batch,
                          warmup_steps=warmup, out=out, progress=False, log_every=25, mixed_precision=precision)
        return train(cfg, accelerator).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results = []
    device = accelerator_for("no").device
    peaks = {"no": matmul_peak_flops(device, torch.float32), "bf16": matmul_peak_flops(device, torch.bfloat16)}
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; matmul peak fp32 "
          f"{peaks['no'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s", flush=True)
    for batch in args.batches:
        ref = reference_img_per_s(device, batch, args.width, args.steps, args.warmup)
        row = {"batch": batch, "reference_img_per_s": ref}
        for precision in ("no", "bf16"):
            m = ours(accelerator_for(precision), batch, args.width, args.steps, args.warmup, precision)
            step_s = m["timing/step_time_p50_ms"] / 1e3
            achieved = m["perf/flops_per_step"] / step_s
            key = "fp32" if precision == "no" else "bf16"
            row.update({f"{key}_img_per_s": m["timing/img_per_s"], f"{key}_ratio": m["timing/img_per_s"] / ref,
                        f"{key}_flops_per_step": m["perf/flops_per_step"],
                        f"{key}_achieved_tflops_p50": achieved / 1e12,
                        f"{key}_peak_fraction": achieved / peaks[precision]})
        results.append(row)
        print(f"batch {batch}: reference {ref:.0f} img/s | ours fp32 {row['fp32_img_per_s']:.0f} img/s "
              f"({row['fp32_ratio']:.2f}x, {row['fp32_peak_fraction']:.1%} of fp32 peak) | ours bf16 "
              f"{row['bf16_img_per_s']:.0f} img/s ({row['bf16_ratio']:.2f}x, {row['bf16_peak_fraction']:.1%} of bf16 peak)",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "peaks": peaks, "results": results}, indent=1))


if __name__ == "__main__":
    main()
