"""Fixtures of the pytest-benchmark suite (not part of the ordinary test run: testpaths is tests/).

    pytest benchmarks --benchmark-only --benchmark-json=out.json     # then: python -m benchmarks.gate BASE out.json

How rounds are timed and normalised lives in benchmarks/timing.py (re-exported here for the
benchmark modules that import it from conftest).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.timing import (SLOWDOWN_ENV, configure_session, device, device_name,  # noqa: F401
                               measure, synchronize)

SOURCE_STEPS = 3  # training steps of a benchmark's source checkpoint: weights to load, not a good GAN


def pytest_configure(config) -> None:
    configure_session()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerator():
    """Make an Accelerator of a given precision (Accelerate keeps one state per process: reset it)."""
    from accelerate.state import AcceleratorState

    from ganlib.distributed import make_accelerator

    def make(precision: str):
        AcceleratorState._reset_state(True)
        return make_accelerator(precision)

    yield make
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def source_checkpoint(tmp_path_factory):
    """`source_checkpoint(net, size, width) -> directory` of a tiny source G and D for transfer strategies.

    Each (net, size, width) is trained once per session (SOURCE_STEPS steps of `scratch` on
    mnist5k, fp32), so strategies that load a source have real weights to start from.
    """
    from accelerate.state import AcceleratorState

    from ganlib.config import TrainConfig
    from ganlib.distributed import make_accelerator
    from ganlib.train import train

    made: dict[tuple[str, int, int], str] = {}

    def get(net: str, size: int, width: int) -> str:
        key = (net, size, width)
        if key not in made:
            out = tmp_path_factory.mktemp(f"source-{net}{size}-w{width}")
            AcceleratorState._reset_state(True)
            cfg = TrainConfig(net=net, size=size, width=width, data="mnist5k", batch=32, steps=SOURCE_STEPS,
                              warmup_steps=0, mixed_precision="no", out=str(out), progress=False)
            train(cfg, make_accelerator("no"))
            AcceleratorState._reset_state(True)
            made[key] = str(out)
        return made[key]

    return get
