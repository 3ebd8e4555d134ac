"""A nightly baseline from several runs of the suite: per benchmark, the run with the median value.

One run can land high or low for a whole benchmark: on a shared machine some move by up to ~10%
from one process to the next. A baseline from one run carries that error into every later
comparison. Taking each benchmark's median over a few runs keeps it out.

    python -m benchmarks.baseline OUT.json RUN1.json RUN2.json [RUN3.json ...]

The runs must share one measurement setup (device, threads, allocator, clock, calibration kernel).
OUT.json is a pytest-benchmark file like the runs. Each benchmark entry comes whole from the run
that gave the median (the lower one of the middle two for an even count), with
`extra_info["baseline_values"]` listing what each run gave.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from benchmarks import gate
from ganlib.config import ArgumentParser
from ganlib.errors import UserError, exit_on_user_error


def _value(bench: dict, calibration_median: float) -> float:
    """The number the gate compares: the interleaved ratio, else median / the run's calibration median."""
    info = bench.get("extra_info") or {}
    if info.get("normalised") is not None:
        return float(info["normalised"])
    return gate.median_seconds(bench) / calibration_median


def merge(paths: list[Path]) -> dict:
    """The baseline of `paths` (pytest-benchmark JSON files), as a pytest-benchmark JSON dict."""
    if not paths:
        raise UserError("no runs to merge; pass at least one pytest-benchmark JSON file")
    runs = [gate.load(path) for path in paths]
    for path, run in zip(paths[1:], runs[1:]):
        try:
            gate.check_setups(runs[0], run)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    for path, run in zip(paths, runs):
        gate.normalised(run, path)  # each run must hold the calibration benchmark
    calibrations = []
    for run in runs:
        calib = next(b for b in run["benchmarks"] if b["name"].startswith(gate.CALIBRATION))
        calibrations.append((gate.median_seconds(calib), calib))
    names = list(dict.fromkeys(b["name"] for run in runs for b in run["benchmarks"]))

    by_speed = sorted(range(len(runs)), key=lambda i: calibrations[i][0])
    calib_run = by_speed[(len(runs) - 1) // 2]  # the run of median calibration speed
    merged = []
    for name in names:
        if name.startswith(gate.CALIBRATION):
            candidates = [(calibrations[i][0], i, calibrations[i][1]) for i in range(len(runs))]
        else:
            candidates = [(_value(b, calibrations[i][0]), i, b) for i, run in enumerate(runs)
                          for b in run["benchmarks"] if b["name"] == name]
        interleaved = all((b.get("extra_info") or {}).get("normalised") is not None for _, _, b in candidates)
        if name.startswith(gate.CALIBRATION) or interleaved:
            chosen = sorted(candidates, key=lambda c: c[0])
            _, _, bench = chosen[(len(chosen) - 1) // 2]
        else:  # normalised by the calibration benchmark: keep it with the calibration it was measured against
            _, _, bench = next((c for c in candidates if c[1] == calib_run), candidates[0])
        bench = copy.deepcopy(bench)
        bench.setdefault("extra_info", {})["baseline_values"] = [c[0] for c in candidates]
        merged.append(bench)
    out = copy.deepcopy(runs[calib_run])
    out["benchmarks"] = merged
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.baseline OUT RUN...`: write the merged baseline; 0 ok, 2 bad input."""
    parser = ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(merge(args.runs), indent=4) + "\n")
    print(f"baseline of {len(args.runs)} run(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
