"""The nightly performance gate: compare two pytest-benchmark JSON files, calibrated and noise-aware.

A machine's speed moves from night to night and minute to minute (other tenants, clocks, thermal
state), so benchmarks are compared in calibration-kernel units: each benchmark's
`extra_info["normalised"]` is the median over its rounds of round time / the time of the fixed
calibration kernel run next to that round (benchmarks/timing.py). A benchmark without it (timed
some other way) falls back to its median / the median of the calibration benchmark
(`test_calibration_kernel`), which every run must contain.

A benchmark regresses when its normalised median grew by more than `tolerance` (or the wider
tolerance the benchmark declares, extra_info["tolerance"]) and by more than its spread ((max - min) / min of its round-group medians, extra_info["spread"], the larger of the two
runs), and its raw median (seconds on the run's own clock) also grew by more than that. The
second condition guards against the calibration kernel itself: on our shared CPU box one unchanged
rerun had every training step 5-13% slower in kernel units while their CPU times were 4-17% faster
(the memory-bound kernel sped up more than the compute-bound steps when the neighbours went quiet).
A real regression is slower on both scales; one missed on a night the machine ran fast is caught
the next night. Like TorchBench's stability check, a benchmark whose spread exceeds `max_spread` is reported
UNSTABLE: a change within its spread is not judged, but a slowdown beyond its own noise still fails.
A baseline measured on another device, or with another thread count, allocator mode, clock or
calibration kernel is refused; another torch/CUDA version is reported but compared.

    python -m benchmarks.gate BASELINE.json NEW.json [--tolerance 0.10] [--max-spread 0.07] [--regressed-ids F]
                              [--confirmed RERUN.json] [--wandb MODE --wandb-dir DIR]
Exit code: 0 no regression, 1 regression (named), 2 unusable input. scripts/nightly.sh reruns the
benchmarks named in --regressed-ids in a fresh process and fails only on regressions that reproduce;
`--confirmed RERUN.json` applies that rerun (a flagged benchmark it does not confirm is NOT_REPRODUCED),
and `--wandb` logs the table and the verdict as a `perf-gate` run in the `perf-gate` group.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.wandb_target import WandbTarget, add_wandb_arguments
from ganlib.config import ArgumentParser
from ganlib.errors import UserError, exit_on_user_error

CALIBRATION = "test_calibration_kernel"  # the benchmark of the calibration kernel alone
TOLERANCE = 0.10                         # slowdown (normalised median) that counts as a regression
MAX_SPREAD = 0.07                        # TorchBench-style stability bound on a benchmark's spread
SETUP_KEYS = ("device", "threads", "allocator", "clock", "calibration")  # must match to compare two runs
VERSION_KEYS = ("torch", "cuda")                             # reported when they differ


@dataclass
class Row:
    name: str
    base: float          # normalised median (calibration-kernel units)
    new: float
    change: float        # new / base - 1 (positive = slower)
    raw_change: float    # the same for the raw medians (seconds on the run's clock)
    spread: float        # the larger spread of the two runs
    verdict: str         # OK | REGRESSED | IMPROVED | UNSTABLE | NEW | MISSING | NOT_REPRODUCED
    tolerance: float     # the tolerance applied: the gate's, or the benchmark's own when wider

    @property
    def threshold(self) -> float:
        """The change a benchmark's own noise cannot explain: its tolerance or its spread, the larger."""
        return max(self.tolerance, self.spread)


def load(path: Path) -> dict:
    """A pytest-benchmark JSON file (UserError when unreadable or not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable pytest-benchmark JSON file ({err.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise UserError(f"{path}: no 'benchmarks' list; write it with pytest --benchmark-json")
    return data


def setup_of(data: dict) -> dict[str, object]:
    """How a run measured, as its benchmarks recorded it: device, threads, clock, calibration kernel, versions.

    A run's benchmarks share one setup; the first one recording a key gives it. A file written
    without our extra info falls back to pytest-benchmark's machine_info for the device.
    """
    setup: dict[str, object] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        for key in (*SETUP_KEYS, *VERSION_KEYS):
            if key not in setup and key in info:
                setup[key] = info[key]
    if "device" not in setup:
        setup["device"] = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown")
    return setup


def device_of(data: dict) -> str:
    """The device a run measured on, as the benchmarks recorded it (CPU model or GPU name)."""
    return str(setup_of(data)["device"])


def median_seconds(bench: dict) -> float:
    """Median seconds per round on the benchmark's own clock (pytest-benchmark's wall median if absent)."""
    return float((bench.get("extra_info") or {}).get("median_s", bench["stats"]["median"]))


def normalised(data: dict, path: Path) -> dict[str, tuple[float, float, float]]:
    """name -> (median in calibration-kernel units, spread, the benchmark's own tolerance or 0), for
    every benchmark but the calibration."""
    by_name = {b["name"]: b for b in data["benchmarks"]}
    calib = next((b for n, b in by_name.items() if n.startswith(CALIBRATION)), None)
    if calib is None:
        raise UserError(f"{path}: has no {CALIBRATION} benchmark (the machine's speed that run); "
                        "run the whole suite, or include it in -k")
    scale = median_seconds(calib)
    out = {}
    for name, bench in by_name.items():
        if name.startswith(CALIBRATION):
            continue
        info = bench.get("extra_info") or {}
        value = info.get("normalised")
        if value is None:
            value = median_seconds(bench) / scale
        spread = info.get("spread")
        if spread is None:
            stats = bench["stats"]
            spread = (stats["max"] - stats["min"]) / stats["min"] if stats["min"] > 0 else 0.0
        out[name] = (float(value), float(spread), float(info.get("tolerance") or 0.0))
    return out


def raw_medians(data: dict) -> dict[str, float]:
    """name -> median seconds per round on the run's own clock, for every benchmark."""
    return {b["name"]: median_seconds(b) for b in data["benchmarks"]}


def node_ids(data: dict) -> dict[str, str]:
    """name -> pytest node id (`benchmarks/test_x.py::test_y[param]`), to rerun a benchmark by itself."""
    return {b["name"]: b.get("fullname", b["name"]) for b in data["benchmarks"]}


def check_setups(base: dict, new: dict, allow_mismatch: bool = False) -> list[str]:
    """Refuse runs measured differently (UserError naming the difference); returns warnings."""
    b, n = setup_of(base), setup_of(new)
    for key in SETUP_KEYS:
        if key in b and key in n and b[key] != n[key] and not allow_mismatch:
            raise UserError(f"baseline was measured with {key} {b[key]!r}, this run with {n[key]!r}; the numbers "
                            "are not comparable: record a baseline for this setup (scripts/nightly.sh --update-baseline)")
    return [f"{key} differs: baseline {b.get(key)!r}, new {n.get(key)!r}"
            for key in (*SETUP_KEYS, *VERSION_KEYS) if b.get(key) != n.get(key)]


def compare(baseline: Path, new: Path, tolerance: float = TOLERANCE, max_spread: float = MAX_SPREAD,
            allow_device_mismatch: bool = False) -> tuple[list[Row], list[str]]:
    """One row per benchmark in either run with its verdict, and the setup/version differences to print.

    tolerance:  normalised slowdown that is a regression (0.10 = 10%; the same speed-up is IMPROVED),
                when it also exceeds the benchmark's spread.
    max_spread: spread above which a benchmark is UNSTABLE (changes within its spread not judged).
    Raises UserError for an unreadable file, a missing calibration benchmark or a different setup.
    """
    if tolerance <= 0 or max_spread <= 0:
        raise UserError(f"tolerance {tolerance} and max spread {max_spread} must be positive (e.g. 0.10 and 0.07)")
    base_data, new_data = load(baseline), load(new)
    warnings = check_setups(base_data, new_data, allow_device_mismatch)
    base, cur = normalised(base_data, baseline), normalised(new_data, new)
    base_raw, cur_raw = raw_medians(base_data), raw_medians(new_data)
    rows = []
    for name in sorted(set(base) | set(cur)):
        if name not in base or name not in cur:
            rows.append(Row(name, base.get(name, (math.nan,))[0], cur.get(name, (math.nan,))[0],
                            math.nan, math.nan, 0.0, "NEW" if name not in base else "MISSING", tolerance))
            continue
        (b, bs, bt), (n, ns, nt) = base[name], cur[name]
        change = n / b - 1.0
        raw_change = cur_raw[name] / base_raw[name] - 1.0 if base_raw[name] > 0 else math.inf
        # a benchmark may declare a wider tolerance (benchmarks/timing.py)
        row = Row(name, b, n, change, raw_change, max(bs, ns), "OK", max(tolerance, bt, nt))
        if change > row.threshold and raw_change > row.threshold:
            row.verdict = "REGRESSED"
        elif change < -row.threshold:
            row.verdict = "IMPROVED"
        elif row.spread > max_spread:
            row.verdict = "UNSTABLE"
        rows.append(row)
    return rows, warnings


def format_rows(rows: list[Row], tolerance: float, max_spread: float) -> str:
    """The gate's report: a table, the unstable benchmarks, and a last line naming any regression."""
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'benchmark':<{width}}  {'base':>9}  {'new':>9}  {'change':>8}  {'raw':>8}  {'spread':>7}  {'tol':>4}  verdict",
             f"{'':<{width}}  (medians in calibration-kernel units; raw: change of the plain medians)"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.base:9.3f}  {r.new:9.3f}  {r.change:+8.1%}  {r.raw_change:+8.1%}  "
                     f"{r.spread:7.1%}  {r.tolerance:4.0%}  {r.verdict}")
    regressed = [r for r in rows if r.verdict == "REGRESSED"]
    unstable = [r.name for r in rows if r.verdict == "UNSTABLE"]
    kernel_only = [r.name for r in rows if r.verdict not in ("REGRESSED", "NOT_REPRODUCED") and r.change > r.threshold]
    not_reproduced = [r.name for r in rows if r.verdict == "NOT_REPRODUCED"]
    if not_reproduced:
        lines.append("flagged, but not reproduced in a fresh process (noise): " + ", ".join(not_reproduced))
    if kernel_only:
        lines.append("slower in calibration units only, raw time within tolerance (not a regression): "
                     + ", ".join(kernel_only))
    if unstable:
        lines.append(f"unstable (spread > {max_spread:.0%}: only a change beyond the spread counts): {', '.join(unstable)}")
    if regressed:
        lines.append("REGRESSED: " + "; ".join(f"{r.name} {r.change:+.1%} (tolerance {r.tolerance:.0%})"
                                               for r in regressed))
    else:
        stable = sum(r.verdict in ("OK", "IMPROVED") for r in rows)
        lines.append(f"no performance regression (tolerance {tolerance:.0%}; {stable} stable, {len(unstable)} unstable "
                     f"of {len(rows)} benchmark(s))")
    return "\n".join(lines)


def apply_confirmation(rows: list[Row], rerun: list[Row]) -> list[Row]:
    """`rows` with each REGRESSED benchmark that the rerun (a fresh process) does not find
    REGRESSED marked NOT_REPRODUCED: the nightly's final verdict, one row per benchmark."""
    confirmed = {r.name for r in rerun if r.verdict == "REGRESSED"}
    return [Row(**{**vars(r), "verdict": "NOT_REPRODUCED"}) if r.verdict == "REGRESSED" and r.name not in confirmed
            else r for r in rows]


def log_to_wandb(rows: list[Row], warnings: list[str], args) -> bool:
    """Mirror the gate's table and verdict into W&B as a `perf-gate` run (named after NEW's folder,
    so logging one night twice updates its run); W&B failures are one warning, never the exit code."""
    table = [{**vars(r), "threshold": r.threshold} for r in rows]
    regressed = [r.name for r in rows if r.verdict == "REGRESSED"]
    night = Path(args.new).resolve().parent.name
    summary = {"verdict": "REGRESSED" if regressed else "OK", "regressed": ", ".join(regressed),
               "benchmarks": len(rows), "warnings": "; ".join(warnings)}
    config = {"baseline": str(args.baseline), "new": str(args.new), "confirmed": str(args.confirmed or ""),
              "tolerance": args.tolerance, "max_spread": args.max_spread, **setup_of(load(args.new))}
    with WandbTarget.from_args(args).sink(args.wandb_dir or Path(args.new).resolve().parent) as sink:
        return sink.log_perf_gate(night, table, summary, config)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.gate BASE NEW`: print the report; 0 no regression, 1 regression, 2 bad input."""
    parser = ArgumentParser(prog="python -m benchmarks.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="slowdown that fails (0.10 = 10%%)")
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD, help="spread above which a benchmark is unstable")
    parser.add_argument("--allow-device-mismatch", action="store_true",
                        help="compare runs measured on another device/threads/clock/kernel (warns instead)")
    parser.add_argument("--regressed-ids", type=Path, metavar="PATH",
                        help="write the pytest node ids of the regressed benchmarks there (one a line), to rerun them")
    parser.add_argument("--confirmed", type=Path, metavar="RERUN.json",
                        help="the flagged benchmarks rerun in a fresh process: only regressions it confirms count")
    add_wandb_arguments(parser, "disabled", "log the table and verdict as a perf-gate W&B run (auto: online with "
                        "credentials)", project_help="W&B project of the perf-gate run")
    parser.add_argument("--wandb-dir", type=Path, default=None, metavar="DIR",
                        help="where W&B keeps its local files (default: NEW's folder)")
    args = parser.parse_args(argv)
    rows, warnings = compare(args.baseline, args.new, args.tolerance, args.max_spread, args.allow_device_mismatch)
    if args.confirmed:
        rerun, _ = compare(args.baseline, args.confirmed, args.tolerance, args.max_spread, args.allow_device_mismatch)
        rows = apply_confirmation(rows, rerun)
    for warning in warnings:
        print(f"warning: {warning}")
    print(format_rows(rows, args.tolerance, args.max_spread))
    regressed = [r.name for r in rows if r.verdict == "REGRESSED"]
    if args.regressed_ids:
        ids = node_ids(load(args.new))
        args.regressed_ids.write_text("".join(f"{ids.get(name, name)}\n" for name in regressed))
    if args.wandb != "disabled":
        log_to_wandb(rows, warnings, args)
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())
