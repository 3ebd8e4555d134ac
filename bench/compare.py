"""Compare two matrix runs cell by cell: the nightly performance-regression gate (`bench compare`).

Records are matched by `cell_id` without its `-s{seed}` suffix; each metric is aggregated over the
cell's ok seeds (mean, sample std). Five metrics are gated:

- `timing/img_per_s`: regression when new < baseline * (1 - throughput_tol).
- `resources/peak_mem_gb`: regression when new > baseline * (1 + memory_tol).
- `quality/fid`: regression when new > baseline + fid_spreads * spread, where
  spread = max(baseline std, new std, FID_SPREAD_FLOOR * baseline mean). The floor (1% of the
  baseline FID) stops a single seed (std 0), or seeds that happen to agree, from flagging noise.
- `transfer/target_class_share` (higher is better) and `transfer/memorised_share` (lower is
  better), shares in [0, 1] from ganlib.fewshot: regression when worse by more than share_tol
  share points (absolute: a share near 0 has no meaningful relative change). A cell whose
  target has no such metric (no classes, not few-shot) is not gated on it.

A cell ok in the baseline with any failed seed in the new run is a regression (verdict FAILED).
Cells on one side only are reported (NEW / MISSING) but do not fail the gate.

The gate fails closed: a gated metric missing or non-finite in any ok seed is a regression, and a
cell whose two runs ran different configurations is not compared but fails the gate (verdict
CONFIG, the first differing field named); when no shared cell ran the same configuration the
comparison is refused.

Throughput and memory measured while other cells shared the device (`timing/concurrent_cells`,
absent in records made before pools existed: 1) are a different measurement from those taken
alone: when the two runs differ there, img/s and peak memory are not compared (the table says
so); FID does not depend on concurrency and is still compared.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.results import CONCURRENCY, Stat, latest_per_cell, load_records, stat_of
from bench.rundir import results_path
from ganlib.errors import UserError, exit_on_user_error

THROUGHPUT = "timing/img_per_s"
MEMORY = "resources/peak_mem_gb"
FID = "quality/fid"
FID_SPREAD_FLOOR = 0.01  # fraction of the baseline mean FID; the smallest spread a FID check uses
# Transfer-fidelity shares gated in absolute points: key -> higher is better.
SHARES = {"transfer/target_class_share": True, "transfer/memorised_share": False}

VERDICTS = ("OK", "REGRESSED", "IMPROVED", "NEW", "MISSING", "FAILED", "CONFIG")
# Config fields that say where a run put things, not what it ran (they differ between any two runs).
_NOT_CONFIG = frozenset({"out", "source", "data_root", "resume", "progress", "seed", "cache_dir"})
_SEED_SUFFIX = re.compile(r"-s\d+$")
_THREADS = re.compile(r", \d+ threads?(?=\))")  # the CPU thread count in a device name
_DEVICE_INDEX = re.compile(r":\d+$")


@dataclass
class MetricChange:
    """One gated metric of one cell. `change` is relative (0.05 = +5%) for throughput and memory,
    in spreads for FID and in share points (new - base) for SHARES; None when either side lacks it."""

    base: Stat | None
    new: Stat | None
    change: float | None = None
    spread: float | None = None  # FID only: the spread `change` is measured in
    not_compared: str = ""  # why the two sides are not comparable (then no change, no verdict)
    regressed: bool = False
    improved: bool = False
    unusable: str = ""  # fail closed: `new seed 1: nan` when an ok seed lacks a finite value


@dataclass
class CellComparison:
    """The verdict for one cell (seed suffix dropped) and the metric changes behind it."""

    cell: str
    verdict: str
    base_status: str | None  # None: cell absent from that run
    new_status: str | None
    base_seeds: int | None = None  # ok seeds in the baseline run; None: cell absent there
    new_seeds: int | None = None
    metrics: dict[str, MetricChange] = field(default_factory=dict)
    note: str = ""

    @property
    def regressions(self) -> list[str]:
        """Metric keys that regressed, plus "status" for a newly failing cell."""
        keys = [key for key, change in self.metrics.items() if change.regressed]
        if self.base_status == "ok" and self.new_status == "failed":
            keys.append("status")
        if self.verdict == "CONFIG":
            keys.append("config")
        return keys


@dataclass
class Comparison:
    """All cells of both runs, the thresholds used, and environment warnings."""

    baseline_dir: str
    new_dir: str
    throughput_tol: float
    memory_tol: float
    fid_spreads: float
    cells: list[CellComparison]
    warnings: list[str] = field(default_factory=list)
    share_tol: float = 0.05

    @property
    def regressed(self) -> bool:
        """True when any cell regressed: the gate fails."""
        return any(cell.regressions for cell in self.cells)

    def to_dict(self) -> dict:
        """JSON-ready form (what `--json` writes)."""
        out = asdict(self)
        for cell, raw in zip(self.cells, out["cells"]):
            raw["regressions"] = cell.regressions
        out["regressed"] = self.regressed
        out["fid_spread_floor"] = FID_SPREAD_FLOOR
        return out


def _load_run(run_dir) -> list[dict]:
    """Records of one run directory, checked for the mistakes a user can make on the command line."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory {str(path)!r} does not exist; "
                        "pass a directory written by `bench run`")
    if not results_path(path).is_file():
        raise UserError(f"{str(path)!r} has no results.jsonl; "
                        "pass a directory written by `bench run` (the one holding results.jsonl)")
    records = latest_per_cell(load_records(path))
    if not records:
        raise UserError(f"{str(results_path(path))!r} holds no records; "
                        "wait for the run to finish or pass another run")
    return records


def _cell_key(record: dict) -> str:
    """cell_id without the seed: `...-cpu-1proc-s2` -> `...-cpu-1proc`."""
    cell_id = str(record["cell_id"])
    seed = record.get("seed")
    if seed is not None and cell_id.endswith(f"-s{seed}"):
        return cell_id[: -len(f"-s{seed}")]
    return _SEED_SUFFIX.sub("", cell_id)


def _group(records: list[dict]) -> dict[str, list[dict]]:
    """Records by cell (seeds together), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_cell_key(record), []).append(record)
    return groups


def _status(group: list[dict]) -> str:
    """One status per cell: failed if any seed failed, else ok if any seed is ok (metrics come
    from the ok seeds; the table shows how many), else skipped."""
    statuses = {r.get("status") for r in group}
    if "failed" in statuses:
        return "failed"
    return "ok" if "ok" in statuses else "skipped"


def _stats(group: list[dict], key: str) -> Stat | None:
    """Mean and sample std of one metric over the ok seeds that report a finite value."""
    values = [(r.get("metrics") or {}).get(key) for r in group if r.get("status") == "ok"]
    try:
        return stat_of(values)
    except ValueError:  # no seed has a finite value
        return None


def _unusable(base: list[dict], new: list[dict], key: str) -> str:
    """`new seed 1: missing` for the first ok seed (new run first) without a finite `key`, else ""."""
    for side, group in (("new", new), ("baseline", base)):
        for record in group:
            if record.get("status") != "ok":
                continue
            value = (record.get("metrics") or {}).get(key)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                return f"{side} seed {record.get('seed')}: {'missing' if value is None else value}"
    return ""


def _comparable_config(config) -> object:
    """A record's config without the fields that only say where things went (see _NOT_CONFIG)."""
    if isinstance(config, dict):
        return {k: _comparable_config(v) for k, v in config.items() if k not in _NOT_CONFIG}
    return config


def _first_difference(a, b, path: str = "") -> str | None:
    """`transfer.steps 20 -> 30` for the first field where two configs differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return f"{where} {'absent' if key not in a else repr(a[key])} -> " \
                       f"{'absent' if key not in b else repr(b[key])}"
            diff = _first_difference(a[key], b[key], where)
            if diff:
                return diff
        return None
    return None if a == b else f"{path or 'config'} {a!r} -> {b!r}"


def config_difference(base: list[dict], new: list[dict]) -> str | None:
    """How the new run's config of a cell differs from the baseline's (None: the same runs)."""
    configs = [_comparable_config(r.get("config") or {}) for r in base + new]
    return _first_difference(configs[0], next((c for c in configs[1:] if c != configs[0]), configs[0]))


def _relative(base: Stat | None, new: Stat | None, tol: float, higher_is_better: bool):
    """Relative change of the means, gated by a symmetric tolerance."""
    change = MetricChange(base, new)
    if base is None or new is None or base.mean <= 0:
        return change
    change.change = new.mean / base.mean - 1
    worse = -change.change if higher_is_better else change.change
    change.regressed = worse > tol
    change.improved = worse < -tol
    return change


def _fid(base: Stat | None, new: Stat | None, spreads: float) -> MetricChange:
    """FID change in spreads; lower FID is better."""
    change = MetricChange(base, new)
    if base is None or new is None:
        return change
    change.spread = max(base.std or 0.0, new.std or 0.0, FID_SPREAD_FLOOR * abs(base.mean))
    if change.spread <= 0:  # baseline FID exactly 0 with no noise: nothing to measure against
        return change
    change.change = (new.mean - base.mean) / change.spread
    change.regressed = change.change > spreads
    change.improved = change.change < -spreads
    return change


def _share(base: Stat | None, new: Stat | None, tol: float, higher_is_better: bool) -> MetricChange:
    """Absolute change of a share in [0, 1], gated by `tol` share points."""
    change = MetricChange(base, new)
    if base is None or new is None:
        return change
    change.change = new.mean - base.mean
    worse = -change.change if higher_is_better else change.change
    change.regressed = worse > tol
    change.improved = worse < -tol
    return change


def _first_reason(group: list[dict], status: str) -> str:
    """`seed 1: reason` of the first seed with this status, for the note column."""
    for record in group:
        if record.get("status") == status:
            return f"seed {record.get('seed')}: {record.get('reason') or 'no reason recorded'}"
    return ""


def _concurrency(group: list[dict]) -> tuple[int, ...]:
    """The distinct cells-sharing-the-device counts of a cell's ok seeds (1 for records made before pools)."""
    return tuple(sorted({int((r.get("metrics") or {}).get(CONCURRENCY) or 1)
                         for r in group if r.get("status") == "ok"}))


def _compare_cell(name, base, new, tols) -> CellComparison:
    """Verdict for one cell; `base` or `new` is None when the cell is absent from that run."""
    b_status = _status(base) if base else None
    n_status = _status(new) if new else None
    ok_seeds = lambda group: None if group is None else sum(r.get("status") == "ok" for r in group)
    cell = CellComparison(name, "OK", b_status, n_status, ok_seeds(base), ok_seeds(new))
    difference = config_difference(base, new) if base and new else None
    if difference:
        cell.verdict = "CONFIG"
        cell.note = f"not compared: the runs ran different configs ({difference})"
    elif b_status == "ok" and n_status == "ok":
        tp_tol, mem_tol, spreads, share_tol = tols
        cell.metrics = {
            THROUGHPUT: _relative(_stats(base, THROUGHPUT), _stats(new, THROUGHPUT), tp_tol, True),
            MEMORY: _relative(_stats(base, MEMORY), _stats(new, MEMORY), mem_tol, False),
            FID: _fid(_stats(base, FID), _stats(new, FID), spreads),
            **{key: _share(_stats(base, key), _stats(new, key), share_tol, higher)
               for key, higher in SHARES.items()},
        }
        b_conc, n_conc = _concurrency(base), _concurrency(new)
        if b_conc != n_conc:
            show = lambda conc: "/".join(map(str, conc))
            why = f"measured with {show(b_conc)} vs {show(n_conc)} concurrent cell(s)"
            for key in (THROUGHPUT, MEMORY):
                cell.metrics[key] = MetricChange(cell.metrics[key].base, cell.metrics[key].new, not_compared=why)
            cell.note = f"img/s and peak mem not compared: {why} (FID compared)"
        for key, change in cell.metrics.items():  # fail closed: a gate that cannot measure does not pass
            if change.not_compared or (key in SHARES and change.base is None):
                continue  # not comparable by design; transfer shares exist only for some targets
            change.unusable = _unusable(base, new, key)
            change.regressed = change.regressed or bool(change.unusable)
        if any(m.regressed for m in cell.metrics.values()):
            cell.verdict = "REGRESSED"
        elif any(m.improved for m in cell.metrics.values()):
            cell.verdict = "IMPROVED"
    elif n_status == "failed":
        cell.verdict = "FAILED"
        was = "newly failed" if b_status == "ok" else f"baseline {b_status or 'absent'}"
        cell.note = f"{was}; {_first_reason(new, 'failed')}"
    elif b_status is None or (b_status != "ok" and n_status == "ok"):
        cell.verdict = "IMPROVED" if b_status == "failed" else "NEW"
        cell.note = f"baseline {b_status or 'absent'}, new {n_status}"
    else:  # absent or skipped in the new run, or never ok on either side
        cell.verdict = "MISSING"
        cell.note = f"baseline {b_status}, new {n_status or 'absent'}"
        if n_status == "skipped":
            cell.note += f"; {_first_reason(new, 'skipped')}"
    return cell


def _env_values(group: list[dict], key: str) -> set:
    """Distinct `env[key]` values of a cell's records (lists made hashable)."""
    values = set()
    for record in group:
        value = (record.get("env") or {}).get(key)
        if value is not None:
            values.add(tuple(value) if isinstance(value, list) else value)
    return values


def _device_kinds(group: list[dict]) -> set[str]:
    """Device names without index, count or thread setting: ["cuda:0", "cuda:1"] -> {"cuda"};
    "cpu (x86_64, 2 threads)" -> "cpu (x86_64)" (threads are a launch setting, not the hardware)."""
    return {_THREADS.sub("", _DEVICE_INDEX.sub("", str(d))) for devices in _env_values(group, "devices")
            for d in devices}


def _env_warnings(base_groups, new_groups, shared, allow_device_mismatch) -> list[str]:
    """Warnings for differing torch/devices; a UserError for a different device kind unless allowed."""
    warnings = []
    for key in ("torch", "devices"):
        b = set().union(*(_env_values(g, key) for g in base_groups.values()))
        n = set().union(*(_env_values(g, key) for g in new_groups.values()))
        if b != n:
            show = lambda vals: ", ".join(sorted(str(list(v) if isinstance(v, tuple) else v) for v in vals))
            warnings.append(f"env.{key} differs: baseline {show(b) or '?'}, new {show(n) or '?'}")
    mismatched = [(name, _device_kinds(base_groups[name]), _device_kinds(new_groups[name]))
                  for name in shared]
    mismatched = [m for m in mismatched if m[1] and m[2] and m[1] != m[2]]
    if mismatched:
        name, b, n = mismatched[0]
        line = (f"device kind differs in {len(mismatched)} cell(s), e.g. {name}: "
                f"baseline {', '.join(sorted(b))}, new {', '.join(sorted(n))}")
        if not allow_device_mismatch:
            raise UserError(f"{line}; compare runs made on the same hardware, "
                            "or pass --allow-device-mismatch (allow_device_mismatch=True)")
        warnings.append(line + " (allowed)")
    return warnings


def compare_runs(baseline_dir, new_dir, throughput_tol: float = 0.10, memory_tol: float = 0.10,
                 fid_spreads: float = 2.0, allow_device_mismatch: bool = False,
                 share_tol: float = 0.05) -> Comparison:
    """Compare two run directories (each holding results.jsonl) cell by cell.

    throughput_tol: largest tolerated relative drop in mean img/s (0.10 = 10%).
    memory_tol:     largest tolerated relative growth in mean peak memory (GB).
    fid_spreads:    largest tolerated FID rise, in spreads (see the module docstring).
    share_tol:      largest tolerated worsening of a SHARES metric, in share points (0.05 = 5 points).
    Raises UserError for a missing/empty run, no cells in common, bad tolerances, or a different
    device kind in a shared cell (unless allow_device_mismatch).
    """
    if not 0 <= throughput_tol < 1:
        raise UserError(f"throughput tolerance {throughput_tol} is outside [0, 1); pass e.g. 0.10 for 10%")
    if memory_tol < 0:
        raise UserError(f"memory tolerance {memory_tol} is negative; pass e.g. 0.10 for 10%")
    if fid_spreads <= 0:
        raise UserError(f"FID spreads {fid_spreads} must be positive; pass e.g. 2.0")
    if not 0 <= share_tol < 1:
        raise UserError(f"share tolerance {share_tol} is outside [0, 1); pass e.g. 0.05 for 5 points")
    base_groups = _group(_load_run(baseline_dir))
    new_groups = _group(_load_run(new_dir))
    shared = [name for name in base_groups if name in new_groups]
    if not shared:
        raise UserError(f"no cells in common between {str(baseline_dir)!r} and {str(new_dir)!r}; "
                        "compare two runs of the same matrix")
    differences = {name: config_difference(base_groups[name], new_groups[name]) for name in shared}
    if all(differences.values()):
        name = shared[0]
        raise UserError(f"no cell ran the same config in both runs, e.g. {name}: {differences[name]}; "
                        "compare two runs of the same matrix")
    warnings = _env_warnings(base_groups, new_groups, shared, allow_device_mismatch)
    tols = (throughput_tol, memory_tol, fid_spreads, share_tol)
    names = list(base_groups) + [name for name in new_groups if name not in base_groups]
    cells = [_compare_cell(name, base_groups.get(name), new_groups.get(name), tols) for name in names]
    unlike = [c.cell for c in cells if any(m.not_compared for m in c.metrics.values())]
    if unlike:
        warnings.append(f"img/s and peak memory not compared in {len(unlike)} cell(s), e.g. {unlike[0]}: the runs "
                        "differ in concurrent cells per device (timing/concurrent_cells); rerun with the same "
                        "--workers to gate throughput")
    return Comparison(str(baseline_dir), str(new_dir), throughput_tol, memory_tol, fid_spreads,
                      cells, warnings, share_tol)


def _fmt_relative(change: MetricChange | None, digits: int) -> str:
    """`812.3 -> 690.5 (-15.0%)`, or `-` when either side lacks the metric."""
    if change is None or change.base is None or change.new is None:
        return "-"
    text = f"{change.base.mean:.{digits}f} -> {change.new.mean:.{digits}f}"
    if change.not_compared:
        return text + " (not compared)"
    return text + (f" ({change.change:+.1%})" if change.change is not None else "")


def _fmt_fid(change: MetricChange | None) -> str:
    """`12.30 -> 15.10 (+2.80, +4.1 spreads)`."""
    if change is None or change.base is None or change.new is None:
        return "-"
    text = f"{change.base.mean:.2f} -> {change.new.mean:.2f}"
    if change.change is None:
        return text
    return text + f" ({change.new.mean - change.base.mean:+.2f}, {change.change:+.1f} spreads)"


def _fmt_share(change: MetricChange | None) -> str:
    """`0.92 -> 0.85 (-0.07)`, or `-` when either side lacks the metric."""
    if change is None or change.base is None or change.new is None:
        return "-"
    return f"{change.base.mean:.2f} -> {change.new.mean:.2f} ({change.change:+.2f})"


def _describe_regression(cell: CellComparison, key: str) -> str:
    """`img_per_s -15.0%` / `fid +4.1 spreads` / `newly failed` for the summary line."""
    if key == "status":
        return "newly failed"
    if key == "config":
        return "config differs"
    change = cell.metrics[key]
    short = key.split("/", 1)[1]
    if change.unusable:
        return f"{short} not measurable ({change.unusable})"
    if key in SHARES:
        return f"{short} {change.change:+.2f}"
    return f"{short} {change.change:+.1f} spreads" if key == FID else f"{short} {change.change:+.1%}"


def format_comparison(cmp: Comparison) -> str:
    """Plain-text report: warnings, a column-aligned table (one row per cell), notes, a summary line."""
    header = ("cell", "seeds", "img/s base -> new", "peak mem GB base -> new",
              "FID base -> new (delta, spreads)", "target classes base -> new",
              "memorised base -> new", "verdict")
    rows = []
    for cell in cmp.cells:
        m = cell.metrics
        seeds = "/".join("-" if n is None else str(n) for n in (cell.base_seeds, cell.new_seeds))
        rows.append((cell.cell, seeds, _fmt_relative(m.get(THROUGHPUT), 1),
                     _fmt_relative(m.get(MEMORY), 2), _fmt_fid(m.get(FID)),
                     *(_fmt_share(m.get(key)) for key in SHARES), cell.verdict))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(text.ljust(w) for text, w in zip(row, widths)).rstrip()
    out = [f"warning: {w}" for w in cmp.warnings]
    out += [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
    notes = [f"  {cell.cell}: {cell.note}" for cell in cmp.cells if cell.note]
    if notes:
        out += ["", "notes:", *notes]
    out += ["", f"thresholds: img/s drop > {cmp.throughput_tol:.0%}, peak mem growth > "
                f"{cmp.memory_tol:.0%}, FID rise > {cmp.fid_spreads:g} spreads "
                f"(spread = max(baseline std, new std, {FID_SPREAD_FLOOR:.0%} of baseline FID)), "
                f"target-class share drop or memorised share rise > {cmp.share_tol:.2f}"]
    regressed = [f"{cell.cell} ({', '.join(_describe_regression(cell, k) for k in cell.regressions)})"
                 for cell in cmp.cells if cell.regressions]
    if regressed:
        out.append(f"REGRESSED {len(regressed)} cell(s): " + "; ".join(regressed))
    else:
        compared = sum(1 for cell in cmp.cells if cell.metrics)
        out.append(f"no regressions ({compared} cell(s) compared)")
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench compare",
        description="Compare two matrix runs; exit 1 when any cell regressed, 2 on a usage error.")
    parser.add_argument("baseline", help="baseline run directory (holds results.jsonl)")
    parser.add_argument("new", help="new run directory (holds results.jsonl)")
    parser.add_argument("--throughput-tol", type=float, default=0.10,
                        help="tolerated relative drop in img/s (default 0.10 = 10%%)")
    parser.add_argument("--memory-tol", type=float, default=0.10,
                        help="tolerated relative growth in peak memory (default 0.10 = 10%%)")
    parser.add_argument("--fid-spreads", type=float, default=2.0,
                        help="tolerated FID rise in spreads (default 2.0)")
    parser.add_argument("--share-tol", type=float, default=0.05,
                        help="tolerated worsening of target-class or memorised share, in share points "
                             "(default 0.05)")
    parser.add_argument("--allow-device-mismatch", action="store_true",
                        help="compare runs made on different device kinds (warns instead of refusing)")
    parser.add_argument("--json", metavar="PATH", help="also write the comparison as JSON to PATH")
    return parser


@exit_on_user_error
def main_compare(argv: list[str] | None = None) -> int:
    """`bench compare BASELINE NEW`: print the table; return 0 (no regression) or 1 (regression).

    A user error (missing directory, no results.jsonl, empty run) exits with code 2 via SystemExit.
    """
    args = _parser().parse_args(argv)
    cmp = compare_runs(args.baseline, args.new, args.throughput_tol, args.memory_tol,
                       args.fid_spreads, args.allow_device_mismatch, args.share_tol)
    print(format_comparison(cmp), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cmp.to_dict(), indent=2) + "\n")
    return 1 if cmp.regressed else 0


if __name__ == "__main__":
    sys.exit(main_compare())
