"""What a run directory holds and where: every file name of `bench run`'s output in one place.

    results.jsonl          the record: one line per cell attempt (bench/results.py)
    plan.json, matrix.yaml the run id, the planned cell ids and the resolved matrix (written once)
    report.html, plots/    `bench report`'s page and its PNGs (bench/report.py)
    cells.csv, .parquet    `bench export`'s default tables
    cells/<cell id>/       one cell's artifacts and log (bench/cell.py); records hold paths relative
                           to the run directory, so a run directory can be moved or copied whole
    launch/<name>.*        per launch or pool worker: .yaml its Accelerate config, .log its output,
                           .pid its process, .current the cell it is running
    .bench*.lock           `bench run`'s locks (bench/run.py)
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"
MATRIX_FILE = "matrix.yaml"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
CSV_FILE = "cells.csv"
PARQUET_FILE = "cells.parquet"
CELLS_DIR = "cells"
LAUNCH_DIR = "launch"
LOCK_FILE = ".bench.lock"        # held by the `bench run` working on the directory (shared by the shards of one run)
PLAN_LOCK = ".bench.plan.lock"   # held while a job creates or joins the plan, and while one writes the report


def results_path(run_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps its records."""
    return Path(run_dir) / RESULTS_FILE


def plan_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / PLAN_FILE


def matrix_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / MATRIX_FILE


def report_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / REPORT_FILE


def plots_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / PLOTS_DIR


def cell_dir(cell_id: str) -> str:
    """A cell's folder relative to the run directory, as records store it (`cells/<cell id>`)."""
    return f"{CELLS_DIR}/{cell_id}"


def launch_name(name: str, kind: str) -> str:
    """`launch/<name>.<kind>` relative to the run directory (as messages name it): kind yaml (its
    Accelerate config), log, pid or current (the cell it is running)."""
    return f"{LAUNCH_DIR}/{name}.{kind}"


def launch_file(run_dir: str | os.PathLike, name: str, kind: str) -> Path:
    """The file `launch_name(name, kind)` of a run directory."""
    return Path(run_dir) / launch_name(name, kind)


def lock_path(run_dir: str | os.PathLike, shard_label: str | None = None) -> Path:
    """The run directory's lock, or with `shard_label` the lock of that shard of the run."""
    return Path(run_dir) / (f".bench.{shard_label}.lock" if shard_label else LOCK_FILE)


def plan_lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / PLAN_LOCK
