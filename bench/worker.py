"""The process-group side of `bench run`: runs one setup's cells in sequence inside one launch.

`bench run` starts this with `accelerate launch -m bench.worker --run-dir DIR --setup NAME`. It
skips cells already recorded in DIR/results.jsonl, so a relaunch after a crash continues after
the last finished cell. The main process writes each record (atomically, one line) before it
mirrors the cell to W&B. With `--serve NAME` it is one worker of a pool (bench/scheduler.py) and
runs the cells named on its stdin instead, one per line, until the stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time
from pathlib import Path

from bench.cell import run_cell, skipped_record
from bench.matrix import Cell, Matrix, filter_cells, missing_files, parse_matrix, read_text_file, read_yaml
from bench.outcome import HARNESS_TIMEOUT_S
from bench.results import CONCURRENCY, append_record, latest_per_cell, records_so_far
from bench.rundir import launch_file, matrix_path, plan_path
from bench.wandb_sink import WandbSink
from bench.wandb_target import WandbTarget, add_wandb_arguments
from ganlib.distributed import broadcast_object, make_accelerator, shutdown
from ganlib.errors import UserError, exit_on_user_error

FINISHED = ("ok", "failed")
PARENT_ENV = "GANBENCH_PARENT_PID"  # pid of the `bench run` that launched this worker
DONE_MARK = "[bench-done] "  # a pool worker's line after each recorded cell: the mark, then JSON
READY_MARK = "[bench-ready]"  # a pool worker's line once it has started up and waits for cells


def exit_with_parent(pid: int, poll_s: float = 0.5) -> None:
    """Exit this process as soon as process `pid` (the `bench run` that launched it) is gone.

    torchrun starts each worker in its own session, so killing `bench run`'s process group (or
    the job's) would leave workers running on, racing a later `bench run --resume` for the same
    cells. A daemon thread waits on a pidfd (or polls where pidfds are missing) and hard-exits.
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd on this system: poll
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:
                    pass
                time.sleep(poll_s)
        select.select([fd], [], [])  # readable once the process has exited
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


def load_plan(run_dir: Path) -> tuple[Matrix, dict]:
    """The resolved matrix and the plan (run id, selected cell ids) stored in a run directory."""
    matrix_file, plan_file = matrix_path(run_dir), plan_path(run_dir)
    matrix = parse_matrix(read_yaml(read_text_file(matrix_file, "matrix file"), str(matrix_file)), str(matrix_file))
    try:
        plan = json.loads(plan_file.read_text())
        if not (isinstance(plan, dict) and isinstance(plan.get("cells"), list) and "run_id" in plan):
            raise ValueError("not a plan")
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{plan_file} is corrupt ({type(err).__name__}); "
                        "restore it or start a new run") from None
    return matrix, plan


def record_skips(run_dir: Path, matrix: Matrix, run_id: str, cells: list[Cell], reasons: dict[str, str]) -> list[Cell]:
    """Record each cell of `cells` that has a reason as skipped (once: a resume that finds the same
    reason says nothing new); the cells that have none, to run. Skipped cells are not finished: a
    resume where the hardware or the files are now present runs them."""
    skipped = [c for c in cells if reasons.get(c.id)]
    if skipped:
        latest = {r["cell_id"]: r for r in latest_per_cell(records_so_far(run_dir))}
        for cell in skipped:
            before = latest.get(cell.id, {})
            if (before.get("status"), before.get("reason")) != ("skipped", reasons[cell.id]):
                append_record(run_dir, skipped_record(matrix, cell, run_id, reasons[cell.id]))
        for reason in dict.fromkeys(reasons[c.id] for c in skipped):
            count = sum(reasons[c.id] == reason for c in skipped)
            print(f"[bench] {count} cell(s) skipped: {reason}", flush=True)
    return [c for c in cells if not reasons.get(c.id)]


def finished_ids(run_dir: Path, statuses=FINISHED) -> set[str]:
    """Cell ids whose latest record has one of `statuses`."""
    return {r["cell_id"] for r in latest_per_cell(records_so_far(run_dir)) if r["status"] in statuses}


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def summary(record: dict) -> str:
    """The finished cell in a few words, for the progress lines."""
    m = record["metrics"]
    if record["status"] == "ok":
        speed = m.get("timing/img_per_s")  # None: every step was a warm-up step
        return (f"FID {m.get('quality/fid', float('nan')):.2f}, "
                + (f"{speed:.0f} img/s, " if speed is not None else "img/s not measured, ")
                + f"{m.get('timing/wall_s', 0):.1f} s")
    return f"FAILED: {record['reason']}"


def _mirror(sink: WandbSink, run_dir: Path, record: dict) -> None:
    """Finish the cell's W&B run with its record (once the record is on disk) and its sample grid."""
    samples = run_dir / record["artifacts"]["samples"] if record["artifacts"].get("samples") else None
    sink.log_cell(record, samples if samples and samples.exists() else None)


def _write_pid(run_dir: Path, name: str) -> None:
    path = launch_file(run_dir, name, "pid")
    path.parent.mkdir(exist_ok=True)
    path.write_text(str(os.getpid()))


def run_setup(accelerator, run_dir: Path, setup: str | None, wandb: WandbTarget, shard: str | None = None,
              name: str | None = None, only: str | None = None) -> int:
    """Run the planned cells of `setup` (None: every planned cell) not yet finished; returns how many ran.

    `shard` ("i/n"): only that shard's cells; `only`: only the cells `bench run --resume --only`
    selected (the same filter, after the shard's, as bench.run.resume_plan applies); `name`: the file
    stem of this launch under launch/ (default: the setup's name), distinct per shard when shards
    share a run directory.
    """
    from bench.shard import parse_shard, shard_cells

    matrix, plan = load_plan(run_dir)
    planned = [c for c in matrix.cells() if c.id in set(plan["cells"])]
    planned = filter_cells(shard_cells(matrix, planned, parse_shard(shard) if shard else None), only)
    cells = [c for c in planned if setup is None or c.setup == setup]
    name = name or setup or "external"
    done = broadcast_object(accelerator, finished_ids(run_dir) if accelerator.is_main_process else None)
    todo = [c for c in cells if c.id not in done]
    # files absent here (a checkpoint, a data folder): skipped, as `bench run` does for the pools it starts
    missing = broadcast_object(accelerator, missing_files(matrix, todo) if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        record_skips(run_dir, matrix, plan["run_id"], todo, missing)
    todo = [c for c in todo if c.id not in missing]
    total = len(planned)
    sink = wandb.sink(run_dir, enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        _write_pid(run_dir, name)
    durations: list[float] = []
    for cell in todo:
        finished_before = len(done) + len(durations)
        eta = ""
        if durations:
            eta = f", ETA {_fmt_s(sum(durations) / len(durations) * (total - finished_before))}"
        accelerator.print(f"[bench] cell {finished_before + 1}/{total}: {cell.id}{eta}", flush=True)
        t0 = time.perf_counter()
        if accelerator.is_main_process:  # so `bench run` can tell which cell a dead launch was running
            launch_file(run_dir, name, "current").write_text(cell.id)
        record = run_cell(accelerator, matrix, cell, run_dir, plan["run_id"], sink=sink)
        record["metrics"][CONCURRENCY] = 1  # a launch of its own: multi-process setups run alone
        durations.append(time.perf_counter() - t0)
        if accelerator.is_main_process:
            append_record(run_dir, record)
            print(f"[bench]   {record['status']}: {summary(record)}", flush=True)
            _mirror(sink, run_dir, record)
        accelerator.wait_for_everyone()
    sink.close()
    return len(todo)


def serve(accelerator, run_dir: Path, name: str, concurrency: int, wandb: WandbTarget, lines=None) -> int:
    """Run the cells named in `lines` (default: stdin), one id per line, until they end; one process only.

    First `READY_MARK` once started; after each cell: the record appended to results.jsonl, then `DONE_MARK {"cell", "status",
    "summary"}` on stdout (the pool hands out the next cell), then the W&B mirror. `concurrency` is
    recorded in every record as timing/concurrent_cells.
    """
    matrix, plan = load_plan(run_dir)
    cells = {c.id: c for c in matrix.cells() if c.id in set(plan["cells"])}
    sink = wandb.sink(run_dir)
    _write_pid(run_dir, name)
    print(READY_MARK, flush=True)  # a death before this line is a start-up failure, not the cell's
    ran = 0
    for line in (sys.stdin if lines is None else lines):
        cell = cells[line.strip()]
        record = run_cell(accelerator, matrix, cell, run_dir, plan["run_id"], sink=sink)
        record["metrics"][CONCURRENCY] = concurrency
        append_record(run_dir, record)
        print(DONE_MARK + json.dumps({"cell": cell.id, "status": record["status"], "summary": summary(record)}),
              flush=True)
        _mirror(sink, run_dir, record)
        ran += 1
    sink.close()
    return ran


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run one setup's cells (started by `bench run`)")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory `bench run` planned")
    parser.add_argument("--setup", default=None, help="run this setup's cells (default: every planned cell)")
    add_wandb_arguments(parser, "disabled", "W&B mode")
    parser.add_argument("--name", default=None, help="file stem of this launch under launch/")
    parser.add_argument("--shard", default=None, help="i/n: only that shard's cells")
    parser.add_argument("--only", default=None, help="key=glob,...: only these planned cells (bench run --only)")
    parser.add_argument("--serve", action="store_true", help="a pool worker: run the cell ids read on stdin")
    parser.add_argument("--concurrent-cells", type=int, default=1, help="with --serve: cells sharing the device")
    args = parser.parse_args(argv)
    if os.environ.get(PARENT_ENV):
        exit_with_parent(int(os.environ[PARENT_ENV]))
    accelerator = make_accelerator(timeout_s=HARNESS_TIMEOUT_S)
    if args.serve:
        serve(accelerator, args.run_dir, args.name or args.setup, args.concurrent_cells, WandbTarget.from_args(args))
    else:
        run_setup(accelerator, args.run_dir, args.setup, WandbTarget.from_args(args), args.shard, args.name, args.only)
    shutdown(accelerator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
