"""The run's record: read and write `results.jsonl`, group cells and aggregate them over seeds.

One JSON object per line, one line per finished cell (its fields: `identity`, `run_cell` and
`skipped_record` in bench/cell.py). The local file is the record; W&B and the HTML report are
built from it, never the other way round.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bench.columns import KEY_METRICS
from bench.rundir import RESULTS_FILE, results_path
from ganlib.errors import UserError

SCHEMA_VERSION = 1

# Fields that name a cell; everything else in a record is measurement or context.
IDENTITY_FIELDS = (
    "run_id", "matrix", "cell_id", "strategy", "strategy_options", "pair", "source", "target",
    "network", "size", "setup", "seed",
)
_REQUIRED_FIELDS = ("schema", "run_id", "cell_id", "pair", "strategy", "setup", "seed", "status")

CONCURRENCY = "timing/concurrent_cells"  # the most cells that shared the device while a cell ran (1: alone)


def concurrency_note(records: Iterable[dict]) -> str:
    """A line marking throughput, memory and wall time measured beside other cells ('' when all ran alone).

    Records written before pools existed lack the key: they ran alone.
    """
    shared = sorted({int(r["metrics"].get(CONCURRENCY) or 1) for r in records
                     if r.get("status") == "ok" and r.get("metrics")} - {1})
    if not shared:
        return ""
    return (f"note: img/s, peak mem and wall s were measured with up to {shared[-1]} cells sharing the device "
            f"({CONCURRENCY}); they are not comparable with figures measured alone (--workers 1)")


def flat_value(value):
    """A table- or summary-friendly scalar: lists and mappings become JSON text, non-finite floats None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof=1) of one metric over seeds; std is None when n < 2."""

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...]

    def format(self, spec: str = ".2f", unit: str = "", with_n: bool = True) -> str:
        """`12.30 ± 0.41 GB (n=3)`; the std is left out when there is a single value."""
        text = f"{self.mean:{spec}}"
        if self.std is not None:
            text += f" ± {self.std:{spec}}"
        if unit:
            text += f" {unit}"
        if with_n:
            text += f" (n={self.n})"
        return text


def stat_of(values: Iterable[float]) -> Stat:
    """Summarise finite values; NaN/inf/None are dropped so a diverged FID cannot poison a mean."""
    vals = tuple(float(v) for v in values if _is_number(v) and math.isfinite(float(v)))
    if not vals:
        raise ValueError("stat_of needs at least one finite value")
    std = statistics.stdev(vals) if len(vals) >= 2 else None
    return Stat(mean=statistics.fmean(vals), std=std, n=len(vals), values=vals)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def append_record(run_dir: str | os.PathLike, record: dict) -> Path:
    """Append one cell's record to `run_dir/results.jsonl` as one complete, fsync'ed line.

    The line goes out in a single O_APPEND write under an exclusive flock of the file, so records
    from several processes (pool workers, shards on other nodes sharing the directory over NFS,
    where O_APPEND alone is not atomic) never interleave, and a crash leaves at worst a torn
    *last* line (which `load_records` skips).
    If a previous writer died mid-line, a newline is written first so the new record stays whole.
    Returns the path of the results file.
    """
    missing = [k for k in _REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"record {record.get('cell_id')!r} lacks fields {missing}")
    line = (json.dumps(record, sort_keys=False, default=_json_default) + "\n").encode("utf-8")
    path = results_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes
        size = os.fstat(fd).st_size
        if size and not _ends_with_newline(path, size):
            line = b"\n" + line
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _json_default(obj):
    # numpy / torch scalars and paths show up in metrics; store them as plain JSON values.
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def load_records(run_dir: str | os.PathLike) -> list[dict]:
    """Read every record of a run, in file order (a re-run cell appears once per attempt).

    A torn last line (a writer was interrupted) and an unreadable line in the middle are skipped,
    each with a warning (a torn cell is missing from tables until `bench run --resume` reruns
    it). A missing file or an unknown schema is a UserError.
    """
    path = results_path(run_dir)
    if not path.is_file():
        raise UserError(f"no {RESULTS_FILE} in {run_dir}: expected a bench run directory; "
                        "pass the directory that `bench run` printed")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipping an unreadable line", stacklevel=2)
            else:  # the last element is the torn tail (no newline after it)
                warnings.warn(f"{path}:{i + 1}: skipping a torn last line (its writer was interrupted; "
                              "`bench run --resume` reruns that cell)", stacklevel=2)
            continue
        schema = record.get("schema")
        if schema != SCHEMA_VERSION:
            raise UserError(f"{path}:{i + 1} has schema {schema!r}; this ganbench reads schema "
                            f"{SCHEMA_VERSION}: use the ganbench version that wrote the run")
        records.append(record)
    return records


def records_so_far(run_dir: str | os.PathLike) -> list[dict]:
    """`load_records`, or no records while a run has not written its first one."""
    return load_records(run_dir) if results_path(run_dir).exists() else []


def latest_per_cell(records: Iterable[dict]) -> list[dict]:
    """Keep the last record of each cell_id (a resumed run appends a retried cell again)."""
    latest: dict[str, dict] = {}
    for record in records:
        latest.pop(record["cell_id"], None)  # re-insert so order follows the latest attempt
        latest[record["cell_id"]] = record
    return list(latest.values())


def group_by_pair(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records per transfer pair, pairs and records in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["pair"], []).append(record)
    return groups


def ordered_unique(values: Iterable) -> list:
    """Distinct values in first-seen order (strategy and setup order follows the matrix)."""
    return list(dict.fromkeys(values))


def aggregate(records: Iterable[dict], metrics: Iterable[str] = KEY_METRICS
              ) -> dict[tuple[str, str, str], dict[str, Stat]]:
    """Mean/std/n over seeds of each key metric, per (pair, strategy, setup), from `ok` cells only.

    Failed and skipped cells are left out (list them with `not_ok`); a metric missing or
    non-finite in every seed of a group is absent from that group's dict. Keys keep the
    first-seen order of the records.
    """
    metrics = list(metrics)
    values: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for record in latest_per_cell(records):
        key = (record["pair"], record["strategy"], record["setup"])
        if record["status"] != "ok":
            continue
        per_metric = values.setdefault(key, {})
        for name in metrics:
            value = (record.get("metrics") or {}).get(name)
            if _is_number(value) and math.isfinite(value):
                per_metric.setdefault(name, []).append(float(value))
    return {key: {name: stat_of(vals) for name, vals in per_metric.items()}
            for key, per_metric in values.items()}


def not_ok(records: Iterable[dict]) -> list[dict]:
    """The failed and skipped cells (latest attempt of each), for tables that must show them."""
    return [r for r in latest_per_cell(records) if r["status"] != "ok"]


def status_counts(records: Iterable[dict]) -> dict[tuple[str, str, str], dict[str, int]]:
    """Per (pair, strategy, setup): how many cells ended ok / failed / skipped."""
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for record in latest_per_cell(records):
        key = (record["pair"], record["strategy"], record["setup"])
        bucket = counts.setdefault(key, {})
        bucket[record["status"]] = bucket.get(record["status"], 0) + 1
    return counts


def format_counts(counts: dict[str, int]) -> str:
    """`3 ok` / `2 ok, 1 failed` in a fixed status order."""
    order = ["ok", "failed", "skipped"] + sorted(set(counts) - {"ok", "failed", "skipped"})
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
