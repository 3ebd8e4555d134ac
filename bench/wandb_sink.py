"""W&B as a sink: a live run per cell as it trains, and a summary run per matrix run.

The local `results.jsonl` is the record. Callers write a cell's record and artifacts to disk
*before* finishing its W&B run, so nothing W&B does can lose a result. Every W&B call is guarded:
any exception (import, init, log, finish, timeout) prints one warning line and disables the
sink for the rest of the run, so W&B being down, slow or misconfigured never fails or stalls
a benchmark. `wandb` is imported lazily; construct the sink on the main process only (on any
other rank it disables itself).

Layout in W&B: one run per cell (group = run_id, job_type = strategy, name = cell_id, tags
[pair, setup, network]) and one `summary` run per matrix run with a table of every cell and
the report's plots. Run ids are fixed by (run id, cell id) and opened with resume="allow", so a
relaunch or `bench run --resume` continues the same W&B runs. History rows carry `train/step`
(the x axis, declared with define_metric): a cell rerun after a crash starts again at step 0,
which W&B's own `_step` would drop. Config keys that look like credentials are redacted.

The caller's order (main process):
    live = sink.start_cell(record_head)                   # cell starts: run opened, stats sampled
    train(..., log_fn=live.log_row)                       # losses, FID curve, sample grids, live
    append_record(run_dir, record)                        # the record is on disk
    sink.log_cell(record, run_dir / record["artifacts"]["samples"])   # summary, exit code, finish
    ...
    write_report(run_dir)                                 # report + plots/*.png
    sink.log_unrun_cells(records)                         # skipped / never-started cells, with reasons
    sink.log_summary(run_id, load_records(run_dir), plot_paths(run_dir))
    sink.close()                                          # prints `wandb sync ...` if offline

Offline runs: wandb-core flushes `run-*.wandb` in 32 KiB blocks and at `finish()`; while a run is
open, its history is read back with `sampled_history` (see tests/test_wandb_sink.py).
"""

from __future__ import annotations

import hashlib
import netrc
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable

from ganlib.errors import UserError
from bench.export import STATE_FIELDS, flat_table
from bench.results import IDENTITY_FIELDS, flat_value, latest_per_cell

MODES = ("auto", "online", "offline", "disabled")
# A credential's name has one of these words as a whole word (snake_case, kebab-case or camelCase):
# `API_KEY`, `accessToken`, `apikey`, but not `monkey_patch` or `tokenizer`.
SECRET_WORD = re.compile(r"(?:^|[^a-z0-9])(?:api_?key|keys?|tokens?|secrets?|passwords?|passwd|credentials?)"
                         r"(?:$|[^a-z0-9])")
REDACTED = "[redacted]"
DEFAULT_HOST = "api.wandb.ai"
INIT_TIMEOUT_S = 30.0    # how long wandb.init may wait for the backend / server
FINISH_TIMEOUT_S = 60.0  # how long finish may wait for uploads before giving up on them
STEP_KEY = "train/step"  # the x axis of every history row (W&B's own _step only counts log calls)
FAILED_EXIT_CODE = 1     # a failed cell's run ends with this exit code (W&B shows it as failed)


def wandb_run_id(run_id: str, name: str) -> str:
    """The W&B run id of cell `name` (or "summary") of bench run `run_id`: the same on every relaunch.

    A hash, because W&B ids allow only [A-Za-z0-9_-] and 64 characters; the cell id is the run's name.
    """
    return hashlib.sha256(f"{run_id}\0{name}".encode()).hexdigest()[:20]


def exit_code(record: dict) -> int:
    """0 for ok and skipped cells, FAILED_EXIT_CODE for failed ones."""
    return FAILED_EXIT_CODE if record.get("status") == "failed" else 0


def is_secret_name(name: str) -> bool:
    """Whether a config key names a credential (see SECRET_WORD); camelCase humps count as words."""
    return SECRET_WORD.search(re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()) is not None


def scrub(obj):
    """A copy of `obj` with the value of every key that names a credential (key, token, secret,
    password as a word) redacted."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def has_credentials(host: str | None = None) -> bool:
    """True when W&B credentials exist locally (env or netrc); never touches the network.

    Checks WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, then a netrc entry (NETRC or ~/.netrc)
    for the W&B host (WANDB_BASE_URL's host, default api.wandb.ai).
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if host is None:
        base = os.environ.get("WANDB_BASE_URL", "")
        host = base.split("://", 1)[-1].split("/", 1)[0] or DEFAULT_HOST
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str) -> str:
    """Concrete mode for `auto`: WANDB_MODE if set, else online with credentials, else offline."""
    if mode not in MODES:
        raise UserError(f"W&B mode {mode!r} is not one of {', '.join(MODES)}: pick one of those")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    return "online" if has_credentials() else "offline"


class LiveCell:
    """The open W&B run of one cell while it trains; every method is guarded by the sink.

    `log_row` is the training loop's log hook (ganlib.train.LogFn); `log_samples` sends a sample
    grid. Rows carry `train/step` and `timing/cell_wall_s` (seconds since the cell started).
    """

    def __init__(self, sink: "WandbSink", wandb, run, cell_id: str):
        self.sink, self.wandb, self.run, self.cell_id = sink, wandb, run, cell_id
        self.started = time.perf_counter()
        self.last_step = 0

    def _log(self, step: int, values) -> None:
        """Log `values` (a dict, or a function making one: its failure is W&B's too) at `step`."""
        def log():
            row = values() if callable(values) else values
            self.last_step = max(self.last_step, int(step))
            self.run.log({STEP_KEY: int(step), "timing/cell_wall_s": time.perf_counter() - self.started, **row})

        self.sink._guarded(f"cell {self.cell_id}", log, count=False)

    def log_row(self, curve: str, row: dict) -> None:
        """One row of the training loop's curves: `train` (losses) or `fid` (FID at an evaluation)."""
        if not self.sink.enabled:
            return
        values = {k: flat_value(v) for k, v in row.items() if k != "step"}
        if curve == "fid":  # the same keys as a finished cell's history (`curve/...`)
            values = {"curve/fid": values.get("fid"), "curve/fid_wall_s": values.get("wall_s")}
        self._log(row["step"], values)

    def log_samples(self, step: int, make_grid) -> None:
        """The sample grid at an evaluation. `make_grid()` returns a float tensor (3, H, W) in [0, 1];
        it runs only while the sink is on, and inside its guard, so it can never fail the cell."""
        if not self.sink.enabled:
            return

        def values():
            grid = (make_grid().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            return {"samples": self.wandb.Image(grid, caption=f"{self.cell_id} step {step}")}

        self._log(step, values)


class WandbSink:
    """Mirror cells and run summaries into W&B; every failure turns into one warning line.

    Args:
        mode:    "auto" (online with credentials, else offline), "online", "offline" or
                 "disabled" (writes nothing at all, not even a wandb directory).
        project: W&B project name.
        entity:  W&B entity (team/user); None uses the account default.
        dir:     where W&B keeps its local files (`<dir>/wandb/...`); normally the run dir.
    """

    def __init__(self, mode: str = "auto", project: str = "ganbench", entity: str | None = None,
                 dir: str | os.PathLike | None = None, init_timeout_s: float = INIT_TIMEOUT_S,
                 finish_timeout_s: float = FINISH_TIMEOUT_S):
        self.requested_mode = mode
        self.mode = resolve_mode(mode)
        if os.environ.get("RANK", "0") not in ("", "0"):
            self.mode = "disabled"  # only the main process talks to W&B
        self.project = project
        self.entity = entity
        self.dir = Path(dir) if dir is not None else Path.cwd()
        self.init_timeout_s = init_timeout_s
        self.finish_timeout_s = finish_timeout_s
        self.enabled = self.mode != "disabled"
        self.runs_logged = 0
        self.warning: str | None = None  # the warning that disabled the sink, if any
        self.live: LiveCell | None = None  # the cell run open now (one at a time per process)

    # --- public API -------------------------------------------------------------------------

    def start_cell(self, record: dict) -> LiveCell | None:
        """Open the W&B run of a cell that is starting, with system metrics on; None when off.

        `record` needs the identity fields, `config` and `env` (run_cell's record before training).
        """
        if not self.enabled:
            return None
        opened: list[LiveCell] = []

        def start():
            wandb, run = self._init(stats=True, **self._cell_init_kwargs(record))
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
            opened.append(LiveCell(self, wandb, run, record.get("cell_id")))

        if not self._guarded(f"cell {record.get('cell_id')}", start, count=False):
            return None
        self.live = opened[0]
        return self.live

    def log_cell(self, record: dict, sample_png_path: str | os.PathLike | None = None) -> bool:
        """Finish the W&B run of a finished cell (the live one, else a new one); True when logged.

        Config = record["config"] plus the identity fields and env under `cell` (so a config
        section named like a field, e.g. `strategy`, keeps its value), redacted; summary =
        record["metrics"] + status/reason; the final sample grid as a wandb.Image (`samples`);
        exit code 1 for a failed cell. Without a live run (it was never opened in this process)
        the history is the record's curves, the FID curve merged in (`curve/fid`).
        """
        if not self.enabled:
            return False
        live = self.live
        if live is not None and live.cell_id == record.get("cell_id"):
            return self._guarded(f"cell {record.get('cell_id')}", self._finish_cell, live, record,
                                 sample_png_path)
        if live is not None:  # a run left open by a cell that never reported: close it as failed
            self._guarded(f"cell {live.cell_id}", self._abandon, count=False)
        return self._guarded(f"cell {record.get('cell_id')}", self._log_cell, record, sample_png_path)

    def log_unrun_cells(self, records: Iterable[dict]) -> int:
        """A run for each cell that never started in a worker (skipped setup, launch that died),
        so W&B lists it with its status and reason; how many were logged."""
        # bench.cell's skipped_record/failed_record (written by `bench run`, not a worker) have no artifacts
        return sum(self.log_cell(r) for r in latest_per_cell(records) if not r.get("artifacts"))

    def log_summary(self, run_id: str, records: Iterable[dict],
                    plot_paths: Iterable[str | os.PathLike] = (),
                    run_dir: str | os.PathLike | None = None) -> bool:
        """Create (or, on a resume, update) the run's summary W&B run: a table of every cell (flat
        columns, the sample grid as an image column; paths under `run_dir`, default `dir`) and the plots."""
        if not self.enabled:
            return False
        return self._guarded(f"summary of {run_id}", self._log_summary, run_id,
                             latest_per_cell(records), [Path(p) for p in plot_paths],
                             Path(run_dir) if run_dir is not None else self.dir)

    def log_perf_gate(self, night: str, rows: list[dict], summary: dict, config: dict) -> bool:
        """The nightly benchmark gate as a `perf-gate` run (group and job type `perf-gate`, name
        `perf-gate-<night>`, id fixed by `night`): its table of rows, and per benchmark the normalised
        median and change as summary metrics (`gate/<benchmark>/...`) for charts across nights.
        A night with a regression finishes with exit code 1, so W&B lists it as failed."""
        if not self.enabled:
            return False

        def fill(wandb, run):
            columns = list(rows[0]) if rows else ["name", "verdict"]
            run.log({"gate": wandb.Table(columns=columns, data=[[flat_value(r.get(c)) for c in columns] for r in rows],
                                         allow_mixed_types=True)})
            for r in rows:
                run.summary.update({f"gate/{r['name']}/{k}": flat_value(r.get(k)) for k in ("new", "change", "verdict")})
            run.summary.update({k: flat_value(v) for k, v in summary.items()})

        init = dict(id=wandb_run_id("perf-gate", night), group="perf-gate", job_type="perf-gate",
                    name=f"perf-gate-{night}", config=scrub(config),
                    tags=["perf-gate"] + ([str(config["device"])] if config.get("device") else []))
        code = FAILED_EXIT_CODE if summary.get("verdict") == "REGRESSED" else 0
        return self._guarded(f"perf gate {night}", lambda: self._run(fill, code, **init))

    def sync_command(self) -> str | None:
        """The `wandb sync` command that uploads this run's offline runs (None unless offline)."""
        if self.mode != "offline" or self.runs_logged == 0:
            return None
        return f"wandb sync {self.dir / 'wandb'}/offline-run-*"

    def close(self) -> str | None:
        """End of the benchmark: print (and return) the `wandb sync` command for offline runs."""
        if self.live is not None:  # never reported: the process is ending mid-cell
            self._guarded(f"cell {self.live.cell_id}", self._abandon, count=False)
        command = self.sync_command()
        if command:
            print(f"W&B runs were saved offline; upload them with: {command}", flush=True)
        return command

    def __enter__(self) -> "WandbSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _guarded(self, what: str, fn, *args, count: bool = True) -> bool:
        if not self.enabled:
            return False
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - W&B must never take the benchmark down
            if isinstance(err, KeyboardInterrupt):
                raise
            live, self.live = self.live, None
            if live is not None:  # do not leave a half-logged run dangling
                try:
                    live.run.finish(exit_code=FAILED_EXIT_CODE)
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
            self._disable(f"W&B logging of {what} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no message'}); "
                          "W&B is off for the rest of this run, results.jsonl is unaffected")
            return False
        if count:
            self.runs_logged += 1
        return True

    def _disable(self, message: str) -> None:
        self.enabled = False
        self.warning = message
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def _init(self, stats: bool = False, **kwargs):
        """wandb.init with our settings; `stats`: sample system metrics (CPU, RSS, GPU use, power).

        The sampling interval is wandb's (15 s; WANDB_X_STATS_SAMPLING_INTERVAL overrides it).
        """
        import wandb  # lazy: importing wandb costs seconds and spawns nothing until init

        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(init_timeout=self.init_timeout_s,
                                  finish_timeout=self.finish_timeout_s,
                                  finish_timeout_raises=True, console="off", silent=True,
                                  quiet=True, x_disable_stats=not stats, save_code=False,
                                  disable_git=True, disable_job_creation=True)
        return wandb, wandb.init(mode=self.mode, project=self.project, entity=self.entity,
                                 dir=str(self.dir), settings=settings, reinit="finish_previous",
                                 resume="allow", **kwargs)

    def _run(self, fn, exit_code: int = 0, **init_kwargs) -> None:
        """Init a run, let `fn(wandb, run)` fill it, finish it with `exit_code`; on error, as failed."""
        wandb, run = self._init(**init_kwargs)
        try:
            fn(wandb, run)
        except BaseException:
            try:
                run.finish(exit_code=FAILED_EXIT_CODE)
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        run.finish(exit_code=exit_code)

    @staticmethod
    def _cell_init_kwargs(record: dict) -> dict:
        """wandb.init arguments of a cell's run: its fixed id, group, name, tags and config."""
        config = dict(record.get("config") or {})
        # identity under its own key: config sections such as `strategy` share their names
        config["cell" if "cell" not in config else "bench_cell"] = {
            **{k: record.get(k) for k in IDENTITY_FIELDS}, "env": record.get("env", {})}
        tags = [str(record.get(k)) for k in ("pair", "setup", "network") if record.get(k)]
        return dict(id=wandb_run_id(record.get("run_id"), record.get("cell_id")),
                    group=record.get("run_id"), job_type=record.get("strategy"),
                    name=record.get("cell_id"), tags=tags, config=scrub(config))

    @staticmethod
    def _final(wandb, run, record: dict, sample_png_path, step: int) -> None:
        """The cell's final sample grid (at `step`) and summary: the record's metrics, status, reason."""
        sample = Path(sample_png_path) if sample_png_path else None
        if sample is not None and sample.is_file():
            run.log({STEP_KEY: step, "samples": wandb.Image(str(sample), caption=record.get("cell_id"))})
        summary = {k: flat_value(v) for k, v in (record.get("metrics") or {}).items()}
        summary.update({k: record.get(k) for k in STATE_FIELDS})
        # after history, so final metrics win over the last row
        run.summary.update(summary)

    def _finish_cell(self, live: LiveCell, record: dict, sample_png_path) -> None:
        self._final(live.wandb, live.run, record, sample_png_path, live.last_step)
        live.run.finish(exit_code=exit_code(record))
        self.live = None

    def _abandon(self) -> None:
        """Finish the open cell run as failed (its cell never reported a record)."""
        live, self.live = self.live, None
        live.run.finish(exit_code=FAILED_EXIT_CODE)

    def _log_cell(self, record: dict, sample_png_path) -> None:
        def fill(wandb, run):
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
            rows: dict[int, dict] = {}
            curves = record.get("curves") or {}
            for row in curves.get("train", []):
                rows.setdefault(int(row["step"]), {}).update(
                    {k: v for k, v in row.items() if k != "step"})
            for row in curves.get("fid", []):
                rows.setdefault(int(row["step"]), {}).update(
                    {"curve/fid": row.get("fid"), "curve/fid_wall_s": row.get("wall_s")})
            for step in sorted(rows):
                run.log({STEP_KEY: step, **{k: flat_value(v) for k, v in rows[step].items()}})
            self._final(wandb, run, record, sample_png_path, max(rows) if rows else 0)

        self._run(fill, exit_code(record), **self._cell_init_kwargs(record))

    def _log_summary(self, run_id: str, records: list[dict], plots: list[Path], run_dir: Path) -> None:
        from bench.stats import verdicts

        def fill(wandb, run):
            columns, rows = flat_table(records)  # the table `bench export` writes, samples as images
            data = []
            for r, row in zip(records, rows):
                sample = run_dir / row["samples"] if row["samples"] else None
                row["samples"] = wandb.Image(str(sample), caption=r["cell_id"]) if sample and sample.is_file() else None
                data.append([row[c] for c in columns])
            payload = {"cells": wandb.Table(columns=columns, data=data, allow_mixed_types=True)}
            found = verdicts(records)
            payload["verdicts"] = wandb.Table(
                columns=["pair", "setup", "best", "runner_up", "lead", "p_value", "text"],
                data=[[v.pair, v.setup, v.best, v.runner_up, v.lead, v.p_value, v.text]
                      for v in found])
            for path in plots:
                if path.is_file():
                    payload[f"plots/{path.stem}"] = wandb.Image(str(path), caption=path.stem)
            run.log(payload)
            run.summary.update({"cells/total": len(records),
                                "cells/ok": sum(r["status"] == "ok" for r in records),
                                "cells/failed": sum(r["status"] == "failed" for r in records),
                                "cells/skipped": sum(r["status"] == "skipped" for r in records)})

        matrix = records[0].get("matrix") if records else None
        self._run(fill, id=wandb_run_id(run_id, "summary"), group=run_id, job_type="summary",
                  name=f"{run_id}-summary",
                  tags=["summary"] + ([matrix] if matrix else []),
                  config=scrub({"run_id": run_id, "matrix": matrix, "cells": len(records)}))
