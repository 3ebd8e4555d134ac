"""A run's cells as a tidy table: one flat row per cell, the metrics as columns, for pandas & co.

    bench export RUN_DIR --csv [PATH] --parquet [PATH]      (default paths: RUN_DIR/cells.csv, .parquet)

Built from `results.jsonl` (the latest record of each cell): the identity fields, status and reason,
then every metric key (`quality/fid`, `timing/img_per_s`, ...) as its own column, and the sample grid's
path. Lists and mappings (strategy options, per-process values) become JSON text. CSV needs nothing;
Parquet needs pandas and pyarrow (the `export` extra).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from bench.results import IDENTITY_FIELDS, flat_value, latest_per_cell, load_records
from ganlib.checkpoint import atomic_write_text
from ganlib.errors import UserError

STATE_FIELDS = ("status", "reason")
PARQUET_NEEDS = "pip install 'ganbench[export]' (pandas and pyarrow)"


def columns_of(records: list[dict]) -> list[str]:
    """Identity fields, status and reason, every metric key seen (sorted), then `samples`."""
    metrics = sorted({k for r in records for k in (r.get("metrics") or {})})
    return [*IDENTITY_FIELDS, *STATE_FIELDS, *metrics, "samples"]


def flat_table(records: list[dict]) -> tuple[list[str], list[dict]]:
    """The columns and one flat row per record (scalars only, see `flat_value`); `samples` is the
    grid's path relative to the run directory. W&B's summary table is this table too."""
    columns = columns_of(records)
    rows = []
    for r in records:
        row = {k: flat_value(r.get(k)) for k in (*IDENTITY_FIELDS, *STATE_FIELDS)}
        row.update({k: flat_value(v) for k, v in (r.get("metrics") or {}).items()})
        row["samples"] = (r.get("artifacts") or {}).get("samples")
        rows.append({c: row.get(c) for c in columns})
    return columns, rows


def flat_rows(run_dir: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """The columns and one row per cell (its latest record), in results.jsonl's order."""
    return flat_table(latest_per_cell(load_records(run_dir)))


def write_csv(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The table as CSV at `path` (written whole or not at all); empty fields for missing values."""
    columns, rows = flat_rows(run_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), text.getvalue())
    return Path(path)


def write_parquet(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The table as Parquet at `path`; UserError naming what to install when pandas/pyarrow are missing."""
    try:
        import pandas as pd
        import pyarrow  # noqa: F401 - pandas' parquet engine; checked here for a one-line error
    except ImportError as err:
        raise UserError(f"--parquet needs pandas and pyarrow ({err.name} is not installed): {PARQUET_NEEDS}") from None
    columns, rows = flat_rows(run_dir)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows, columns=columns).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
