"""bench/stats.py: verdicts on known inputs (clear win, overlap, too few seeds, one strategy)."""

from __future__ import annotations

import pytest

from bench.results import stat_of
from bench.stats import compare, verdicts
from fakes import fake_record, make_fake_run, pair_name


def test_clear_win_with_three_seeds_is_significant():
    v = compare("p", "cpu-1proc", {"a": stat_of([20.1, 20.5, 19.8]),
                                   "b": stat_of([14.0, 14.3, 13.9]),
                                   "c": stat_of([40.0, 41.0, 39.0])})
    assert (v.best, v.runner_up) == ("b", "a")
    assert v.lead == pytest.approx(20.1333333 - 14.0666667, abs=1e-6)
    assert v.lead_pct == pytest.approx(100 * v.lead / 20.1333333, rel=1e-6)
    assert v.spreads_overlap is False
    assert v.p_value is not None and v.p_value < 0.05
    assert v.significant is True
    assert "b best" in v.text and "significant" in v.text and "not significant" not in v.text
    assert "\n" not in v.text


def test_p_value_is_welchs_not_students():
    # unequal variances and seed counts, where Welch's and Student's p-values differ by a quarter
    from scipy.stats import ttest_ind

    tight, wide = [10.0, 10.1, 9.9, 10.05], [11.0, 14.0, 8.0, 13.5, 12.5, 9.0]
    welch = ttest_ind(tight, wide, equal_var=False).pvalue
    assert abs(ttest_ind(tight, wide).pvalue - welch) > 0.25 * welch  # the two tests really disagree here
    v = compare("p", "s", {"a": stat_of(tight), "b": stat_of(wide)})
    assert v.p_value == pytest.approx(welch, rel=1e-9)


def test_overlapping_spreads_are_not_significant():
    v = compare("p", "s", {"a": stat_of([20.0, 24.0, 18.0]), "b": stat_of([21.0, 19.0, 25.0])})
    assert v.best == "a" and v.spreads_overlap is True
    assert v.p_value > 0.05 and v.significant is False
    assert "not significant" in v.text


def test_too_few_seeds_gives_no_p_value():
    apart = compare("p", "s", {"a": stat_of([10.0, 10.5]), "b": stat_of([20.0, 20.4])})
    assert apart.p_value is None and apart.significant is True and "no t-test" in apart.text
    overlap = compare("p", "s", {"a": stat_of([10.0, 14.0]), "b": stat_of([12.0, 15.0])})
    assert overlap.p_value is None and "not significant: spreads overlap" in overlap.text
    single = compare("p", "s", {"a": stat_of([10.0, 12.0, 11.0]), "b": stat_of([20.0])})
    assert single.p_value is None and single.spreads_overlap is None
    assert single.significant is None and "undetermined" in single.text


def test_one_or_no_strategy():
    only = compare("p", "s", {"a": stat_of([10.0])})
    assert only.best == "a" and only.runner_up is None and "nothing to compare" in only.text
    none = compare("p", "s", {})
    assert none.best is None and "no successful cells" in none.text


def test_verdicts_per_pair_and_setup_on_fake_run(tmp_path):
    records = make_fake_run(tmp_path, images=False)
    found = verdicts(records)
    assert [(v.pair, v.setup) for v in found] == [(pair_name(p), s) for p in (0, 1)
                                                   for s in ("cpu-1proc", "cpu-2proc")]
    clear = found[0]  # pair 0, cpu-1proc: freeze_d is far ahead in the fake run
    assert clear.best == "freeze_d" and clear.significant is True and clear.p_value < 0.05


def test_failed_cells_do_not_vote():
    good = [fake_record("finetune", 0, "cpu-1proc", s, fid=20.0 + s) for s in range(3)]
    bad = fake_record("freeze_d", 0, "cpu-1proc", 0, status="failed", reason="NaN")
    bad["metrics"]["quality/fid"] = 1.0  # a partial metric from a failed cell must not win
    [v] = verdicts(good + [bad])
    assert v.best == "finetune" and v.runner_up is None


def test_best_is_tested_against_every_other_strategy():
    # b and a cannot be told apart, but b clearly beats c: the verdict must say both.
    v = compare("p", "s", {"a": stat_of([14.2, 14.9, 13.6]), "b": stat_of([14.0, 14.3, 13.9]),
                           "c": stat_of([40.0, 41.0, 39.0])})
    assert v.best == "b" and v.runner_up == "a" and v.significant is False
    assert [name for name, _ in v.versus] == ["a", "c"]
    assert v.beats == ["c"]
    assert v.versus_text.startswith("b beats c (p=") and "not separable from a (p=" in v.versus_text
    few = compare("p", "s", {"a": stat_of([10.0, 10.5]), "b": stat_of([20.0, 20.4])})
    assert few.versus == () and few.versus_text == ""
