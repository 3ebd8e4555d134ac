"""Shared test fixtures: tiny training configs and a fresh Accelerate state per test."""

from __future__ import annotations

import os

# Test tensors are tiny: one thread is as fast, and on a loaded two-core machine OpenMP threads
# spinning against other processes made tiny runs up to 7x slower. Inherited by subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Injected failures (GANBENCH_FAULT, tests/faults/ganbench_faults.py): armed here for cells run in
# this process, and through tests/faults/sitecustomize.py in every process a test starts.
FAULTS_DIR = str(Path(__file__).parent / "faults")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [FAULTS_DIR, os.environ.get("PYTHONPATH")]))
sys.path.insert(0, FAULTS_DIR)
import ganbench_faults  # noqa: E402

ganbench_faults.arm()

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from ganlib.config import TrainConfig  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The smallest run that still exercises every part of the loop (seconds on two CPU cores).
TINY = dict(net="dcgan", size=28, width=8, batch=8, steps=4, data="mnist5k:classes=0-1:n=64",
            log_every=2, warmup_steps=1, progress=False)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; reset it so each test may pick its own precision."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def crash_after_first_checkpoint(monkeypatch):
    """`crash_after_first_checkpoint(run)` calls `run()`, which dies (KeyboardInterrupt) right after
    writing its first checkpoint, as a killed job would; checkpointing is whole again afterwards."""
    from ganlib import checkpoint as ckpt

    def crash(run) -> None:
        real_finish = ckpt.finish_checkpoint

        def die_after_the_first_checkpoint(*args, **kwargs):
            real_finish(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(ckpt, "finish_checkpoint", die_after_the_first_checkpoint)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(ckpt, "finish_checkpoint", real_finish)

    return crash


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(**overrides)` -> a validated TrainConfig writing under tmp_path/run."""

    def make(**overrides) -> TrainConfig:
        return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **overrides}).validate()

    return make


# A real, tiny `bench run`: one pair, finetune (ok) and scratch (failed by an injected NaN) on one
# CPU process, plus a GPU setup (skipped on a CPU machine). Report, `bench show` and W&B tests check
# their output on the records the harness really writes, not only on fakes.
REAL_RUN_MATRIX = {
    "name": "real",
    "network": {"name": "dcgan", "size": 28, "width": 8},
    "pairs": [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"}],
    "strategies": ["finetune", "scratch"],
    "setups": ["cpu-1proc", "1xgpu-bf16"],
    "seeds": [0],
    "source_steps": 10,
    "transfer_steps": 10,
    "train": {"batch": 16, "log_every": 5, "warmup_steps": 2},
    "metrics": {"num_samples": 100, "curve_samples": 50, "eval_every": 5},
}


@pytest.fixture(scope="session")
def real_run(tmp_path_factory):
    """(run directory, its records) of REAL_RUN_MATRIX, run once per session by `bench run`."""
    import subprocess
    import sys

    import yaml

    from bench.results import load_records
    from ganbench_faults import FAULT_ENV

    root = tmp_path_factory.mktemp("real-run")
    matrix = root / "real.yaml"
    matrix.write_text(yaml.safe_dump(REAL_RUN_MATRIX, sort_keys=False))
    env = {**{k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}, "GANBENCH_CACHE": str(root / "cache"),
           FAULT_ENV: "scratch-*=nan"}
    proc = subprocess.run([sys.executable, "-m", "bench", "run", str(matrix), "--out", str(root / "run"),
                           "--wandb", "disabled"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # the failed cell
    records = load_records(root / "run")
    assert sorted(r["status"] for r in records if r["setup"] == "cpu-1proc") == ["failed", "ok"]
    return root / "run", records
