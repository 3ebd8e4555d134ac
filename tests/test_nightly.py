"""scripts/nightly.sh end to end on a small benchmark subset: record a baseline, rerun, inject a slowdown.

The matrix half is skipped (NIGHTLY_MATRIX=none; `bench compare` has its own tests in test_compare.py).
Baselines go to a temporary directory; the subset is the calibration kernel and one training step.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "nightly.sh"
STEP = "test_train_step[dcgan28-finetune-fp32]"

pytestmark = pytest.mark.slow


def nightly(tmp: Path, out: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run scripts/nightly.sh on the subset with baselines under `tmp`; stdout and stderr together."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NIGHTLY_", "GANBENCH_BENCH_"))}
    full_env.update({"NIGHTLY_BASELINES": str(tmp / "baselines"), "NIGHTLY_OUT": str(tmp / out),
                     "NIGHTLY_MATRIX": "none", "NIGHTLY_BENCH_K": "dcgan28-finetune-fp32", "NIGHTLY_SKIP_SETUP": "1",
                     "GANBENCH_CACHE": str(tmp / "cache"), **env})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A temporary baseline root holding one recorded run of the subset."""
    tmp = tmp_path_factory.mktemp("nightly")
    result = nightly(tmp, "update", "--update-baseline", NIGHTLY_BASELINE_RUNS="2")
    assert result.returncode == 0, output(result)
    assert "baseline recorded in" in result.stdout
    return tmp


def test_no_baseline_fails_before_running(tmp_path):
    result = nightly(tmp_path, "run")
    assert result.returncode == 2
    assert "no baseline for" in result.stderr and "--update-baseline" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was run


def test_update_records_the_subset_with_the_calibration_over_two_runs(recorded):
    (device_dir,) = (recorded / "baselines").iterdir()
    benchmarks = json.loads((device_dir / "benchmarks.json").read_text())["benchmarks"]
    assert {b["name"] for b in benchmarks} == {"test_calibration_kernel", STEP}
    step = next(b for b in benchmarks if b["name"] == STEP)
    assert len(step["extra_info"]["baseline_values"]) == 2  # the median of two runs
    assert not (device_dir / "matrix").exists()  # NIGHTLY_MATRIX=none records no matrix baseline


def test_unchanged_rerun_passes(recorded):
    result = nightly(recorded, "rerun")
    assert result.returncode == 0, output(result)
    assert "[nightly] OK: no regression" in result.stdout
    assert (recorded / "rerun" / "gate.txt").is_file()


def test_injected_slowdown_fails_and_names_the_benchmark(recorded):
    result = nightly(recorded, "slow", GANBENCH_BENCH_SLOWDOWN=f"{STEP}=0.3")
    assert result.returncode == 1, output(result)
    regressed = [line for line in output(result).splitlines() if "REGRESSED:" in line]
    assert regressed and all(STEP in line for line in regressed)
    assert f"confirming 1 regression(s) in a fresh process: benchmarks/test_train_step.py::{STEP}" in result.stdout
    assert f"REGRESSED (reproduced): {STEP}" in result.stderr  # the final summary names it
    assert "[nightly] FAILED" in result.stderr
