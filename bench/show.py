"""`bench show DIR`: a plain-text table per pair plus the verdict lines, for a terminal."""

from __future__ import annotations

import argparse
import os
from typing import Iterable

from bench.columns import SHOW_COLUMNS
from bench.results import (Stat, aggregate, concurrency_note, format_counts, group_by_pair, latest_per_cell,
                           load_records, not_ok, ordered_unique, status_counts)
from bench.stats import verdicts


def _cell(stat: Stat | None, spec: str, with_std: bool) -> str:
    if stat is None:
        return "-"
    if with_std and stat.std is not None:
        return f"{stat.mean:{spec}} ± {stat.std:{spec}}"
    return f"{stat.mean:{spec}}"


def _value(value, spec: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:{spec}}"
    return "-"


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    """Left-align text columns, right-align the numeric ones (`right`), two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return lines


def format_table(records: Iterable[dict], per_cell: bool = False) -> str:
    """Tables per pair (one row per strategy x setup, or per cell with `per_cell`), then verdicts.

    Aggregated rows give mean ± std over the ok seeds and a status column (`2 ok, 1 failed`);
    failed and skipped cells are listed under each table with their reason.
    """
    records = latest_per_cell(records)
    stats = aggregate(records)
    counts = status_counts(records)
    out: list[str] = []
    for pair, pair_records in group_by_pair(records).items():
        first = pair_records[0]
        out.append(f"== {pair}  ({first['source']} -> {first['target']}, "
                   f"{first['network']} {first['size']}px)")
        if per_cell:
            header = ["strategy", "setup", "seed", "status"] + [c.header for c in SHOW_COLUMNS]
            rows = [header]
            for r in pair_records:
                metrics = r.get("metrics") or {}
                rows.append([r["strategy"], r["setup"], str(r["seed"]), r["status"]]
                            + [_value(metrics.get(c.key), c.spec) for c in SHOW_COLUMNS])
            out += _align(rows, right={2, *range(4, len(header))})  # seed and numbers
        else:
            header = ["strategy", "setup"] + [c.header for c in SHOW_COLUMNS] + ["cells"]
            rows = [header]
            for strategy in ordered_unique(r["strategy"] for r in pair_records):
                for setup in ordered_unique(r["setup"] for r in pair_records):
                    key = (pair, strategy, setup)
                    if key not in counts:
                        continue
                    per = stats.get(key, {})
                    rows.append([strategy, setup]
                                + [_cell(per.get(c.key), c.spec, c.with_std) for c in SHOW_COLUMNS]
                                + [format_counts(counts[key])])
            out += _align(rows, right=set(range(2, 2 + len(SHOW_COLUMNS))))
        out += _not_ok_lines(pair_records)
        if concurrency_note(pair_records):
            out.append("  " + concurrency_note(pair_records))
        out.append("")
    verdict_list = verdicts(records)
    if verdict_list:
        out.append("verdicts (FID, lower is better):")
        for v in verdict_list:
            out.append(f"  {v.text}")
            if v.versus_text:
                out.append(f"    {v.versus_text}")
    return "\n".join(out).rstrip() + "\n"


def show(*run_dirs: str | os.PathLike, per_cell: bool = False) -> str:
    """The text `bench show DIR...` prints: one table over the records of every directory given
    (the shards of a run that each wrote their own directory, in order)."""
    return format_table([r for run_dir in run_dirs for r in load_records(run_dir)], per_cell=per_cell)



def _not_ok_lines(records: list[dict]) -> list[str]:
    """The failed and skipped cells, one line per status and reason: a reason many cells share (a GPU
    setup on a CPU machine, a domain's missing files with their fetch commands) is said once."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in not_ok(records):
        groups.setdefault((r["status"], r.get("reason") or "no reason given"), []).append(r["cell_id"])
    lines = []
    for (status, reason), ids in groups.items():
        who = ids[0] if len(ids) == 1 else f"{len(ids)} cells ({', '.join(ids[:2])}{', ...' if len(ids) > 2 else ''})"
        lines.append(f"  {status}: {who}: {reason}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m bench.show DIR [--cells]`."""
    from ganlib.errors import exit_on_user_error

    parser = argparse.ArgumentParser(prog="bench show", description=__doc__)
    parser.add_argument("run_dir", help="a bench run directory (holds results.jsonl)")
    parser.add_argument("--cells", action="store_true", help="one row per cell instead of "
                        "mean ± std over seeds")
    args = parser.parse_args(argv)
    exit_on_user_error(lambda: print(show(args.run_dir, per_cell=args.cells), end=""))()


if __name__ == "__main__":
    main()
