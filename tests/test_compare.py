"""Tests for bench/compare.py: the nightly regression gate over two run directories."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from bench.compare import FID, MEMORY, THROUGHPUT, compare_runs, format_comparison, main_compare

TARGET_SHARE, MEMORISED = "transfer/target_class_share", "transfer/memorised_share"
from fakes import fake_env, fake_record, pair_name
from ganlib.errors import UserError

PAIR = pair_name(0)
# cell (without seed) -> (img/s, peak mem GB, FID) around which seeds scatter
CELLS = {
    f"finetune-{PAIR}-cpu-1proc": (812.0, 1.20, 40.0),
    f"freeze_d-{PAIR}-cpu-1proc": (950.0, 1.05, 45.0),
    f"finetune-{PAIR}-cpu-2proc": (1500.0, 2.40, 41.0),
}
SEEDS = (0, 1, 2)


def _record(cell, seed, metrics, status="ok", reason=None, devices=None, torch="2.14.1"):
    """One record as `bench run` writes it (tests/fakes.py builds it with bench.cell's builders),
    carrying these metrics; devices/torch replace the environment's."""
    strategy, setup = cell.split("-", 1)[0], "-".join(cell.rsplit("-", 2)[1:])
    rec = fake_record(strategy, 0, setup, seed, status=status, reason=reason)
    rec["metrics"] = metrics
    rec["env"]["torch"] = torch
    if devices is not None:
        rec["env"]["devices"] = list(devices)
    return rec


def _metrics(img_per_s, mem_gb, fid):
    return {THROUGHPUT: img_per_s, "timing/step_time_p50_ms": 78.1, MEMORY: mem_gb,
            "resources/mem_kind": "cpu_peak_rss", FID: fid, "quality/kid_mean": 0.01}


def write_run(run_dir, noise_seed=0, scale=None, failed=(), drop=(), seeds=SEEDS, shares=None, **env):
    """Write a run: every cell x seed with ~1% noise on throughput/memory and ~0.3 on FID.

    scale: {cell: (img_per_s factor, mem factor, fid offset)}; failed: cells whose seeds all
    fail; drop: cells left out of the run; shares: {cell: (target-class share, memorised share)}
    with ~0.01 noise (cells absent: no transfer metrics); env: passed to every record's env block.
    """
    rng = random.Random(noise_seed)
    scale = scale or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for cell, (tp, mem, fid) in CELLS.items():
        if cell in drop:
            continue
        f_tp, f_mem, d_fid = scale.get(cell, (1.0, 1.0, 0.0))
        for seed in seeds:
            if cell in failed:
                rec = _record(cell, seed, {}, status="failed", reason="CUDA out of memory", **env)
            else:
                m = _metrics(tp * f_tp * rng.gauss(1, 0.01), mem * f_mem * rng.gauss(1, 0.005),
                             fid + d_fid + rng.gauss(0, 0.3))
                if shares and cell in shares:
                    m[TARGET_SHARE] = shares[cell][0] + rng.gauss(0, 0.01)
                    m[MEMORISED] = shares[cell][1] + rng.gauss(0, 0.01)
                rec = _record(cell, seed, m, **env)
            lines.append(json.dumps(rec))
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def _cell(cmp, name):
    return next(c for c in cmp.cells if c.cell == name)


A, B, C = CELLS


def test_identical_runs_pass(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    assert main_compare([str(base), str(base)]) == 0
    out = capsys.readouterr().out
    assert "no regressions (3 cell(s) compared)" in out
    assert all(name in out for name in CELLS)


def test_aggregates_over_seeds_with_mean_and_std(tmp_path):
    base = write_run(tmp_path / "base")
    cmp = compare_runs(base, base)
    records = [json.loads(l) for l in (base / "results.jsonl").read_text().splitlines()]
    fids = [r["metrics"][FID] for r in records if r["cell_id"].startswith(A + "-s")]
    stats = _cell(cmp, A).metrics[FID].base
    assert stats.n == 3
    assert stats.mean == pytest.approx(statistics.fmean(fids))
    assert stats.std == pytest.approx(statistics.stdev(fids))


def test_noise_within_spread_passes(tmp_path):
    base = write_run(tmp_path / "base", noise_seed=0)
    new = write_run(tmp_path / "new", noise_seed=1)
    cmp = compare_runs(base, new)
    assert not cmp.regressed
    assert {c.verdict for c in cmp.cells} == {"OK"}


def test_fid_worse_by_several_spreads_is_flagged(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", noise_seed=1, scale={B: (1.0, 1.0, 4.0)})
    assert main_compare([str(base), str(new)]) == 1
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("REGRESSED 1 cell(s)") and B in summary and "fid" in summary
    cmp = compare_runs(base, new)
    assert _cell(cmp, B).verdict == "REGRESSED"
    assert _cell(cmp, B).regressions == [FID]
    assert _cell(cmp, B).metrics[FID].change > 2.0
    assert _cell(cmp, A).verdict == "OK"


@pytest.mark.parametrize("factor, flagged", [(0.85, True), (0.95, False)])
def test_throughput_drop(tmp_path, factor, flagged):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", scale={A: (factor, 1.0, 0.0)})
    cmp = compare_runs(base, new)
    assert (THROUGHPUT in _cell(cmp, A).regressions) is flagged
    assert cmp.regressed is flagged
    assert _cell(cmp, A).metrics[THROUGHPUT].change == pytest.approx(factor - 1, abs=0.02)


def test_memory_growth_flagged(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", scale={C: (1.0, 1.15, 0.0)})
    assert main_compare([str(base), str(new)]) == 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert C in summary and "peak_mem_gb +15" in summary


def test_improvement_is_not_a_regression(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", scale={A: (1.3, 0.8, -5.0)})
    cmp = compare_runs(base, new)
    assert _cell(cmp, A).verdict == "IMPROVED"
    assert not cmp.regressed


def test_newly_failed_cell_is_a_regression(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", failed=(C,))
    assert main_compare([str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert "newly failed" in out and "CUDA out of memory" in out
    cmp = compare_runs(base, new)
    assert _cell(cmp, C).verdict == "FAILED"
    assert _cell(cmp, C).regressions == ["status"]


def test_one_failed_seed_fails_the_cell(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")
    lines = (new / "results.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec.update(status="failed", reason="NaN loss at step 40", metrics={})
    (new / "results.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    assert _cell(compare_runs(base, new), A).verdict == "FAILED"


def test_retried_seed_uses_its_latest_record(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")
    lines = (new / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    failed = dict(first, status="failed", reason="preempted", metrics={})
    # the failed attempt was written first, the resumed run appended the successful retry
    (new / "results.jsonl").write_text("\n".join([json.dumps(failed), *lines]) + "\n")
    cmp = compare_runs(base, new)
    assert _cell(cmp, A).verdict == "OK" and _cell(cmp, A).new_seeds == 3


def test_failed_in_both_is_reported_but_passes(tmp_path):
    base = write_run(tmp_path / "base", failed=(C,))
    new = write_run(tmp_path / "new", failed=(C,))
    cmp = compare_runs(base, new)
    assert _cell(cmp, C).verdict == "FAILED"
    assert not cmp.regressed


def test_missing_and_new_cells_reported(tmp_path, capsys):
    base = write_run(tmp_path / "base", drop=(C,))
    new = write_run(tmp_path / "new", drop=(B,))
    assert main_compare([str(base), str(new)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith(tuple(CELLS))}
    assert rows == {A: "OK", B: "MISSING", C: "NEW"}


def test_single_seed_noise_below_floor_passes(tmp_path):
    # std is 0 with one seed: the 1% floor on the spread keeps a 0.5-FID wobble (~1.2%) from flagging
    base = write_run(tmp_path / "base", seeds=(0,))
    new = write_run(tmp_path / "new", seeds=(0,), scale={A: (1.0, 1.0, 0.5)})
    cmp = compare_runs(base, new)
    change = _cell(cmp, A).metrics[FID]
    assert change.spread == pytest.approx(0.01 * change.base.mean)
    assert not cmp.regressed
    worse = write_run(tmp_path / "worse", seeds=(0,), scale={A: (1.0, 1.0, 3.0)})
    assert FID in _cell(compare_runs(base, worse), A).regressions


def test_device_mismatch_refused_unless_allowed(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", devices=("NVIDIA H100 80GB HBM3",))
    with pytest.raises(UserError, match="device kind differs"):
        compare_runs(base, new)
    with pytest.raises(SystemExit) as exc:
        main_compare([str(base), str(new)])
    assert exc.value.code == 2
    assert "--allow-device-mismatch" in capsys.readouterr().err
    cmp = compare_runs(base, new, allow_device_mismatch=True)
    assert any("device kind differs" in w for w in cmp.warnings)
    assert format_comparison(cmp).startswith("warning: ")


def test_device_count_or_torch_difference_only_warns(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", devices=fake_env(1)["devices"] * 3, torch="2.14.2")  # same kind, more
    cmp = compare_runs(base, new)
    assert not cmp.regressed
    assert any(w.startswith("env.torch differs: baseline 2.14.1, new 2.14.2") for w in cmp.warnings)
    assert any(w.startswith("env.devices differs") for w in cmp.warnings)


def test_json_output_matches_verdicts(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", scale={A: (0.8, 1.0, 0.0)})
    out_path = tmp_path / "reports" / "cmp.json"
    assert main_compare([str(base), str(new), "--json", str(out_path)]) == 1
    data = json.loads(out_path.read_text())
    assert data["regressed"] is True
    verdicts = {c["cell"]: c["verdict"] for c in data["cells"]}
    assert verdicts == {A: "REGRESSED", B: "OK", C: "OK"}
    assert data["cells"][0]["regressions"] == [THROUGHPUT]


def test_tolerance_flag_changes_the_gate(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new", scale={A: (0.85, 1.0, 0.0)})
    assert main_compare([str(base), str(new), "--throughput-tol", "0.25"]) == 0


def _bad_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.jsonl").write_text("\n")
    no_results = tmp_path / "no_results"
    no_results.mkdir()
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "results.jsonl").write_text("{not json\n")
    return {"missing": tmp_path / "nope", "no_results": no_results, "empty": empty, "garbled": garbled}


@pytest.mark.filterwarnings("ignore:.*skipping an unreadable line")
@pytest.mark.parametrize("which", ["missing", "no_results", "empty", "garbled"])
def test_bad_run_dir_exits_2_with_one_line(tmp_path, capsys, which):
    good = write_run(tmp_path / "good")
    bad = _bad_dirs(tmp_path)[which]
    for argv in ([str(bad), str(good)], [str(good), str(bad)]):
        with pytest.raises(SystemExit) as exc:
            main_compare(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(bad.name) in err


def test_no_cells_in_common_is_a_user_error(tmp_path):
    base = write_run(tmp_path / "base", drop=(B, C))
    new = write_run(tmp_path / "new", drop=(A,))
    with pytest.raises(UserError, match="no cells in common"):
        compare_runs(base, new)


def test_skipped_seed_leaves_the_cell_compared_on_its_ok_seeds(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")
    lines = (new / "results.jsonl").read_text().splitlines()
    skipped = dict(json.loads(lines[0]), status="skipped", reason="setup needs 2 GPUs", metrics={})
    (new / "results.jsonl").write_text("\n".join([json.dumps(skipped), *lines[1:]]) + "\n")
    cell = _cell(compare_runs(base, new), A)
    assert (cell.verdict, cell.base_seeds, cell.new_seeds) == ("OK", 3, 2)
    assert cell.metrics[FID].new.n == 2


SHARES = {A: (0.92, 0.10), B: (0.95, 0.08), C: (0.90, 0.12)}


@pytest.mark.parametrize("new_shares, verdict, words", [
    ({**SHARES, A: (0.70, 0.10)}, "REGRESSED", "target_class_share -0.2"),   # left the target less
    ({**SHARES, A: (0.92, 0.40)}, "REGRESSED", "memorised_share +0.3"),      # copies more
    ({**SHARES, A: (0.99, 0.01)}, "IMPROVED", ""),
    ({**SHARES, A: (0.90, 0.12)}, "OK", ""),                                # within 0.05 points
])
def test_transfer_shares_are_gated_with_their_direction(tmp_path, capsys, new_shares, verdict, words):
    base = write_run(tmp_path / "base", shares=SHARES)
    new = write_run(tmp_path / "new", noise_seed=1, shares=new_shares)
    assert main_compare([str(base), str(new)]) == (1 if verdict == "REGRESSED" else 0)
    out = capsys.readouterr().out
    assert _cell(compare_runs(base, new), A).verdict == verdict
    assert words in out and "target classes base -> new" in out


def test_share_tolerance_flag_and_runs_without_shares(tmp_path):
    base = write_run(tmp_path / "base", shares=SHARES)
    new = write_run(tmp_path / "new", noise_seed=1, shares={**SHARES, A: (0.80, 0.10)})
    assert main_compare([str(base), str(new), "--share-tol", "0.2"]) == 0
    assert compare_runs(base, new).regressed
    older = write_run(tmp_path / "older")  # a baseline from before the transfer metrics
    cmp = compare_runs(older, new)
    assert not cmp.regressed and _cell(cmp, A).metrics[TARGET_SHARE].change is None
    with pytest.raises(UserError, match="share tolerance 1.5"):
        compare_runs(base, new, share_tol=1.5)


# --- the gate fails closed ------------------------------------------------------------------------

def _edit_records(run_dir, edit):
    """Rewrite results.jsonl, passing each record through `edit(record)`."""
    path = run_dir / "results.jsonl"
    records = [edit(json.loads(line)) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("key", [FID, THROUGHPUT, MEMORY])
def test_missing_or_non_finite_gated_metric_in_the_new_run_is_a_regression(tmp_path, capsys, key, value):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")

    def lose_metric(record):
        if record["cell_id"] == f"{B}-s1":
            if value is None:
                record["metrics"].pop(key)
            else:
                record["metrics"][key] = value
        return record

    _edit_records(new, lose_metric)
    cell = _cell(compare_runs(base, new), B)
    assert cell.regressions == [key] and cell.verdict == "REGRESSED"
    assert main_compare([str(base), str(new)]) == 1
    assert "not measurable (new seed 1:" in capsys.readouterr().out


def test_cell_run_with_another_config_is_not_compared_and_fails_the_gate(tmp_path, capsys):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")

    def more_steps(record):
        record["config"] = {"seed": record["seed"], "out": f"/elsewhere/{record['cell_id']}",
                            "transfer": {"steps": 400 if record["cell_id"].startswith(C) else 300}}
        return record

    _edit_records(new, more_steps)
    _edit_records(base, lambda r: dict(r, config={"seed": r["seed"], "out": "/here", "transfer": {"steps": 300}}))
    cmp = compare_runs(base, new)
    assert _cell(cmp, C).verdict == "CONFIG" and _cell(cmp, C).metrics == {}
    assert "transfer.steps 300 -> 400" in _cell(cmp, C).note
    assert [_cell(cmp, name).verdict for name in (A, B)] == ["OK", "OK"]  # where configs match (out, seed aside)
    assert main_compare([str(base), str(new)]) == 1
    assert "config differs" in capsys.readouterr().out


def test_no_cell_with_the_same_config_is_refused_naming_the_difference(tmp_path):
    base = write_run(tmp_path / "base")
    new = write_run(tmp_path / "new")
    _edit_records(new, lambda r: dict(r, config={"seed": r["seed"], "transfer": {"batch": 32}}))
    _edit_records(base, lambda r: dict(r, config={"seed": r["seed"], "transfer": {"batch": 64}}))
    with pytest.raises(UserError, match=r"no cell ran the same config.*transfer.batch 64 -> 32"):
        compare_runs(base, new)


def test_transfer_share_lost_in_the_new_run_fails_closed(tmp_path):
    base = write_run(tmp_path / "base", shares=SHARES)
    new = write_run(tmp_path / "new", noise_seed=1)  # the same cells, no transfer metrics recorded
    cell = _cell(compare_runs(base, new), A)
    assert cell.verdict == "REGRESSED" and TARGET_SHARE in cell.regressions
    assert main_compare([str(base), str(new)]) == 1


def _with_concurrency(run_dir, cells: int):
    """Mark every record of a run as measured with `cells` cells sharing the device (a pool)."""
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for r in records:
        r["metrics"]["timing/concurrent_cells"] = cells
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_throughput_across_concurrency_is_not_compared_but_fid_is(tmp_path, capsys):
    base = write_run(tmp_path / "base")  # records from before pools: measured alone
    new = _with_concurrency(write_run(tmp_path / "new", scale={A: (0.5, 1.5, 0.0), B: (0.5, 1.0, 4.0)}), 2)
    cmp = compare_runs(base, new)
    for name in (A, B):
        for key in (THROUGHPUT, MEMORY):
            assert _cell(cmp, name).metrics[key].not_compared and not _cell(cmp, name).metrics[key].regressed
    assert _cell(cmp, A).verdict == "OK" and _cell(cmp, B).regressions == [FID]
    assert main_compare([str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert "not compared" in out and "concurrent" in out.splitlines()[0]


def test_throughput_at_equal_concurrency_is_compared(tmp_path):
    base = _with_concurrency(write_run(tmp_path / "base"), 2)
    new = _with_concurrency(write_run(tmp_path / "new", scale={A: (0.5, 1.0, 0.0)}), 2)
    assert _cell(compare_runs(base, new), A).regressions == [THROUGHPUT]
