"""bench/results.py: the JSONL survives torn writes and concurrent writers; aggregation is right."""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics

import pytest

from bench.results import (aggregate, append_record, group_by_pair, latest_per_cell,
                           load_records, not_ok, results_path, stat_of, status_counts)
from fakes import FAILED_CELL, SKIPPED_CELL, cell_id, fake_record, make_fake_run, pair_name
from ganlib.errors import UserError


def test_roundtrip_keeps_every_field(tmp_path):
    records = [fake_record("finetune", 0, "cpu-1proc", s) for s in range(3)]
    for r in records:
        append_record(tmp_path, r)
    assert load_records(tmp_path) == records
    assert results_path(tmp_path).read_text().count("\n") == 3


def test_torn_last_line_is_skipped_and_next_append_stays_whole(tmp_path):
    good = fake_record(seed=0)
    append_record(tmp_path, good)
    line = json.dumps(fake_record(seed=1))
    with open(results_path(tmp_path), "a") as f:  # a writer killed mid-line
        f.write(line[: len(line) // 2])
    with pytest.warns(UserWarning, match="torn last line"):
        assert load_records(tmp_path) == [good]

    after = fake_record(seed=2)
    append_record(tmp_path, after)
    with pytest.warns(UserWarning, match="unreadable line"):
        assert load_records(tmp_path) == [good, after]


def test_append_rejects_incomplete_record(tmp_path):
    record = fake_record()
    del record["status"]
    with pytest.raises(ValueError, match="status"):
        append_record(tmp_path, record)
    assert not results_path(tmp_path).exists()


def test_missing_file_and_unknown_schema_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="results.jsonl"):
        load_records(tmp_path)
    results_path(tmp_path).write_text(json.dumps({**fake_record(), "schema": 99}) + "\n")
    with pytest.raises(UserError, match="schema 99"):
        load_records(tmp_path)


def _writer(args):
    run_dir, worker = args
    for i in range(40):
        # big configs make lines longer than a pipe buffer, where interleaving would show
        record = fake_record(seed=worker * 1000 + i)
        record["config"]["padding"] = "x" * 20000
        append_record(run_dir, record)


def test_concurrent_appends_never_interleave(tmp_path):
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), w) for w in range(4)])
    records = load_records(tmp_path)
    assert len(records) == 160
    assert len({r["cell_id"] for r in records}) == 160


def test_latest_per_cell_keeps_the_retry(tmp_path):
    first = fake_record(seed=0, status="failed", reason="OOM")
    retry = fake_record(seed=0)
    other = fake_record(seed=1)
    assert latest_per_cell([first, other, retry]) == [other, retry]


def test_fake_run_groups_and_aggregates(tmp_path):
    records = make_fake_run(tmp_path, images=False)
    assert load_records(tmp_path) == records
    groups = group_by_pair(records)
    assert list(groups) == [pair_name(0), pair_name(1)]
    assert sum(len(v) for v in groups.values()) == len(records) == 48

    stats = aggregate(records)
    assert len(stats) == 2 * 4 * 2
    # independent recomputation from the raw records
    for (pair, strategy, setup), per in stats.items():
        fids = [r["metrics"]["quality/fid"] for r in records if r["status"] == "ok"
                and (r["pair"], r["strategy"], r["setup"]) == (pair, strategy, setup)]
        assert per["quality/fid"].n == len(fids)
        assert per["quality/fid"].mean == pytest.approx(statistics.fmean(fids))
        assert per["quality/fid"].std == pytest.approx(statistics.stdev(fids))
    strategy, p, setup, _ = FAILED_CELL
    assert stats[(pair_name(p), strategy, setup)]["quality/fid"].n == 2  # failed seed left out
    assert status_counts(records)[(pair_name(p), strategy, setup)] == {"ok": 2, "failed": 1}
    assert {r["cell_id"] for r in not_ok(records)} == {cell_id(*FAILED_CELL),
                                                        cell_id(*SKIPPED_CELL)}


def test_stat_drops_non_finite_and_handles_one_value():
    s = stat_of([1.0, float("nan"), 3.0, None, float("inf")])
    assert (s.mean, s.n) == (2.0, 2) and s.std == pytest.approx(2 ** 0.5)
    one = stat_of([5.0])
    assert one.std is None and one.format(".1f", "GB") == "5.0 GB (n=1)"
    assert s.format(".2f") == "2.00 ± 1.41 (n=2)"
    with pytest.raises(ValueError):
        stat_of([float("nan")])
