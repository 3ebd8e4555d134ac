"""A realistic fake bench run directory for reporting tests (no training, fully deterministic).

`make_fake_run(dir)` writes `results.jsonl` (via bench.results.append_record), `matrix.yaml` and
per-cell PNG grids: 2 pairs x 4 strategies x 2 setups x 3 seeds, with one failed and one skipped
cell. Pair 1 has a clear winner (freeze_d), pair 2 a near tie. Only the measurements are made up:
identity, config, environment and skipped/failed records come from the builders `bench run`
uses (bench.cell, bench.env), so the fakes follow the real schema when it changes.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from bench.cell import LOG_FILE, cell_config, failed_record, identity, skipped_record
from bench.env import environment
from bench.matrix import Cell, Matrix, parse_matrix
from bench.results import append_record

RUN_ID = "20261127-213000-fake"
MATRIX = "fake"
PAIRS = [  # (source spec, target spec)
    ("mnist5k:classes=0-4", "mnist5k:classes=5-9:n=25"),
    ("mnist5k:classes=0-4", "digits:n=100"),
]
STRATEGIES = ["finetune", "freeze_d", "ewc", "scratch"]
SETUPS = {"cpu-1proc": 1, "cpu-2proc": 2}  # setup -> number of processes
SEEDS = (0, 1, 2)
# Mean final FID per (pair index, strategy) and its seed-to-seed std.
FID_MEAN = {
    0: {"finetune": 21.0, "freeze_d": 14.0, "ewc": 19.5, "scratch": 62.0},
    1: {"finetune": 30.0, "freeze_d": 30.8, "ewc": 33.0, "scratch": 70.0},
}
FID_STD = {0: 0.6, 1: 2.5}
# Transfer fidelity per strategy: (target-class share, memorised share); pair 1 (digits) gets no class metrics.
TRANSFER = {"finetune": (0.92, 0.30), "freeze_d": (0.95, 0.12), "ewc": (0.40, 0.08), "scratch": (0.97, 0.85)}
NO_CLASS_REASON = "target digits:n=100 selects no classes (every prediction would be a target class)"
FAILED_CELL = ("ewc", 0, "cpu-2proc", 2)         # (strategy, pair index, setup, seed)
FAILED_REASON = "RuntimeError: loss/D became NaN at step 140 (lr 0.002 too high?)"
SKIPPED_CELL = ("scratch", 1, "cpu-2proc", 1)
SKIPPED_REASON = "setup cpu-2proc needs 2 processes, 1 available"
STEPS, LOG_EVERY, FID_EVERY = 200, 10, 50
# The machine-specific environment values, fixed so that reports of the fake run are reproducible.
FIXED_ENV = {"python": "3.11.7", "torch": "2.14.1", "accelerate": "1.10.0", "git_commit": "abc1234",
             "hostname": "benchbox"}

MATRIX_SPEC = {
    "name": MATRIX,
    "network": {"name": "dcgan", "size": 28, "width": 64},
    "pairs": [{"source": s, "target": t} for s, t in PAIRS],
    "strategies": ["finetune", {"name": "freeze_d", "options": {"layers": 2}}, "ewc", "scratch"],
    "setups": list(SETUPS),
    "seeds": list(SEEDS),
    "source_steps": 400,
    "transfer_steps": STEPS,
    "train": {"batch": 32, "log_every": LOG_EVERY},
    "metrics": {"extractor": "lenet-mnist5k", "num_samples": 1000, "eval_every": FID_EVERY},
}


@functools.lru_cache(maxsize=1)
def fake_matrix() -> Matrix:
    """The fake run's matrix, parsed and validated as `bench run` does."""
    return parse_matrix(MATRIX_SPEC, "fake.yaml")


def fake_cell(strategy: str, pair_index: int, setup: str, seed: int) -> Cell:
    """A cell of the fake matrix; any seed (tests make records of seeds the matrix lacks)."""
    matrix = fake_matrix()
    cell = next(c for c in matrix.cells() if (c.strategy.id, c.pair, c.setup)
                == (strategy, matrix.pairs[pair_index], setup))
    return dataclasses.replace(cell, seed=seed)


def pair_name(index: int) -> str:
    """The id `bench run` gives fake pair `index`."""
    return fake_matrix().pairs[index].id


def cell_id(strategy: str, pair_index: int, setup: str, seed: int) -> str:
    """The id `bench run` gives a fake cell."""
    return fake_cell(strategy, pair_index, setup, seed).id


def fake_env(procs: int) -> dict:
    """bench.env's environment block of a CPU process group of `procs` processes."""
    group = SimpleNamespace(device=torch.device("cpu"), num_processes=procs, mixed_precision="no",
                            distributed_type="DistributedType." + ("MULTI_CPU" if procs > 1 else "NO"))
    env = environment(group)
    assert FIXED_ENV.keys() <= env.keys(), "bench.env renamed a field the fakes fix"
    return {**env, **FIXED_ENV}


def fake_record(strategy="finetune", pair_index=0, setup="cpu-1proc", seed=0, *, status="ok",
                reason=None, fid=None, rng=None) -> dict:
    """One record as `bench run` writes it, with plausible numbers; `fid` overrides the final FID."""
    rng = rng or random.Random(f"{strategy}{pair_index}{setup}{seed}")
    matrix, cell = fake_matrix(), fake_cell(strategy, pair_index, setup, seed)
    procs = SETUPS[setup]
    if status == "skipped":
        record = skipped_record(matrix, cell, RUN_ID, reason)
        record["env"].update(FIXED_ENV)
        return record
    if status == "failed":  # it ran for a while (as run_cell records it): wall time, no quality
        record = failed_record(matrix, cell, RUN_ID, reason)
        record.update(env=fake_env(procs), metrics={"timing/wall_s": 61.0},
                      artifacts={"dir": f"cells/{cell.id}", "log": f"cells/{cell.id}/{LOG_FILE}"})
        return record
    cid = cell.id
    if fid is None:
        fid = FID_MEAN[pair_index][strategy] + rng.gauss(0, FID_STD[pair_index])
    trainable = 1_200_000 if strategy != "freeze_d" else 900_000
    img_per_s = (800.0 if procs == 1 else 1430.0) * (1.15 if strategy == "freeze_d" else 1.0)
    img_per_s *= 1 + rng.gauss(0, 0.02)
    transfer_s = STEPS * 32 / img_per_s
    record = {
        **identity(matrix, cell, RUN_ID), "status": "ok", "reason": None, "config": cell_config(matrix, cell),
        "env": fake_env(procs), "metrics": {}, "curves": {"train": [], "fid": []},
        "artifacts": {"dir": f"cells/{cid}", "samples": f"cells/{cid}/samples.png",
                      "real": f"cells/{cid}/real.png", "log": f"cells/{cid}/{LOG_FILE}"},
    }
    record["metrics"] = {
        "timing/img_per_s": img_per_s, "timing/step_time_p50_ms": 32e3 / img_per_s,
        "timing/step_time_p90_ms": 34e3 / img_per_s, "timing/source_pretrain_s": 40.0,
        "timing/transfer_s": transfer_s, "timing/wall_s": transfer_s + 45.0,
        "timing/device_seconds": transfer_s * procs,
        "timing/time_to_target_s": transfer_s * 0.6 if fid < 25 else None,
        "timing/steps_to_target": int(STEPS * 0.6) if fid < 25 else None,
        "resources/peak_mem_gb": 0.9 + 0.25 * procs + rng.uniform(0, 0.05),
        "resources/peak_mem_gb_per_process": [0.9 + 0.25 * procs] * procs,
        "resources/mem_kind": "cpu_peak_rss", "resources/optimizer_state_bytes": trainable * 8,
        "params/trainable": trainable, "params/frozen": 1_200_000 - trainable + 300_000,
        "quality/fid": fid, "quality/kid_mean": fid / 1500 + rng.uniform(0, 1e-3),
        "quality/kid_std": 0.002, "quality/precision": max(0.0, 0.9 - fid / 100),
        "quality/recall": max(0.0, 0.8 - fid / 90), "quality/extractor": "lenet-mnist5k",
        "quality/num_samples": 1000, "perf/flops_per_step": 1.2e9,
        "perf/achieved_tflops": 1.2e9 * img_per_s / 32 / 1e12, "perf/peak_tflops": 0.5,
    }
    share, memorised = TRANSFER[strategy]
    diversity = 1.0 - memorised + rng.gauss(0, 0.03)
    record["metrics"].update({
        "transfer/memorised_share": min(1.0, max(0.0, memorised + rng.gauss(0, 0.02))),
        "transfer/nn_dist_ratio": 0.3 + diversity * 0.7, "transfer/diversity": 2.0 * diversity,
        "transfer/diversity_real": 2.0, "transfer/diversity_vs_real": diversity,
        "transfer/diversity_space": "features:lenet-mnist5k", "transfer/diversity_clusters": 20,
        "transfer/diversity_singletons": 2,
    })
    if pair_index == 0:
        record["metrics"].update({"transfer/target_class_share": min(1.0, share + rng.gauss(0, 0.02)),
                                  "transfer/class_coverage": 0.9 + rng.uniform(0, 0.08)})
    else:
        record["metrics"]["transfer/class_metrics_reason"] = NO_CLASS_REASON
    record["artifacts"]["nearest"] = f"cells/{cid}/nearest.png"
    record["metrics"]["perf/peak_fraction"] = record["metrics"]["perf/achieved_tflops"] / 0.5
    record["curves"]["train"] = _train_curve(rng, STEPS)
    record["curves"]["fid"] = [
        {"step": s, "wall_s": transfer_s * s / STEPS,
         "fid": fid + (150.0 - fid) * np.exp(-s / 45.0)} for s in range(0, STEPS + 1, FID_EVERY)]
    return record


def _train_curve(rng: random.Random, last_step: int) -> list[dict]:
    rows = []
    for s in range(LOG_EVERY, last_step + 1, LOG_EVERY):
        rows.append({"step": s, "loss/D": 1.4 * np.exp(-s / 120) + 0.5 + rng.gauss(0, 0.03),
                     "loss/G": 0.7 + 0.6 * (1 - np.exp(-s / 80)) + rng.gauss(0, 0.05),
                     "timing/img_per_s": 800.0 + rng.gauss(0, 10)})
    return rows


def _digit_grid(path: Path, seed: int, noise: float, rows: int = 4, size: int = 28) -> None:
    """A rows x rows grid of drawn digits plus Gaussian noise, saved as 8-bit grey PNG."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default()
    pad = 2
    side = rows * (size + pad) + pad
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for i in range(rows * rows):
        x, y = pad + (i % rows) * (size + pad), pad + (i // rows) * (size + pad)
        draw.text((x + 10, y + 8), str(int(rng.integers(5, 10))), fill=255, font=font)
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, noise * 255, (side, side))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((side * 2, side * 2), Image.NEAREST).save(path)


def make_fake_run(run_dir: str | Path, *, images: bool = True) -> list[dict]:
    """Write a whole fake run into `run_dir` and return its records in file order."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "matrix.yaml").write_text(yaml.safe_dump(fake_matrix().raw, sort_keys=False))
    records = []
    for p in range(len(PAIRS)):
        for strategy in STRATEGIES:
            for setup in SETUPS:
                for seed in SEEDS:
                    key = (strategy, p, setup, seed)
                    if key == FAILED_CELL:
                        record = fake_record(*key, status="failed", reason=FAILED_REASON)
                    elif key == SKIPPED_CELL:
                        record = fake_record(*key, status="skipped", reason=SKIPPED_REASON)
                    else:
                        record = fake_record(*key)
                    if images and record["status"] == "ok":
                        fid = record["metrics"]["quality/fid"]
                        _digit_grid(run_dir / record["artifacts"]["samples"], seed + 7 * p,
                                    noise=min(0.6, fid / 120))
                        _digit_grid(run_dir / record["artifacts"]["real"], 1000 + p, noise=0.0)
                        _digit_grid(run_dir / record["artifacts"]["nearest"], seed + 7 * p, noise=0.1, rows=2)
                    append_record(run_dir, record)
                    records.append(record)
    return records
