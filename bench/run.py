"""`bench run`: plan the matrix, launch each hardware setup once, survive crashes, report.

Each setup is one `accelerate launch` of `bench.worker` that runs that setup's cells in sequence.
A launch that dies is relaunched once and continues after the last finished cell; cells left
after a second death are recorded as failed. A setup that needs hardware this machine lacks is
recorded as skipped with the reason. Under a user's own `accelerate launch` (several processes,
e.g. a SLURM or multi-node job) the cells run in the current process group instead.
One `bench run` works on a run directory at a time (a lock file), and its workers exit when it
dies, so `bench run --resume DIR` after a killed run never races a leftover worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import yaml

from bench import worker
from bench.cell import failed_record, skipped_record
from bench.matrix import Cell, Matrix, SetupSpec, check_data, filter_cells, load_matrix, parse_matrix
from bench.results import append_record, load_records, results_path
from ganlib.checkpoint import atomic_write_text
from ganlib.errors import UserError

RELAUNCHES = 1  # a dead launch is started again this many times
THREADS_KEY = "threads_per_process"  # a setup key of ours (not Accelerate's): OMP/torch threads per process
LOCK_FILE = ".bench.lock"  # held by the `bench run` working on a run directory


def external_launch() -> bool:
    """True when this process is one of several started by the user's own launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(setup: SetupSpec) -> str | None:
    """Why `setup` cannot run on this machine (None when it can)."""
    if setup.num_machines > 1:
        return (f"needs {setup.num_machines} machines: start bench under your own `accelerate launch` on every "
                "node (see README, multi-node)")
    if setup.use_cpu:
        return None
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if present < setup.gpus_per_machine:
        return f"needs {setup.gpus_per_machine} GPU(s), {present} present"
    return None


def launch_config(setup: SetupSpec, run_dir: Path, base_config: Path | None) -> Path:
    """Write the Accelerate config of one launch: the base file (if any) with the setup on top."""
    config: dict = {}
    if base_config is not None and base_config.is_file():
        config = yaml.safe_load(base_config.read_text()) or {}
    config.update({k: v for k, v in setup.accelerate.items() if k != THREADS_KEY})
    config.setdefault("compute_environment", "LOCAL_MACHINE")
    config.setdefault("num_machines", 1)
    config.setdefault("machine_rank", 0)
    if setup.num_processes > 1:
        config["distributed_type"] = "MULTI_GPU"  # with use_cpu + ACCELERATE_USE_CPU: gloo on CPU
    else:
        config["distributed_type"] = "NO"
    path = run_dir / "launch" / f"{setup.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=True))
    return path


def launch(setup: SetupSpec, run_dir: Path, base_config: Path | None, wandb_args: list[str],
           cache_dir: Path | None) -> int:
    """One `accelerate launch` of the worker for `setup`; returns its exit code."""
    config = launch_config(setup, run_dir, base_config)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), "-m", "bench.worker", "--run-dir", str(run_dir),
           "--setup", setup.name, *wandb_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[worker.PARENT_ENV] = str(os.getpid())  # the workers exit when this process dies (see worker.py)
    if setup.use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # plain --cpu with several processes silently runs one
    threads = setup.accelerate.get(THREADS_KEY)
    if threads is None and setup.use_cpu and setup.num_processes > 1:
        threads = max(1, (os.cpu_count() or 1) // setup.num_processes)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(run_dir / "launch" / f"{setup.name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace")
                if not _noise(text):
                    sys.stdout.write(text)
                    sys.stdout.flush()
            return proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise


def _noise(line: str) -> bool:
    """Launcher chatter that says nothing to a person watching the run (it stays in the log)."""
    return any(s in line for s in ("The following values were not passed to `accelerate launch`",
                                   "`--num_machines` was set", "`--dynamo_backend` was set",
                                   "To avoid this warning pass in values"))


def new_run_dir(matrix: Matrix, out: Path | None) -> tuple[Path, str]:
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{matrix.name}"
    run_dir = out if out is not None else Path("runs") / run_id
    if (run_dir / worker.PLAN_FILE).exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    return run_dir, run_id


def write_plan(run_dir: Path, matrix: Matrix, run_id: str, cells: list[Cell]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / worker.MATRIX_FILE, yaml.safe_dump(matrix.raw, sort_keys=False))
    atomic_write_text(run_dir / worker.PLAN_FILE,
                      json.dumps({"run_id": run_id, "matrix": matrix.name, "cells": [c.id for c in cells]}, indent=1))


def resume_plan(run_dir: Path, matrix_ref: str | None, only: str | None) -> tuple[Matrix, str, list[Cell]]:
    """Matrix, run id and planned cells of an existing run directory (refusing another matrix)."""
    if not (run_dir / worker.PLAN_FILE).exists():
        raise UserError(f"--resume {run_dir}: not a bench run directory (no {worker.PLAN_FILE})")
    matrix, plan = worker.load_plan(run_dir)
    if matrix_ref is not None and load_matrix(matrix_ref).raw != matrix.raw:
        raise UserError(f"--resume {run_dir}: that run used a different matrix than {matrix_ref}; "
                        "resume without a matrix argument or start a new run")
    cells = [c for c in matrix.cells() if c.id in set(plan["cells"])]
    if only:
        cells = filter_cells(cells, only)
    return matrix, plan["run_id"], cells


def run_matrix(matrix_ref: str | None, *, only: str | None = None, resume: Path | None = None,
               out: Path | None = None, dry_run: bool = False, wandb_mode: str = "auto",
               wandb_project: str = "ganbench", wandb_entity: str | None = None,
               base_config: Path | None = None, cache_dir: Path | None = None,
               retry_failed: bool = False) -> int:
    """Run (or resume) a matrix; returns the exit code: 0 every cell ok or skipped, 1 any failed."""
    if retry_failed and resume is None:
        raise UserError("--retry-failed reruns the failed cells of an earlier run: give it with --resume DIR")
    if base_config is not None and not base_config.is_file():
        raise UserError(f"--accelerate-config {base_config}: no such file")
    if cache_dir is not None:
        os.environ["GANBENCH_CACHE"] = str(cache_dir)  # the launched workers inherit it
    if resume is not None:
        matrix, run_id, cells = resume_plan(resume, matrix_ref, only)
        run_dir = resume
    else:
        matrix = load_matrix(matrix_ref)
        cells = filter_cells(matrix.cells(), only)
        if external_launch() and not dry_run:
            run_dir, run_id = out, None  # named by the main process alone (_run_in_process_group)
        else:
            run_dir, run_id = new_run_dir(matrix, out)
    if dry_run:
        print(f"{len(cells)} cell(s) of matrix {matrix.name!r} (source {matrix.source_steps} steps, "
              f"transfer {matrix.transfer_steps} steps):")
        for i, cell in enumerate(cells, 1):
            reason = unavailable(matrix.setup(cell.setup))
            print(f"  {i:3d}. {cell.id}" + (f"   [skipped: {reason}]" if reason else ""))
        return 0
    check_data(matrix)
    if external_launch():
        return _run_in_process_group(matrix, run_dir, run_id, cells, resume is not None, wandb_mode,
                                     wandb_project, wandb_entity, cache_dir)
    if resume is None:
        write_plan(run_dir, matrix, run_id, cells)
    with _only_runner(run_dir):
        if retry_failed:
            _forget_failed(run_dir)
        return _run_setups(matrix, run_dir, run_id, cells, base_config, cache_dir, wandb_mode, wandb_project,
                           wandb_entity)


@contextlib.contextmanager
def _only_runner(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory: two `bench run`s on one directory would run cells twice."""
    with open(run_dir / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `bench run` is using {run_dir}; wait for it to end or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _latest(run_dir: Path) -> dict[str, dict]:
    """The latest record of each cell so far (empty before the first record)."""
    if not results_path(run_dir).exists():
        return {}
    return {r["cell_id"]: r for r in load_records(run_dir)}


def _run_setups(matrix: Matrix, run_dir: Path, run_id: str, cells: list[Cell], base_config: Path | None,
                cache_dir: Path | None, wandb_mode: str, wandb_project: str, wandb_entity: str | None) -> int:
    """One launch per setup (relaunched once after a death), skipped setups recorded; the exit code."""
    print(f"[bench] run {run_id}: {len(cells)} cell(s) -> {run_dir}", flush=True)
    wandb_args = ["--wandb", wandb_mode, "--wandb-project", wandb_project]
    if wandb_entity:
        wandb_args += ["--wandb-entity", wandb_entity]
    started = time.perf_counter()
    for setup in matrix.setups:
        todo = [c for c in cells if c.setup == setup.name and c.id not in worker.finished_ids(run_dir)]
        if not todo:
            continue
        reason = unavailable(setup)
        if reason:
            print(f"[bench] setup {setup.name} skipped: {reason}", flush=True)
            latest = _latest(run_dir)
            for cell in todo:
                before = latest.get(cell.id, {})
                if (before.get("status"), before.get("reason")) != ("skipped", reason):  # a resume: said already
                    append_record(run_dir, skipped_record(matrix, cell, run_id, reason))
            continue
        _run_launches(matrix, setup, todo, run_dir, run_id, base_config, wandb_args, cache_dir)
    print(f"[bench] matrix finished in {time.perf_counter() - started:.0f} s", flush=True)
    return finish(run_dir, run_id, cells, wandb_mode, wandb_project, wandb_entity)


def _run_launches(matrix: Matrix, setup: SetupSpec, todo: list[Cell], run_dir: Path, run_id: str,
                  base_config: Path | None, wandb_args: list[str], cache_dir: Path | None) -> None:
    """Launch `setup` until its cells are done. A launch that dies is started again; a cell that was
    running at 1 + RELAUNCHES deaths is recorded as failed (it kills its process) and the rest go on.
    A launch that dies before any cell, 1 + RELAUNCHES times, fails the setup's remaining cells."""
    deaths: dict[str, int] = {}
    current = run_dir / "launch" / f"{setup.name}.current"
    while True:
        current.unlink(missing_ok=True)
        code = launch(setup, run_dir, base_config, wandb_args, cache_dir)
        left = [c for c in todo if c.id not in worker.finished_ids(run_dir)]
        if not left:
            return
        culprit = current.read_text().strip() if current.exists() else "(start-up)"
        deaths[culprit] = deaths.get(culprit, 0) + 1
        log = f"see launch/{setup.name}.log"
        if deaths[culprit] <= RELAUNCHES:
            print(f"[bench] launch of setup {setup.name} died in {culprit} (exit code {code}); relaunching to "
                  f"continue with {len(left)} cell(s) left", flush=True)
            continue
        if culprit == "(start-up)" or culprit not in {c.id for c in left}:
            for cell in left:
                append_record(run_dir, failed_record(matrix, cell, run_id,
                                                     f"launch died {deaths[culprit]} times (last exit code {code}); {log}"))
            return
        cell = next(c for c in left if c.id == culprit)
        print(f"[bench] cell {culprit} killed its launch {deaths[culprit]} times; recorded as failed", flush=True)
        append_record(run_dir, failed_record(matrix, cell, run_id, f"the process died while running this cell "
                                                                    f"{deaths[culprit]} times (last exit code {code}); {log}"))


def _forget_failed(run_dir: Path) -> None:
    """Drop failed records so --retry-failed reruns those cells (the file is rewritten atomically)."""
    kept = [r for r in load_records(run_dir) if r["status"] != "failed"]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write_text(results_path(run_dir), text)


def _run_in_process_group(matrix: Matrix, run_dir: Path | None, run_id: str | None, cells: list[Cell],
                          resuming: bool, wandb_mode: str, wandb_project: str, wandb_entity: str | None,
                          cache_dir: Path | None) -> int:
    """Under the user's launcher: one synthetic setup describing this launch; cells run right here.

    run_id None: a new run, `run_dir` the --out given or None; the main process names the run and
    checks the directory, and every process takes its answer (each rank checking for an existing
    plan would race with the main process writing it, and clocks may name different directories).
    """
    from ganlib.distributed import broadcast_object, make_accelerator, shutdown

    accelerator = make_accelerator()
    if run_id is None:
        chosen: tuple[Path, str] | str = ""
        if accelerator.is_main_process:
            try:
                chosen = new_run_dir(matrix, run_dir)
            except UserError as err:
                chosen = str(err)
        chosen = broadcast_object(accelerator, chosen)
        if isinstance(chosen, str):
            shutdown(accelerator)
            raise UserError(chosen)
        run_dir, run_id = chosen
    name = (f"launch-{accelerator.num_processes}x{accelerator.device.type}-{accelerator.mixed_precision}")
    setup_file = run_dir / "launch" / f"{name}.yaml"
    if accelerator.is_main_process:
        setup_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(setup_file, yaml.safe_dump({"num_processes": accelerator.num_processes,
                                                      "mixed_precision": accelerator.mixed_precision,
                                                      "use_cpu": accelerator.device.type == "cpu"}))
    accelerator.wait_for_everyone()
    if not resuming:
        raw = dict(matrix.raw, setups=[str(setup_file)])
        matrix = parse_matrix(raw, "matrix")
        wanted = {(c.strategy.id, c.pair.id, c.network.id, c.seed) for c in cells}
        cells = [c for c in matrix.cells() if (c.strategy.id, c.pair.id, c.network.id, c.seed) in wanted]
        if accelerator.is_main_process:
            write_plan(run_dir, matrix, run_id, cells)
        accelerator.wait_for_everyone()
    worker.run_setup(accelerator, run_dir, None, wandb_mode, wandb_project, wandb_entity, cache_dir)
    code = 0
    if accelerator.is_main_process:
        code = finish(run_dir, run_id, cells, wandb_mode, wandb_project, wandb_entity)
    shutdown(accelerator)
    return code


def finish(run_dir: Path, run_id: str, cells: list[Cell], wandb_mode: str, wandb_project: str,
           wandb_entity: str | None) -> int:
    """Write the HTML report, mirror the summary to W&B, print the table; the exit code."""
    from bench.report import plot_paths, write_report
    from bench.show import format_table
    from bench.wandb_sink import WandbSink

    records = [r for r in load_records(run_dir) if r["cell_id"] in {c.id for c in cells}]
    report = write_report(run_dir)
    print(format_table(records), flush=True)
    with WandbSink(mode=wandb_mode, project=wandb_project, entity=wandb_entity, dir=run_dir) as sink:
        sink.log_unrun_cells(records)
        sink.log_summary(run_id, records, plot_paths(run_dir), run_dir)
    latest = {r["cell_id"]: r["status"] for r in records}
    failed = sorted(cid for cid, status in latest.items() if status == "failed")
    skipped = sorted(cid for cid, status in latest.items() if status == "skipped")
    print(f"[bench] report: {report}", flush=True)
    print(f"[bench] {len(latest) - len(failed) - len(skipped)} ok, {len(failed)} failed, {len(skipped)} skipped"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
