"""W&B as a sink: mirror each finished cell (and a run summary) into Weights & Biases.

The local `results.jsonl` is the record. Callers write a cell's record and artifacts to disk
*before* calling the sink, so nothing W&B does can lose a result. Every W&B call is guarded:
any exception (import, init, log, finish, timeout) prints one warning line and disables the
sink for the rest of the run, so W&B being down, slow or misconfigured never fails or stalls
a benchmark. `wandb` is imported lazily; construct the sink on the main process only (on any
other rank it disables itself).

Layout in W&B: one run per cell (group = run_id, job_type = strategy, name = cell_id, tags
[pair, setup, network]) and one `summary` run per matrix run with a table of every cell and
the report's plots. Config keys that look like credentials are redacted before upload.

The caller's order (main process):
    append_record(run_dir, record)                        # 1. the record is on disk
    sink.log_cell(record, run_dir / record["artifacts"]["samples"])   # 2. then W&B
    ...
    write_report(run_dir)                                 # report + plots/*.png
    sink.log_summary(run_id, load_records(run_dir), plot_paths(run_dir))
    sink.close()                                          # prints `wandb sync ...` if offline

Offline runs: wandb-core flushes `run-*.wandb` shortly after `finish()` returns (and at exit).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Iterable

from ganlib.errors import UserError
from bench.results import IDENTITY_FIELDS, latest_per_cell

MODES = ("auto", "online", "offline", "disabled")
# A credential's name has one of these words as a whole word (snake_case, kebab-case or camelCase):
# `API_KEY`, `accessToken`, `apikey`, but not `monkey_patch` or `tokenizer`.
SECRET_WORD = re.compile(r"(?:^|[^a-z0-9])(?:api_?key|keys?|tokens?|secrets?|passwords?|passwd|credentials?)"
                         r"(?:$|[^a-z0-9])")
REDACTED = "[redacted]"
DEFAULT_HOST = "api.wandb.ai"
INIT_TIMEOUT_S = 30.0    # how long wandb.init may wait for the backend / server
FINISH_TIMEOUT_S = 60.0  # how long finish may wait for uploads before giving up on them
SUMMARY_FIELDS = ("status", "reason")


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


def _flat(value):
    """A table/summary-friendly scalar: lists and dicts become JSON text, non-finite floats None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


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

    # --- public API -------------------------------------------------------------------------

    def log_cell(self, record: dict, sample_png_path: str | os.PathLike | None = None) -> bool:
        """Create one W&B run for a finished cell; True when it was logged.

        Config = record["config"] plus the identity fields and env under `cell` (so a config
        section named like a field, e.g. `strategy`, keeps its value), redacted; history = the
        training curve rows at their step with the FID curve merged in (`curve/fid`); summary =
        record["metrics"] + status/reason; the sample grid as a wandb.Image (`samples`).
        """
        if not self.enabled:
            return False
        config = dict(record.get("config") or {})
        # identity under its own key: config sections such as `strategy` share their names
        config["cell" if "cell" not in config else "bench_cell"] = {
            **{k: record.get(k) for k in IDENTITY_FIELDS}, "env": record.get("env", {})}
        config = scrub(config)
        tags = [str(record.get(k)) for k in ("pair", "setup", "network") if record.get(k)]
        return self._guarded(f"cell {record.get('cell_id')}", self._log_cell, record, config,
                             tags, sample_png_path)

    def log_summary(self, run_id: str, records: Iterable[dict],
                    plot_paths: Iterable[str | os.PathLike] = ()) -> bool:
        """Create the run's summary W&B run: a table of every cell (flat columns) and the plots."""
        if not self.enabled:
            return False
        return self._guarded(f"summary of {run_id}", self._log_summary, run_id,
                             latest_per_cell(records), [Path(p) for p in plot_paths])

    def sync_command(self) -> str | None:
        """The `wandb sync` command that uploads this run's offline runs (None unless offline)."""
        if self.mode != "offline" or self.runs_logged == 0:
            return None
        return f"wandb sync {self.dir / 'wandb'}/offline-run-*"

    def close(self) -> str | None:
        """End of the benchmark: print (and return) the `wandb sync` command for offline runs."""
        command = self.sync_command()
        if command:
            print(f"W&B runs were saved offline; upload them with: {command}", flush=True)
        return command

    def __enter__(self) -> "WandbSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _guarded(self, what: str, fn, *args) -> bool:
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - W&B must never take the benchmark down
            if isinstance(err, KeyboardInterrupt):
                raise
            self._disable(f"W&B logging of {what} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no message'}); "
                          "W&B is off for the rest of this run, results.jsonl is unaffected")
            return False
        self.runs_logged += 1
        return True

    def _disable(self, message: str) -> None:
        self.enabled = False
        self.warning = message
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def _init(self, **kwargs):
        import wandb  # lazy: importing wandb costs seconds and spawns nothing until init

        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(init_timeout=self.init_timeout_s,
                                  finish_timeout=self.finish_timeout_s,
                                  finish_timeout_raises=True, console="off", silent=True,
                                  quiet=True, x_disable_stats=True, save_code=False,
                                  disable_git=True, disable_job_creation=True)
        return wandb, wandb.init(mode=self.mode, project=self.project, entity=self.entity,
                                 dir=str(self.dir), settings=settings, reinit="finish_previous",
                                 **kwargs)

    def _run(self, fn, **init_kwargs) -> None:
        """Init a run, let `fn(wandb, run)` fill it, finish it; on error, finish it as failed."""
        wandb, run = self._init(**init_kwargs)
        try:
            fn(wandb, run)
        except BaseException:
            try:
                run.finish(exit_code=1)
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        run.finish()

    def _log_cell(self, record: dict, config: dict, tags: list[str], sample_png_path) -> None:
        def fill(wandb, run):
            rows: dict[int, dict] = {}
            curves = record.get("curves") or {}
            for row in curves.get("train", []):
                rows.setdefault(int(row["step"]), {}).update(
                    {k: v for k, v in row.items() if k != "step"})
            for row in curves.get("fid", []):
                rows.setdefault(int(row["step"]), {}).update(
                    {"curve/fid": row.get("fid"), "curve/fid_wall_s": row.get("wall_s")})
            sample = Path(sample_png_path) if sample_png_path else None
            last_step = max(rows) if rows else 0
            if sample is not None and sample.is_file():
                rows.setdefault(last_step, {})["samples"] = wandb.Image(
                    str(sample), caption=record.get("cell_id"))
            for step in sorted(rows):  # W&B drops rows whose step goes backwards
                run.log({k: _flat(v) if not hasattr(v, "to_json") else v
                         for k, v in rows[step].items()}, step=step, commit=True)
            summary = {k: _flat(v) for k, v in (record.get("metrics") or {}).items()}
            summary.update({k: record.get(k) for k in SUMMARY_FIELDS})
            # after history (rows are committed above), so final metrics win over the last row
            run.summary.update(summary)

        self._run(fill, group=record.get("run_id"), job_type=record.get("strategy"),
                  name=record.get("cell_id"), tags=tags, config=config)

    def _log_summary(self, run_id: str, records: list[dict], plots: list[Path]) -> None:
        from bench.stats import verdicts

        def fill(wandb, run):
            metric_keys = sorted({k for r in records for k in (r.get("metrics") or {})})
            columns = list(IDENTITY_FIELDS) + list(SUMMARY_FIELDS) + metric_keys
            data = []
            for r in records:
                row = [_flat(r.get(k)) for k in IDENTITY_FIELDS + SUMMARY_FIELDS]
                row += [_flat((r.get("metrics") or {}).get(k)) for k in metric_keys]
                data.append(row)
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
        self._run(fill, group=run_id, job_type="summary", name=f"{run_id}-summary",
                  tags=["summary"] + ([matrix] if matrix else []),
                  config=scrub({"run_id": run_id, "matrix": matrix, "cells": len(records)}))
