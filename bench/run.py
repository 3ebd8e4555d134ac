"""`bench run`: plan the matrix, launch each hardware setup once, survive crashes, report.

The cells of a one-process setup run side by side in a pool of worker launches (bench/scheduler.py;
`--workers 1`: one at a time). A multi-process setup needs the whole machine: it is one `accelerate
launch` of `bench.worker` that runs its cells in sequence, alone, between the pools. A launch that
dies is relaunched once and continues after the last finished cell; cells left after a second
death are recorded as failed. A setup that needs hardware this machine lacks is
recorded as skipped with the reason. Under a user's own `accelerate launch` (several processes,
e.g. a SLURM or multi-node job) the cells run in the current process group instead.
One `bench run` works on a run directory at a time (a lock file), and its workers exit when it
dies, so `bench run --resume DIR` after a killed run never races a leftover worker. With `--shard
i/n` the jobs of one run share the directory: each holds the directory's lock shared and its
shard's lock exclusively, so shards run side by side and a second job for one shard is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from bench.cell import failed_record
from bench.matrix import (Cell, Matrix, SetupSpec, check_data, filter_cells, load_matrix, missing_files,
                          parse_matrix)
from bench.results import append_record, latest_per_cell, load_records
from bench.rundir import (PLAN_FILE, launch_file, launch_name, lock_path, matrix_path, plan_lock_path, plan_path,
                          results_path)
from bench.scheduler import (RELAUNCHES, Pool, PoolOptions, Progress, Slot, echo_to_stdout, pool_shape, pooled,
                             usable_cpus, visible_gpus)
from bench.shard import Shard, cost_share, shard_cells
from bench.wandb_target import WandbTarget
from ganlib.cache import cache_root
from ganlib.checkpoint import atomic_write_text
from ganlib.errors import UserError
from ganlib.preflight import check_writable
from ganlib.pretrain import default_cache_dir, is_complete, source_key

THREADS_KEY = "threads_per_process"  # a setup key of ours (not Accelerate's): OMP/torch threads per process


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What `bench run` is asked besides the matrix: one field per flag of the command line."""

    only: str | None = None              # keep the matching cells: strategy=finetune,pair=mnist5k*,...
    resume: Path | None = None           # continue this run directory (skipping its finished cells)
    retry_failed: bool = False           # with resume: rerun the failed cells too
    out: Path | None = None              # a new run's directory (None: runs/<run id>)
    dry_run: bool = False                # list the cells, run nothing
    wandb: WandbTarget = WandbTarget()   # where the W&B mirror goes
    base_config: Path | None = None      # base Accelerate config that each setup overrides
    cache_dir: Path | None = None        # cache root (None: $GANBENCH_CACHE, else ~/.cache/ganbench)
    workers: int | None = None           # pool size per one-process setup (None: the matrix's, else automatic)
    cells_per_gpu: int | None = None     # one-GPU setups: workers per visible GPU (None: automatic)
    shard: Shard | None = None           # run only this slice of the cells (bench/shard.py)


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
    path = launch_file(run_dir, setup.name, "yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=True))
    return path


def _worker_command(setup: SetupSpec, run_dir: Path, base_config: Path | None, worker_args: list[str],
                    gpu: str | None = None) -> list[str]:
    """`accelerate launch ... -m bench.worker` for `setup` (on GPU `gpu` alone when given)."""
    config = launch_config(setup, run_dir, base_config)
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
            "--main_process_port", str(free_port()), *(["--gpu_ids", gpu] if gpu is not None else []),
            "-m", "bench.worker", "--run-dir", str(run_dir), "--setup", setup.name, *worker_args]


def _worker_env(setup: SetupSpec, threads: int | None = None) -> dict[str, str]:
    """The environment of a worker launch; `threads` overrides the setup's threads per process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[worker.PARENT_ENV] = str(os.getpid())  # the workers exit when this process dies (see worker.py)
    if setup.use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # plain --cpu with several processes silently runs one
    threads = threads or setup.accelerate.get(THREADS_KEY)
    if threads is None and setup.use_cpu and setup.num_processes > 1:
        threads = max(1, (os.cpu_count() or 1) // setup.num_processes)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(setup: SetupSpec, run_dir: Path, options: RunOptions, name: str | None = None) -> int:
    """One `accelerate launch` of the worker for `setup` (the shard's cells only); returns its exit code."""
    name = name or setup.name
    shard = options.shard
    cmd = _worker_command(setup, run_dir, options.base_config, [*options.wandb.cli_args(), "--name", name,
                                                                 *(["--shard", str(shard)] if shard else []),
                                                                 *(["--only", options.only] if options.only else [])])
    env = _worker_env(setup)
    with open(launch_file(run_dir, name, "log"), "ab") as log:
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


def new_run_dir(matrix: Matrix, out: Path | None, shard: Shard | None = None) -> tuple[Path, str]:
    """A new run's directory and id; shards given one --out share it (their plan is joined under a lock)."""
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{matrix.name}"
    if shard is not None and out is None:
        run_id += f"-{shard.label}"  # no shared directory named: each shard its own run
    run_dir = out if out is not None else Path("runs") / run_id
    _refuse_used(run_dir, shard)
    return run_dir, run_id


def _refuse_used(run_dir: Path, shard: Shard | None = None) -> None:
    """A new run needs a directory (or nothing) at `run_dir` that holds no run yet (shards join one)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; give a directory for the run")
    if shard is None and plan_path(run_dir).exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")


def claim_new_run_dir(stack: contextlib.ExitStack, run_dir: Path, shard: Shard | None = None) -> None:
    """Create `run_dir` and lock it for this run (held until `stack` closes) before anything in it is
    read or written. Checked again under the lock: two runs started into one new directory both pass
    the first check; the one that takes the lock second must be refused before it writes anything."""
    _refuse_used(run_dir, shard)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {run_dir}: cannot create the run directory ({err.strerror})") from None
    stack.enter_context(_only_runner(run_dir, shard))
    _refuse_used(run_dir, shard)


def write_plan(run_dir: Path, matrix: Matrix, run_id: str, cells: list[Cell], shards: int | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = {"run_id": run_id, "matrix": matrix.name, "cells": [c.id for c in cells]}
    if shards is not None:
        plan["shards"] = shards  # every job of the run splits the cells into this many
    atomic_write_text(matrix_path(run_dir), yaml.safe_dump(matrix.raw, sort_keys=False))
    atomic_write_text(plan_path(run_dir), json.dumps(plan, indent=1))


def _claim_plan(run_dir: Path, matrix: Matrix, run_id: str, cells: list[Cell], shard: Shard | None) -> str:
    """Write the plan of a new run, or join the plan another shard of the same run wrote; the run id.

    Called with the run directory locked; the plan lock makes the check and the write one step
    for shards starting at the same moment.
    """
    with open(plan_lock_path(run_dir), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if not plan_path(run_dir).exists():
            write_plan(run_dir, matrix, run_id, cells, shard.count if shard else None)
            return run_id
        if shard is None:
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        theirs, plan = worker.load_plan(run_dir)
        if theirs.raw != matrix.raw or plan["cells"] != [c.id for c in cells] or plan.get("shards") != shard.count:
            split = f"split into {plan['shards']} shards" if plan.get("shards") else "not sharded"
            raise UserError(f"--shard {shard}: {run_dir} holds another run ({split}, {len(plan['cells'])} cells of "
                            f"matrix {plan['matrix']!r}); give every shard the same matrix, --only and n, or "
                            "another --out")
        return plan["run_id"]


def resume_plan(run_dir: Path, matrix_ref: str | None, only: str | None,
                shard: Shard | None = None) -> tuple[Matrix, str, list[Cell]]:
    """Matrix, run id and planned cells (of `shard`) of an existing run directory (refusing another matrix)."""
    if not plan_path(run_dir).exists():
        raise UserError(f"--resume {run_dir}: not a bench run directory (no {PLAN_FILE})")
    matrix, plan = worker.load_plan(run_dir)
    if matrix_ref is not None and load_matrix(matrix_ref).raw != matrix.raw:
        raise UserError(f"--resume {run_dir}: that run used a different matrix than {matrix_ref}; "
                        "resume without a matrix argument or start a new run")
    cells = [c for c in matrix.cells() if c.id in set(plan["cells"])]
    if shard is not None and plan.get("shards", shard.count) != shard.count:
        raise UserError(f"--resume {run_dir} --shard {shard}: that run is split into {plan['shards']} shards; "
                        f"resume with --shard i/{plan['shards']}")
    cells = shard_cells(matrix, cells, shard)  # the split of the whole plan, as when the run began
    if only:
        cells = filter_cells(cells, only)
    return matrix, plan["run_id"], cells


def _check(options: RunOptions) -> None:
    """Refuse the combinations of options that cannot work, before anything is read or written."""
    if options.retry_failed and options.resume is None:
        raise UserError("--retry-failed reruns the failed cells of an earlier run: give it with --resume DIR")
    if options.retry_failed and options.shard is not None:
        raise UserError(f"--retry-failed with --shard {options.shard}: rewriting results.jsonl would race the "
                        "other shards; after they end, run `bench run --resume DIR --retry-failed` once")
    if options.shard is not None and external_launch():
        raise UserError(f"--shard {options.shard} under your own launcher: start `bench run --shard` without it on "
                        "each node (bench launches every setup itself; see docs/cluster.md)")
    if options.base_config is not None and not options.base_config.is_file():
        raise UserError(f"--accelerate-config {options.base_config}: no such file")


def run_matrix(matrix_ref: str | None, options: RunOptions = RunOptions()) -> int:
    """Run (or resume) a matrix (a preset name, a YAML file, None: the default preset; None with
    `options.resume`: the run's own); returns the exit code: 0 every cell ok or skipped, 1 any failed."""
    _check(options)
    resume, shard = options.resume, options.shard
    if options.cache_dir is not None:  # the one way the cache root travels: this process and every launch read it
        os.environ["GANBENCH_CACHE"] = str(options.cache_dir)
    held = contextlib.ExitStack()  # this process's lock on the run directory, taken before it is read or written
    if resume is not None:
        if not resume.is_dir():
            raise UserError(f"--resume {resume}: not a bench run directory (no such directory)")
        if not options.dry_run and not external_launch():
            held.enter_context(_only_runner(resume, shard))
        matrix, run_id, cells = resume_plan(resume, matrix_ref, options.only, shard)
        run_dir, planned = resume, cells
    else:
        matrix = load_matrix(matrix_ref)
        planned = filter_cells(matrix.cells(), options.only)
        cells = shard_cells(matrix, planned, shard)
        if external_launch() and not options.dry_run:
            run_dir, run_id = options.out, None  # named by the main process alone (_run_in_process_group)
        else:
            run_dir, run_id = new_run_dir(matrix, options.out, shard)
    pool = PoolOptions(options.workers, options.cells_per_gpu).validate(
        [matrix.setup(n) for n in dict.fromkeys(c.setup for c in planned)])
    if pool.workers is None:
        pool = PoolOptions(matrix.workers, pool.cells_per_gpu)
    missing = missing_files(matrix, cells)  # skipped, with how to get the files; the rest run
    check_data(matrix, missing)  # a dry run too: n larger than a class, a folder too small to score
    if options.dry_run:
        _print_plan(matrix, cells, planned, shard, missing)
        return 0
    check_writable(cache_root(), "cache directory", "set GANBENCH_CACHE or --cache-dir to a writable one")
    if external_launch():
        return _run_in_process_group(matrix, run_dir, run_id, cells, resume is not None, options.wandb, options.only)
    if resume is None:
        claim_new_run_dir(held, run_dir, shard)
        run_id = _claim_plan(run_dir, matrix, run_id, planned, shard)
    with held:
        if options.retry_failed:
            _forget_failed(run_dir)
        try:
            return _run_setups(matrix, run_dir, run_id, cells, options, pool)
        except KeyboardInterrupt:  # the workers are stopped; every record written so far is whole
            again = f"bench run --resume {run_dir}" + (f" --shard {shard}" if shard else "")
            print(f"\n[bench] interrupted: finished cells are in {results_path(run_dir)}; continue with `{again}`",
                  file=sys.stderr, flush=True)
            return 130


def _print_plan(matrix: Matrix, cells: list[Cell], planned: list[Cell], shard: Shard | None,
                missing: dict[str, str]) -> None:
    """`--dry-run`: the cells that would run (of `shard`, out of `planned`), each skipped one's reason."""
    part = (f"shard {shard}: {len(cells)} of {len(planned)} cell(s), "
            f"{cost_share(matrix, cells, planned):.0%} of the expected cost, " if shard else f"{len(cells)} cell(s) ")
    source = f"source {matrix.source_steps} steps" if matrix.source_steps else "sources from checkpoints"
    print(f"{part}of matrix {matrix.name!r} ({source}, transfer {matrix.transfer_steps} steps):")
    notes: dict[str, int] = {}  # long reasons (missing files with their fetch commands), said once below
    for i, cell in enumerate(cells, 1):
        reason = unavailable(matrix.setup(cell.setup)) or missing.get(cell.id)
        if reason and len(reason) > 100:
            reason = f"({notes.setdefault(reason, len(notes) + 1)}) below"
        print(f"  {i:3d}. {cell.id}" + (f"   [skipped: {reason}]" if reason else ""))
    for reason, k in notes.items():
        print(f"({k}) {reason}")


@contextlib.contextmanager
def _only_runner(run_dir: Path, shard: Shard | None = None) -> Iterator[None]:
    """Lock the run directory: two `bench run`s on one directory (or one shard) would run cells twice.

    Unsharded: the directory's lock, exclusively. A shard: the directory's lock shared (the other
    shards of the run hold it too; an unsharded run is refused) and its shard's lock exclusively.
    """
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(open(lock_path(run_dir), "a"))
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shard else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `bench run` is using {run_dir}; wait for it to end or stop it first") from None
        if shard is not None:
            mine = stack.enter_context(open(lock_path(run_dir, shard.label), "a"))
            try:
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another `bench run` is running shard {shard} of {run_dir}; wait for it to end "
                                "or stop it first") from None
        yield  # the locks go with the files' closing


def _run_setups(matrix: Matrix, run_dir: Path, run_id: str, cells: list[Cell], options: RunOptions,
                pool: PoolOptions = PoolOptions()) -> int:
    """Setup by setup: a pool for a one-process setup, one launch (relaunched once after a death) for a
    multi-process one, skipped setups recorded; the exit code."""
    shard = options.shard
    what = f"shard {shard} of run {run_id}" if shard else f"run {run_id}"
    print(f"[bench] {what}: {len(cells)} cell(s) -> {run_dir}", flush=True)
    started = time.perf_counter()
    progress = Progress(len(cells), len({c.id for c in cells} & worker.finished_ids(run_dir)))
    for setup in matrix.setups:
        todo = [c for c in cells if c.setup == setup.name and c.id not in worker.finished_ids(run_dir)]
        if not todo:
            continue
        reason = unavailable(setup)  # the hardware first: a GPU setup on a CPU machine is skipped whatever files it has
        reasons = {c.id: reason for c in todo} if reason else missing_files(matrix, todo)
        todo = worker.record_skips(run_dir, matrix, run_id, todo, reasons)
        if not todo:
            continue
        if pooled(setup):
            _run_pool(matrix, setup, todo, run_dir, run_id, options, pool, progress)
        else:
            _run_launches(matrix, setup, todo, run_dir, run_id, options)
            progress.done += len(todo)
    print(f"[bench] matrix finished in {time.perf_counter() - started:.0f} s", flush=True)
    return finish(run_dir, run_id, cells, options.wandb)


def _run_pool(matrix: Matrix, setup: SetupSpec, todo: list[Cell], run_dir: Path, run_id: str,
              options: RunOptions, pool: PoolOptions, progress: Progress) -> None:
    """The cells of a one-process setup on a pool of workers (bench/scheduler.py)."""
    shape = pool_shape(setup, pool, setup.accelerate.get(THREADS_KEY), usable_cpus(),
                       [] if setup.use_cpu else visible_gpus())
    shard = options.shard
    if shard is not None:  # shards sharing the directory: a file stem each under launch/
        shape = dataclasses.replace(shape, slots=tuple(dataclasses.replace(s, name=f"{s.name}.{shard.label}")
                                                       for s in shape.slots))
    device = "the CPU" if setup.use_cpu else "each GPU"
    print(f"[bench] setup {setup.name}: {len(todo)} cell(s) on {len(shape.slots)} worker(s), up to "
          f"{shape.per_device} cell(s) sharing {device}", flush=True)

    def start(slot: Slot) -> subprocess.Popen:
        args = [*options.wandb.cli_args(), "--serve", "--name", slot.name, "--concurrent-cells", str(shape.per_device)]
        return subprocess.Popen(_worker_command(setup, run_dir, options.base_config, args, slot.gpu),
                                env=_worker_env(setup, slot.threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def echo(text: str) -> None:
        if not _noise(text):
            echo_to_stdout(text)

    def source_ready(cell: Cell) -> bool:
        key = source_key(matrix.source_config(cell), 1, setup.mixed_precision)
        return is_complete(default_cache_dir() / key)

    Pool(matrix, run_dir, run_id, shape, start, progress, echo, source_ready).run(todo)


def _run_launches(matrix: Matrix, setup: SetupSpec, todo: list[Cell], run_dir: Path, run_id: str,
                  options: RunOptions) -> None:
    """Launch `setup` until its cells are done. A launch that dies is started again; a cell that was
    running at 1 + RELAUNCHES deaths is recorded as failed (it kills its process) and the rest go on.
    A launch that dies before any cell, 1 + RELAUNCHES times, fails the setup's remaining cells."""
    deaths: dict[str, int] = {}
    shard = options.shard
    name = setup.name + (f".{shard.label}" if shard else "")  # shards sharing the directory: a stem each
    current = launch_file(run_dir, name, "current")
    while True:
        current.unlink(missing_ok=True)
        code = launch(setup, run_dir, options, name)
        left = [c for c in todo if c.id not in worker.finished_ids(run_dir)]
        if not left:
            return
        culprit = current.read_text().strip() if current.exists() else "(start-up)"
        deaths[culprit] = deaths.get(culprit, 0) + 1
        log = f"see {launch_name(name, 'log')}"
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
                          resuming: bool, wandb: WandbTarget, only: str | None = None) -> int:
    """Under the user's launcher: the cells run right here, as cells of one setup that describes this launch.

    run_id None: a new run, `run_dir` the --out given or None (see `_agree_on_new_run`).
    """
    from bench.outcome import HARNESS_TIMEOUT_S
    from ganlib.distributed import make_accelerator, shutdown

    accelerator = make_accelerator(timeout_s=HARNESS_TIMEOUT_S)
    stack = contextlib.ExitStack()  # the main process's lock on the run directory, for the whole run
    if run_id is None:
        run_dir, run_id = _agree_on_new_run(accelerator, stack, matrix, run_dir)
    setup_file = _describe_launch(accelerator, run_dir)
    if not resuming:  # the plan's cells are the matrix's cells on this launch's setup
        matrix = parse_matrix(dict(matrix.raw, setups=[str(setup_file)]), "matrix")
        wanted = {(c.strategy.id, c.pair.id, c.network.id, c.seed) for c in cells}
        cells = [c for c in matrix.cells() if (c.strategy.id, c.pair.id, c.network.id, c.seed) in wanted]
        if accelerator.is_main_process:
            write_plan(run_dir, matrix, run_id, cells)
        accelerator.wait_for_everyone()
    worker.run_setup(accelerator, run_dir, None, wandb, only=only if resuming else None)  # a new plan holds only them
    code = 0
    with stack:
        if accelerator.is_main_process:
            code = finish(run_dir, run_id, cells, wandb)
    shutdown(accelerator)
    return code


def _agree_on_new_run(accelerator, stack: contextlib.ExitStack, matrix: Matrix, out: Path | None) -> tuple[Path, str]:
    """The new run's directory and id, named and locked (held by `stack`) by the main process alone; every
    process takes its answer (each rank checking for an existing plan would race with the main process
    writing it, and clocks may name different directories). A refusal is a UserError on every process."""
    from ganlib.distributed import broadcast_object, shutdown

    chosen: tuple[Path, str] | str = ""
    if accelerator.is_main_process:
        try:
            chosen = new_run_dir(matrix, out)
            claim_new_run_dir(stack, chosen[0])
        except UserError as err:
            chosen = str(err)
    chosen = broadcast_object(accelerator, chosen)
    if isinstance(chosen, str):
        shutdown(accelerator)
        raise UserError(chosen)
    return chosen


def _describe_launch(accelerator, run_dir: Path) -> Path:
    """This launch as a setup file, launch/launch-<N>x<device>-<precision>.yaml. A file, not a setup held in
    memory: the plan's matrix names it, so the worker loop and a later `--resume` read the same setup back."""
    name = f"launch-{accelerator.num_processes}x{accelerator.device.type}-{accelerator.mixed_precision}"
    setup_file = launch_file(run_dir, name, "yaml")
    if accelerator.is_main_process:
        setup_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(setup_file, yaml.safe_dump({"num_processes": accelerator.num_processes,
                                                      "mixed_precision": accelerator.mixed_precision,
                                                      "use_cpu": accelerator.device.type == "cpu"}))
    accelerator.wait_for_everyone()
    return setup_file


def finish(run_dir: Path, run_id: str, cells: list[Cell], wandb: WandbTarget) -> int:
    """Write the HTML report (of every record in the directory), mirror the summary to W&B, print the
    table of `cells`; the exit code (of `cells`)."""
    from bench.report import plot_paths, write_report
    from bench.show import format_table

    records = [r for r in load_records(run_dir) if r["cell_id"] in {c.id for c in cells}]
    with open(plan_lock_path(run_dir), "a") as handle:  # shards ending together: one report writer at a time
        fcntl.flock(handle, fcntl.LOCK_EX)
        report = write_report(run_dir)
    print(format_table(records), flush=True)
    with wandb.sink(run_dir) as sink:
        sink.log_unrun_cells(records)
        sink.log_summary(run_id, records, plot_paths(run_dir), run_dir)
    latest = {r["cell_id"]: r["status"] for r in latest_per_cell(records)}
    failed = sorted(cid for cid, status in latest.items() if status == "failed")
    skipped = sorted(cid for cid, status in latest.items() if status == "skipped")
    print(f"[bench] report: {report}", flush=True)
    print(f"[bench] {len(latest) - len(failed) - len(skipped)} ok, {len(failed)} failed, {len(skipped)} skipped"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0
