"""The nightly performance gate: compare two pytest-benchmark JSON files, calibrated and noise-aware.

Raw seconds move with the machine's speed that night (other tenants, clocks, thermal state), so
every benchmark's median is divided by the median of the in-run calibration kernel (a fixed
matmul, `test_calibration_matmul`) before two runs are compared. Like TorchBench's stability
check, a benchmark whose own spread ((max - min) / min of its round-group medians, recorded in
extra_info["spread"]) exceeds 7% in either run is reported as unstable instead of gated on.
A baseline recorded on a different device is refused.

    python -m benchmarks.gate BASELINE.json NEW.json [--tolerance 0.10] [--max-spread 0.07]
Exit code: 0 no regression, 1 regression (named), 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ganlib.errors import UserError, exit_on_user_error

CALIBRATION = "test_calibration_matmul"  # the benchmark whose median sets the machine's speed
TOLERANCE = 0.10                         # slowdown (normalised median) that counts as a regression
MAX_SPREAD = 0.07                        # TorchBench-style stability bound on a benchmark's spread


@dataclass
class Row:
    name: str
    base: float          # normalised median (benchmark median / calibration median)
    new: float
    change: float        # new / base - 1 (positive = slower)
    spread: float        # the larger spread of the two runs
    verdict: str         # OK | REGRESSED | IMPROVED | UNSTABLE | NEW | MISSING


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable pytest-benchmark JSON file ({err.__class__.__name__})") from None
    if "benchmarks" not in data:
        raise UserError(f"{path}: no 'benchmarks' list; write it with pytest --benchmark-json")
    return data


def device_of(data: dict) -> str:
    """The device a run measured on, as the benchmarks recorded it (CPU model or GPU name)."""
    for bench in data["benchmarks"]:
        device = bench.get("extra_info", {}).get("device")
        if device:
            return device
    return data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown")


def normalised(data: dict, path: Path) -> dict[str, tuple[float, float]]:
    """name -> (median / calibration median, spread)."""
    by_name = {b["name"]: b for b in data["benchmarks"]}
    calib = next((b for n, b in by_name.items() if n.startswith(CALIBRATION)), None)
    if calib is None:
        raise UserError(f"{path}: has no {CALIBRATION} benchmark to normalise by; run the whole suite")
    scale = calib["stats"]["median"]
    out = {}
    for name, bench in by_name.items():
        if name.startswith(CALIBRATION):
            continue
        spread = bench.get("extra_info", {}).get("spread")
        if spread is None:
            stats = bench["stats"]
            spread = (stats["max"] - stats["min"]) / stats["min"] if stats["min"] > 0 else 0.0
        out[name] = (bench["stats"]["median"] / scale, float(spread))
    return out


def compare(baseline: Path, new: Path, tolerance: float = TOLERANCE, max_spread: float = MAX_SPREAD,
            allow_device_mismatch: bool = False) -> list[Row]:
    base_data, new_data = load(baseline), load(new)
    if device_of(base_data) != device_of(new_data) and not allow_device_mismatch:
        raise UserError(f"baseline was measured on {device_of(base_data)!r}, this run on {device_of(new_data)!r}; "
                        "record a baseline on this device (scripts/nightly.sh --update-baseline)")
    base, cur = normalised(base_data, baseline), normalised(new_data, new)
    rows = []
    for name in sorted(set(base) | set(cur)):
        if name not in base or name not in cur:
            rows.append(Row(name, base.get(name, (float("nan"), 0))[0], cur.get(name, (float("nan"), 0))[0],
                            float("nan"), 0.0, "NEW" if name not in base else "MISSING"))
            continue
        (b, bs), (n, ns) = base[name], cur[name]
        change = n / b - 1.0
        spread = max(bs, ns)
        if spread > max_spread:
            verdict = "UNSTABLE"
        elif change > tolerance:
            verdict = "REGRESSED"
        elif change < -tolerance:
            verdict = "IMPROVED"
        else:
            verdict = "OK"
        rows.append(Row(name, b, n, change, spread, verdict))
    return rows


def format_rows(rows: list[Row], tolerance: float, max_spread: float) -> str:
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'benchmark':<{width}}  {'base':>9}  {'new':>9}  {'change':>8}  {'spread':>7}  verdict",
             f"{'':<{width}}  (medians in calibration-kernel units)"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.base:9.3f}  {r.new:9.3f}  {r.change:+8.1%}  {r.spread:7.1%}  {r.verdict}")
    regressed = [r for r in rows if r.verdict == "REGRESSED"]
    unstable = [r.name for r in rows if r.verdict == "UNSTABLE"]
    if unstable:
        lines.append(f"unstable (spread > {max_spread:.0%}, not gated): {', '.join(unstable)}")
    if regressed:
        lines.append("REGRESSED: " + "; ".join(f"{r.name} {r.change:+.1%}" for r in regressed)
                     + f" (tolerance {tolerance:.0%})")
    else:
        lines.append(f"no performance regression (tolerance {tolerance:.0%}, {len(rows)} benchmark(s))")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="slowdown that fails (0.10 = 10%%)")
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD, help="spread above which a benchmark is unstable")
    parser.add_argument("--allow-device-mismatch", action="store_true")
    args = parser.parse_args(argv)
    rows = compare(args.baseline, args.new, args.tolerance, args.max_spread, args.allow_device_mismatch)
    print(format_rows(rows, args.tolerance, args.max_spread))
    return 1 if any(r.verdict == "REGRESSED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
