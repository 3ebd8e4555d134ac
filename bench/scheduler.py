"""A pool of worker launches that runs the cells of a one-process setup side by side.

Each worker is one `accelerate launch` of `bench.worker --serve`: it reads cell ids on its stdin, one
per line, runs each cell, appends the record to results.jsonl (one locked O_APPEND write, so records
of concurrent workers never tear) and prints a done line. This process (`bench run`) hands out the
cells one at a time as workers come free, so a slow cell never holds up a queue behind it.

Sizing: CPU setups get cores / threads_per_process workers, one-GPU setups one worker per visible
GPU times --cells-per-gpu (each worker sees only its own GPU); --workers N overrides both.

Sources: a cell whose source is neither cached nor free (another running cell of this pool needs
the same source) waits while other cells run; when nothing else is left it is handed out and waits
on the cache lock (ganlib.pretrain), so a source is never trained twice.

Deaths: a worker that dies mid-cell is started again and the cell goes back to the queue; a cell
that killed its worker 1 + RELAUNCHES times is recorded as failed and the pool goes on. A worker
slot whose worker dies starting up (before its ready line) 1 + RELAUNCHES times is retired; with
every slot retired the cells left are recorded as failed. Ctrl-C stops every worker; finished records stay whole.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.cell import failed_record
from bench.matrix import Cell, Matrix, SetupSpec
from bench.results import append_record
from bench.rundir import launch_file, launch_name
from bench.shard import source_group
from bench.worker import DONE_MARK, READY_MARK, finished_ids
from ganlib.errors import UserError

RELAUNCHES = 1  # a worker that dies is started again this many times per cell (and per slot at start-up)


@dataclass(frozen=True)
class PoolOptions:
    """How the user sized the pools (None: automatic)."""

    workers: int | None = None        # workers per pool; 1 = one cell at a time, as a serial run
    cells_per_gpu: int | None = None  # one-GPU setups: workers per visible GPU (default 1)

    def validate(self, setups: list[SetupSpec]) -> "PoolOptions":
        """Refuse bad sizes; `setups` are those the run will launch (--cells-per-gpu needs a GPU one)."""
        for flag, value in (("--workers", self.workers), ("--cells-per-gpu", self.cells_per_gpu)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"{flag} {value}: expected a whole number >= 1")
        if self.cells_per_gpu is not None and not any(pooled(s) and not s.use_cpu for s in setups):
            names = ", ".join(s.name for s in setups) or "none"
            raise UserError(f"--cells-per-gpu {self.cells_per_gpu}: no one-GPU setup among the cells to run "
                            f"(setups: {names}); it packs cells onto GPUs, use --workers N to size a CPU pool")
        return self


@dataclass(frozen=True)
class Slot:
    """One worker of a pool: its file stem under launch/, the GPU it sees, its thread count."""

    name: str               # "cpu-1proc" for the first worker, then "cpu-1proc.w1", ...
    gpu: str | None = None  # the one visible GPU (Accelerate's --gpu_ids); None on the CPU
    threads: int | None = None  # OMP/torch threads; None: the setup's default


@dataclass(frozen=True)
class PoolShape:
    slots: tuple[Slot, ...]
    per_device: int  # the most cells that share one device: every record's `timing/concurrent_cells`


def pooled(setup: SetupSpec) -> bool:
    """Whether `setup`'s cells run in a pool (one process on one machine); others run alone."""
    return setup.num_processes == 1 and setup.num_machines == 1


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM or taskset mask counts, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPU ids this process sees, as CUDA_VISIBLE_DEVICES names them (indices when it is unset)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def pool_shape(setup: SetupSpec, options: PoolOptions, threads_per_process: int | None,
               cpus: int, gpus: list[str]) -> PoolShape:
    """The workers of `setup`'s pool on a machine with `cpus` usable cores and `gpus` visible GPUs."""
    stem = lambda k: setup.name if k == 0 else f"{setup.name}.w{k}"
    if setup.use_cpu:
        per_worker = threads_per_process or cpus
        count = options.workers or max(1, cpus // per_worker)
        threads = threads_per_process or (max(1, cpus // count) if count > 1 else None)
        return PoolShape(tuple(Slot(stem(k), None, threads) for k in range(count)), count)
    if not gpus:
        raise UserError(f"setup {setup.name} needs a GPU and none is visible")
    count = options.workers or len(gpus) * (options.cells_per_gpu or 1)
    threads = threads_per_process or max(1, cpus // count)  # host threads shared by the GPU workers
    slots = tuple(Slot(stem(k), gpus[k % len(gpus)], threads) for k in range(count))
    return PoolShape(slots, math.ceil(count / len(gpus)))


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One line per finished cell: its place in the run, its result, how many run, an ETA for the pool."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self.durations: list[float] = []

    def eta(self, running_for: list[float], workers: int) -> float | None:
        """Seconds left: cells not started at the mean cell time, running ones for what they have left,
        spread over `workers` (later setups are assumed to cost about the same)."""
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        waiting = max(0, self.total - self.done - len(running_for))
        return (waiting * mean + sum(max(0.0, mean - t) for t in running_for)) / max(1, workers)

    def finished(self, cell_id: str, status: str, summary: str, seconds: float, running_for: list[float],
                 workers: int) -> str:
        self.done += 1
        self.durations.append(seconds)
        eta = self.eta(running_for, workers)
        tail = f"{len(running_for)} running" + (f", ETA {_fmt_s(eta)}" if eta is not None else "")
        return f"[bench] cell {self.done}/{self.total} {status}: {cell_id}: {summary}  [{tail}]"


@dataclass
class _Worker:
    slot: Slot
    proc: subprocess.Popen
    log: object
    buffer: bytes = b""
    ready: bool = False  # it said it has started up (cells are sent to ready workers only)
    cell: Cell | None = None
    started: float = 0.0
    closing: bool = False  # its stdin is closed: it exits once its cell (if any) is done


class Pool:
    """Runs a list of cells on the workers of one setup's pool (see the module docstring)."""

    def __init__(self, matrix: Matrix, run_dir: Path, run_id: str, shape: PoolShape,
                 start: Callable[[Slot], subprocess.Popen], progress: Progress,
                 echo: Callable[[str], None], source_ready: Callable[[Cell], bool]):
        self.matrix, self.run_dir, self.run_id, self.shape = matrix, run_dir, run_id, shape
        self.start, self.progress, self.echo, self.source_ready = start, progress, echo, source_ready
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.queue: list[Cell] = []
        self.deaths: dict[str, int] = {}
        self.slot_deaths: dict[str, int] = {}
        self.last_death = ""

    def run(self, cells: list[Cell]) -> None:
        """Run `cells` (in order, as workers come free) until each is recorded or given up."""
        self.queue = list(cells)
        for slot in self.shape.slots[:len(self.queue)]:
            self._launch(slot)
        try:
            while self.workers:
                self._dispatch()
                for key, _ in self.selector.select(timeout=1.0):
                    self._read(key.data)
        except BaseException:  # Ctrl-C (or a bug here): no worker may outlive this process's pool
            self._stop_all()
            raise
        for cell in self.queue:  # every slot retired at start-up
            append_record(self.run_dir, failed_record(self.matrix, cell, self.run_id, self.last_death))
            self.progress.done += 1
            self.echo(f"[bench] cell {cell.id}: FAILED: {self.last_death}\n")
        self.queue = []

    # --- workers --------------------------------------------------------------------------------

    def _launch(self, slot: Slot) -> None:
        proc = self.start(slot)
        path = launch_file(self.run_dir, slot.name, "log")
        path.parent.mkdir(exist_ok=True)
        log = open(path, "ab")
        worker = _Worker(slot, proc, log)
        self.workers.append(worker)
        self.selector.register(proc.stdout, selectors.EVENT_READ, worker)

    def _send(self, worker: _Worker, line: str) -> None:
        try:
            worker.proc.stdin.write(line.encode())
            worker.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it died: its output ends soon and _exited handles it
            pass

    def _close(self, worker: _Worker) -> None:
        worker.closing = True
        try:
            worker.proc.stdin.close()
        except BrokenPipeError:
            pass

    def _next_cell(self) -> Cell | None:
        """The first queued cell whose source is cached or not being trained by a running cell."""
        busy = {source_group(w.cell) for w in self.workers if w.cell is not None}
        for i, cell in enumerate(self.queue):
            group = source_group(cell)
            if group is None or group not in busy or self.source_ready(cell):
                return self.queue.pop(i)
        return None

    def _dispatch(self) -> None:
        for worker in self.workers:
            if not worker.ready or worker.cell is not None or worker.closing:
                continue
            if not self.queue:
                self._close(worker)
                continue
            cell = self._next_cell()
            if cell is None:
                return  # every queued cell waits for a source a running cell is training
            worker.cell, worker.started = cell, time.perf_counter()
            self._send(worker, cell.id + "\n")

    def _read(self, worker: _Worker) -> None:
        data = os.read(worker.proc.stdout.fileno(), 1 << 16)
        if not data:
            self._exited(worker)
            return
        worker.buffer += data
        while b"\n" in worker.buffer:
            raw, worker.buffer = worker.buffer.split(b"\n", 1)
            worker.log.write(raw + b"\n")
            worker.log.flush()
            text = raw.decode(errors="replace")
            if text == READY_MARK:
                worker.ready = True
            elif text.startswith(DONE_MARK):
                self._done(worker, json.loads(text[len(DONE_MARK):]))
            else:
                self.echo(text + "\n")

    def _done(self, worker: _Worker, news: dict) -> None:
        cell, worker.cell = worker.cell, None
        if cell is None or news.get("cell") != cell.id:  # a protocol bug, not a user mistake
            raise RuntimeError(f"worker {worker.slot.name} reported {news.get('cell')!r}, was sent "
                               f"{cell.id if cell else None!r}")
        now = time.perf_counter()
        running = [now - w.started for w in self.workers if w.cell is not None]
        self.echo(self.progress.finished(cell.id, news["status"], news["summary"], now - worker.started, running,
                                         len(self.shape.slots)) + "\n")

    def _exited(self, worker: _Worker) -> None:
        self.selector.unregister(worker.proc.stdout)
        worker.proc.stdout.close()
        code = worker.proc.wait()
        worker.log.close()
        self.workers.remove(worker)
        log = f"see {launch_name(worker.slot.name, 'log')}"
        cell = worker.cell
        if cell is None:
            if worker.closing and code == 0:
                return  # done: its stdin was closed and it ended cleanly
            if not worker.ready:  # died starting up
                self.slot_deaths[worker.slot.name] = self.slot_deaths.get(worker.slot.name, 0) + 1
            deaths = self.slot_deaths.get(worker.slot.name, 0)
            self.last_death = f"launch died {deaths} times (last exit code {code}); {log}"
            if self.queue and deaths <= RELAUNCHES:
                self.echo(f"[bench] worker {worker.slot.name} died (exit code {code}); starting it again\n")
                self._launch(worker.slot)
            elif self.queue:
                self.echo(f"[bench] worker {worker.slot.name} died {deaths} times before a cell; not started "
                          f"again ({log})\n")
            return
        if cell.id in finished_ids(self.run_dir):  # died after writing its record
            self.progress.done += 1
        else:
            self.deaths[cell.id] = self.deaths.get(cell.id, 0) + 1
            deaths = self.deaths[cell.id]
            if deaths <= RELAUNCHES:
                self.echo(f"[bench] worker {worker.slot.name} died in {cell.id} (exit code {code}); relaunching "
                          f"to run it again\n")
                self.queue.insert(0, cell)
            else:
                reason = (f"the process died while running this cell {deaths} times (last exit code {code}); "
                          f"{log}")
                append_record(self.run_dir, failed_record(self.matrix, cell, self.run_id, reason))
                self.progress.done += 1
                self.echo(f"[bench] cell {cell.id} killed its worker {deaths} times; recorded as failed\n")
        if self.queue:
            self._launch(worker.slot)

    def _stop_all(self) -> None:
        for worker in self.workers:
            try:
                os.killpg(worker.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()
            worker.log.close()
        self.workers = []


def echo_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
