"""Shared test fixtures: tiny training configs and a fresh Accelerate state per test."""

from __future__ import annotations

import os

# Test tensors are tiny: one thread is as fast, and on a loaded two-core machine OpenMP threads
# spinning against other processes made tiny runs up to 7x slower. Inherited by subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
def tiny_config(tmp_path):
    """`tiny_config(**overrides)` -> a validated TrainConfig writing under tmp_path/run."""

    def make(**overrides) -> TrainConfig:
        return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **overrides}).validate()

    return make
