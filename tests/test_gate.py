"""The nightly benchmark gate (benchmarks/gate.py) on synthetic pytest-benchmark JSON files."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import baseline, gate
from benchmarks.timing import group_spread, injected_slowdown
from ganlib.errors import UserError

SETUP = {"device": "cpu Test CPU x2", "threads": 1, "allocator": "keep", "clock": "process_time", "calibration": "kernel v1",
         "torch": "2.14.1", "cuda": None}


def bench(name: str, normalised: float | None = None, spread: float = 0.02, median: float | None = None,
          **info) -> dict:
    """One pytest-benchmark entry as benchmarks/timing.measure() writes it (by default the raw median
    moves with the normalised one: a machine of unchanged speed)."""
    if median is None:
        median = normalised / 1000 if normalised is not None else 0.01
    extra = {**SETUP, "spread": spread, "median_s": median, **info}
    if normalised is not None:
        extra["normalised"] = normalised
    return {"name": name, "stats": {"median": median, "min": median * 0.9, "max": median * 1.2}, "extra_info": extra}


def run_file(tmp_path, label: str, benchmarks: list[dict], calib_median: float | None = 0.002, **setup) -> str:
    """A run's JSON file; `setup` overrides SETUP keys in every entry (one run, one setup)."""
    entries = list(benchmarks)
    if calib_median is not None:
        entries.insert(0, bench(gate.CALIBRATION, median=calib_median))
    for entry in entries:
        entry["extra_info"].update(setup)
    path = tmp_path / f"{label}.json"
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": entries}))
    return str(path)


def verdicts(rows) -> dict[str, str]:
    return {r.name: r.verdict for r in rows}


def test_unchanged_run_passes(tmp_path, capsys):
    runs = [run_file(tmp_path, label, [bench("step", 10.0), bench("fid", 50.0)]) for label in ("base", "new")]
    rows, warnings = gate.compare(*runs)
    assert verdicts(rows) == {"step": "OK", "fid": "OK"} and warnings == []
    assert gate.main(runs) == 0
    assert "no performance regression" in capsys.readouterr().out


def test_regression_is_named_and_fails(tmp_path, capsys):
    base = run_file(tmp_path, "base", [bench("step", 10.0), bench("fid", 50.0)])
    new = run_file(tmp_path, "new", [bench("step", 13.0), bench("fid", 50.5)])
    rows, _ = gate.compare(base, new)
    assert verdicts(rows) == {"step": "REGRESSED", "fid": "OK"}
    assert next(r for r in rows if r.name == "step").change == pytest.approx(0.3)
    assert gate.main([base, new]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("REGRESSED: step +30.0%")


def test_regressed_ids_name_the_benchmarks_to_rerun(tmp_path):
    step = {**bench("test_step[a]", 10.0), "fullname": "benchmarks/test_step.py::test_step[a]"}
    base = run_file(tmp_path, "base", [step, bench("fid", 50.0)])
    new = run_file(tmp_path, "new", [{**step, "extra_info": {**step["extra_info"], "normalised": 14.0, "median_s": 0.014}},
                                     bench("fid", 50.0)])
    ids = tmp_path / "regressed.txt"
    assert gate.main([base, new, "--regressed-ids", str(ids)]) == 1
    assert ids.read_text() == "benchmarks/test_step.py::test_step[a]\n"
    assert gate.main([base, base, "--regressed-ids", str(ids)]) == 0
    assert ids.read_text() == ""


def test_tolerance_is_the_boundary(tmp_path):
    base = run_file(tmp_path, "base", [bench("step", 10.0)])
    new = run_file(tmp_path, "new", [bench("step", 10.8)])
    assert verdicts(gate.compare(base, new)[0]) == {"step": "OK"}
    assert verdicts(gate.compare(base, new, tolerance=0.05)[0]) == {"step": "REGRESSED"}


def test_benchmark_declared_tolerance_widens_its_gate(tmp_path):
    base = run_file(tmp_path, "base", [bench("draw", 1.0, tolerance=0.25), bench("step", 10.0)])
    within = run_file(tmp_path, "within", [bench("draw", 1.2, tolerance=0.25), bench("step", 12.0)])
    beyond = run_file(tmp_path, "beyond", [bench("draw", 1.3, tolerance=0.25), bench("step", 10.0)])
    assert verdicts(gate.compare(base, within)[0]) == {"draw": "OK", "step": "REGRESSED"}
    rows, _ = gate.compare(base, beyond, tolerance=0.05)  # a tighter gate does not undercut the benchmark's own
    assert verdicts(rows) == {"draw": "REGRESSED", "step": "OK"}
    assert next(r for r in rows if r.name == "draw").tolerance == 0.25


def test_slower_in_calibration_units_only_is_not_a_regression(tmp_path, capsys):
    # The calibration kernel sped up, the benchmark's own time did not move: the kernel, not our code.
    base = run_file(tmp_path, "base", [bench("step", 10.0, median=0.010)])
    new = run_file(tmp_path, "new", [bench("step", 13.0, median=0.0101)])
    (row,), _ = gate.compare(base, new)
    assert row.verdict == "OK" and row.change == pytest.approx(0.3) and row.raw_change == pytest.approx(0.01)
    assert gate.main([base, new]) == 0
    assert "slower in calibration units only" in capsys.readouterr().out
    slower = run_file(tmp_path, "slower", [bench("step", 13.0, median=0.0125)])  # and 25% slower raw
    assert verdicts(gate.compare(base, slower)[0]) == {"step": "REGRESSED"}


def test_improvement_does_not_fail(tmp_path):
    base = run_file(tmp_path, "base", [bench("step", 10.0)])
    new = run_file(tmp_path, "new", [bench("step", 7.0)])
    assert verdicts(gate.compare(base, new)[0]) == {"step": "IMPROVED"}
    assert gate.main([base, new]) == 0


def test_unstable_change_within_its_spread_is_not_judged(tmp_path, capsys):
    base = run_file(tmp_path, "base", [bench("step", 10.0, spread=0.03)])
    new = run_file(tmp_path, "new", [bench("step", 11.5, spread=0.20)])  # +15%, but noise of 20%
    assert verdicts(gate.compare(base, new)[0]) == {"step": "UNSTABLE"}
    assert gate.main([base, new]) == 0
    assert "unstable (spread > 7%" in capsys.readouterr().out


def test_unstable_benchmark_still_fails_beyond_its_spread(tmp_path):
    base = run_file(tmp_path, "base", [bench("step", 10.0, spread=0.12)])
    new = run_file(tmp_path, "new", [bench("step", 13.0, spread=0.09)])  # +30% > its 12% noise
    assert verdicts(gate.compare(base, new)[0]) == {"step": "REGRESSED"}


def test_small_change_of_a_stable_benchmark_is_ok_and_spread_bound_configurable(tmp_path):
    base = run_file(tmp_path, "base", [bench("step", 10.0, spread=0.05)])
    new = run_file(tmp_path, "new", [bench("step", 10.3, spread=0.06)])
    assert verdicts(gate.compare(base, new)[0]) == {"step": "OK"}
    assert verdicts(gate.compare(base, new, max_spread=0.04)[0]) == {"step": "UNSTABLE"}


def test_device_mismatch_is_refused(tmp_path):
    base = run_file(tmp_path, "base", [bench("step", 10.0)])
    new = run_file(tmp_path, "new", [bench("step", 10.0)], device="NVIDIA H100 80GB HBM3")
    with pytest.raises(UserError, match="device 'cpu Test CPU x2'.*'NVIDIA H100 80GB HBM3'.*--update-baseline"):
        gate.compare(base, new)
    rows, warnings = gate.compare(base, new, allow_device_mismatch=True)
    assert verdicts(rows) == {"step": "OK"} and any("device differs" in w for w in warnings)
    with pytest.raises(SystemExit) as exit_info:
        gate.main([base, new])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("key,value", [("threads", 2), ("allocator", "default"), ("clock", "perf_counter"),
                                       ("calibration", "kernel v2")])
def test_other_measurement_setup_is_refused(tmp_path, key, value):
    base = run_file(tmp_path, "base", [bench("step", 10.0)])
    new = run_file(tmp_path, "new", [bench("step", 10.0)], **{key: value})
    with pytest.raises(UserError, match=key):
        gate.compare(base, new)


def test_other_torch_version_is_compared_with_a_warning(tmp_path, capsys):
    base = run_file(tmp_path, "base", [bench("step", 10.0)])
    new = run_file(tmp_path, "new", [bench("step", 10.0)], torch="2.15.0")
    rows, warnings = gate.compare(base, new)
    assert verdicts(rows) == {"step": "OK"} and warnings == ["torch differs: baseline '2.14.1', new '2.15.0'"]
    assert gate.main([base, new]) == 0
    assert "warning: torch differs" in capsys.readouterr().out


@pytest.mark.parametrize("side", ["base", "new"])
def test_missing_calibration_is_refused(tmp_path, side):
    files = {label: run_file(tmp_path, label, [bench("step", 10.0)], calib_median=None if label == side else 0.002)
             for label in ("base", "new")}
    with pytest.raises(UserError, match=f"{side}.json: has no {gate.CALIBRATION}"):
        gate.compare(files["base"], files["new"])


def test_benchmark_without_interleaved_ratio_is_normalised_by_the_calibration(tmp_path):
    # Same raw median on a machine twice as slow (calibration 2x): the normalised median halves.
    base = run_file(tmp_path, "base", [bench("plain", median=0.010)], calib_median=0.001)
    new = run_file(tmp_path, "new", [bench("plain", median=0.010)], calib_median=0.002)
    (row,), _ = gate.compare(base, new)
    assert (row.base, row.new, row.verdict) == (pytest.approx(10.0), pytest.approx(5.0), "IMPROVED")


def test_new_and_missing_benchmarks_are_listed_not_failed(tmp_path):
    base = run_file(tmp_path, "base", [bench("old", 10.0), bench("kept", 5.0)])
    new = run_file(tmp_path, "new", [bench("kept", 5.0), bench("added", 3.0)])
    rows, _ = gate.compare(base, new)
    assert verdicts(rows) == {"added": "NEW", "kept": "OK", "old": "MISSING"}
    assert math.isnan(next(r for r in rows if r.name == "added").change)
    assert gate.main([base, new]) == 0


def test_unreadable_file_is_a_user_error(tmp_path):
    good = run_file(tmp_path, "good", [bench("step", 10.0)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not a readable pytest-benchmark JSON"):
        gate.compare(good, str(bad))
    (tmp_path / "other.json").write_text(json.dumps({"results": []}))
    with pytest.raises(UserError, match="no 'benchmarks' list"):
        gate.compare(good, str(tmp_path / "other.json"))


def test_group_spread_is_range_of_group_medians():
    values = [1.0] * 4 + [1.1] * 4 + [1.0] * 4 + [1.05] * 4 + [1.0] * 4
    assert group_spread(values, groups=5) == pytest.approx(0.1)
    assert group_spread([2.0] * 10) == 0.0


def test_injected_slowdown_matches_exact_names_and_globs(monkeypatch):
    name = "test_train_step[dcgan28-finetune-fp32]"
    monkeypatch.setenv("GANBENCH_BENCH_SLOWDOWN", f"{name}=0.3")
    assert injected_slowdown(name) == 0.3  # exact, although [..] is a character class to fnmatch
    monkeypatch.setenv("GANBENCH_BENCH_SLOWDOWN", "*dcgan28-finetune*=0.25")
    assert injected_slowdown(name) == 0.25
    assert injected_slowdown("test_train_step[mlp28-finetune-fp32]") == 0.0
    monkeypatch.delenv("GANBENCH_BENCH_SLOWDOWN")
    assert injected_slowdown(name) == 0.0


def test_baseline_takes_each_benchmarks_median_run(tmp_path):
    runs = [run_file(tmp_path, f"run{i}", [bench("step", step), bench("fid", fid)], calib_median=calib)
            for i, (step, fid, calib) in enumerate([(10.0, 52.0, 0.003), (12.0, 50.0, 0.001), (11.0, 60.0, 0.002)])]
    merged = baseline.merge(runs)
    by_name = {b["name"]: b for b in merged["benchmarks"]}
    assert by_name["step"]["extra_info"]["normalised"] == 11.0
    assert by_name["fid"]["extra_info"]["normalised"] == 52.0
    assert by_name["step"]["extra_info"]["baseline_values"] == [10.0, 12.0, 11.0]
    assert gate.median_seconds(by_name[gate.CALIBRATION]) == 0.002
    out = tmp_path / "baseline.json"
    assert baseline.main([str(out), *runs]) == 0
    rows, _ = gate.compare(str(out), runs[1])  # a merged baseline is an ordinary run file for the gate
    assert verdicts(rows) == {"step": "OK", "fid": "OK"}


def test_baseline_refuses_runs_measured_differently(tmp_path):
    one = run_file(tmp_path, "one", [bench("step", 10.0)])
    other = run_file(tmp_path, "other", [bench("step", 10.0)], threads=2)
    with pytest.raises(UserError, match="other.json: .*threads"):
        baseline.merge([one, other])


def test_perf_gate_run_in_wandb_holds_the_rows_and_the_confirmed_verdict(tmp_path, monkeypatch):
    wandb_sink_test = pytest.importorskip("test_wandb_sink")  # its reader of the offline .wandb files
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("RANK", raising=False)
    night = tmp_path / "nightly-20261130"
    night.mkdir()
    base = run_file(tmp_path, "base", [bench("step", 10.0), bench("fid", 50.0), bench("data", 5.0)])
    new = run_file(night, "new", [bench("step", 13.0), bench("fid", 60.0), bench("data", 5.0)])
    rerun = run_file(night, "rerun", [bench("step", 13.5), bench("fid", 50.2)])  # fid was noise
    assert gate.main([base, new, "--confirmed", rerun, "--wandb", "offline"]) == 1

    [run] = wandb_sink_test.offline_runs(night).values()
    assert (run["name"], run["group"], run["job_type"]) == ("perf-gate-nightly-20261130", "perf-gate", "perf-gate")
    assert run["exit_code"] == 1 and run["summary"]["verdict"] == "REGRESSED"
    assert run["summary"]["regressed"] == "step"
    table = json.loads((run["dir"] / "files" / run["summary"]["gate/path"]).read_text())
    got = {row[table["columns"].index("name")]: dict(zip(table["columns"], row)) for row in table["data"]}
    expected, _ = gate.compare(base, new)
    assert set(got) == {r.name for r in expected} == {"step", "fid", "data"}
    for r in expected:
        assert got[r.name]["new"] == pytest.approx(r.new) and got[r.name]["change"] == pytest.approx(r.change)
    assert {n: row["verdict"] for n, row in got.items()} == {"step": "REGRESSED", "fid": "NOT_REPRODUCED",
                                                             "data": "OK"}
    assert run["summary"]["gate/step/change"] == pytest.approx(0.3)
    assert run["config"]["device"] == SETUP["device"]
