"""bench/report.py and bench/show.py: all sections present, self-contained HTML, all cells shown."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil

import pytest

from matplotlib.container import ErrorbarContainer

from bench.report import _bars, _pyplot, plot_paths, plot_transfer, slug, write_report
from bench.results import stat_of
from bench.rundir import PLOTS_DIR
from bench.show import format_table, main as show_main
from fakes import (FAILED_CELL, FAILED_REASON, NO_CLASS_REASON, SETUPS, SKIPPED_CELL, SKIPPED_REASON,
                   STRATEGIES, cell_id, make_fake_run, pair_name)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    records = make_fake_run(run_dir)
    return run_dir, records


@pytest.fixture(scope="module")
def report(fake_run):
    run_dir, _ = fake_run
    path = write_report(run_dir)
    return path, path.read_text(encoding="utf-8")


def test_report_has_every_section(report):
    path, text = report
    assert path.name == "report.html"
    ids = set(re.findall(r'id="([^"]+)"', text))
    assert {"overview", "environment", "verdicts", "failed-skipped"} <= ids
    for p in (0, 1):
        sid = f"pair-{slug(pair_name(p))}"
        for part in ("", "-verdict", "-table", "-fid", "-throughput", "-cost", "-curves",
                     "-samples"):
            assert sid + part in ids, sid + part
    assert "not comparable to Inception FID" in text
    for field in ("3.11.7", "2.14.1", "abc1234", "lenet-mnist5k", "benchbox"):
        assert field in text


def test_report_is_self_contained(report):
    _, text = report
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert not re.search(r"<link\b", text, re.I)
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # every embedded image decodes to a PNG
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == PNG_MAGIC
    # 4 plots per pair, the transfer plots (class bars on pair 0 only, the memorisation scatter on
    # both), one nearest-shot grid per strategy and pair, per pair and setup: 1 real grid + one
    # sample grid per strategy
    assert len(srcs) == 2 * 4 + 3 + 2 * len(STRATEGIES) + 2 * len(SETUPS) * (1 + len(STRATEGIES))


def test_plots_are_written_for_wandb(fake_run, report):
    run_dir, _ = fake_run
    paths = plot_paths(run_dir)
    assert len(paths) == 8 + 3 and all(p.parent.name == PLOTS_DIR for p in paths)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)


def test_report_tables_show_numbers_and_not_ok_cells(fake_run, report):
    _, records = fake_run
    _, text = report
    for cell, reason in ((FAILED_CELL, FAILED_REASON), (SKIPPED_CELL, SKIPPED_REASON)):
        assert cell_id(*cell) in text
        assert reason.replace("'", "&#x27;") in text
    # a mean FID of a known group appears as printed in its table cell
    fids = [r["metrics"]["quality/fid"] for r in records
            if r["status"] == "ok" and (r["pair"], r["strategy"], r["setup"])
            == (pair_name(0), "freeze_d", "cpu-1proc")]
    assert f"{sum(fids) / len(fids):.2f}" in text
    for header in ("FID", "KID", "throughput (img/s)", "peak memory (GB)", "wall time (s)"):
        assert header in text
    assert text.count('class="verdict') == 2 * 4  # per setup, once in the summary, once per pair


def test_did_it_transfer_panel(fake_run, report):
    run_dir, records = fake_run
    _, text = report
    ids = set(re.findall(r'id="([^"]+)"', text))
    assert {f"pair-{slug(pair_name(p))}-transfer" for p in (0, 1)} <= ids
    assert (run_dir / PLOTS_DIR / f"{slug(pair_name(0))}-transfer-classes.png").is_file()
    assert not (run_dir / PLOTS_DIR / f"{slug(pair_name(1))}-transfer-classes.png").exists()  # no classes
    assert f"Not measured: {NO_CLASS_REASON}" in text
    assert text.count("Samples (top) above their nearest training shots") == 2
    for header in ("target classes ↑", "memorised ↓"):
        assert header in text
    shares = [r["metrics"]["transfer/target_class_share"] for r in records if r["status"] == "ok"
              and (r["pair"], r["strategy"], r["setup"]) == (pair_name(0), "ewc", "cpu-1proc")]
    assert f"{sum(shares) / len(shares):.2f}" in text


def test_memorisation_scatter_labels_its_quadrants(fake_run, monkeypatch):
    run_dir, records = fake_run
    texts = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append((x, y, s)) or original(self, x, y, s, *a, **k))
    pair = [r for r in records if r["pair"] == pair_name(0)]
    colors = dict.fromkeys(STRATEGIES, "black")
    plot_transfer(run_dir, pair_name(0), pair, colors)
    labels = {s: (x, y) for x, y, s in texts}
    (x, y) = labels["copying"]
    assert x < 0.5 < y  # up-left
    (x, y) = labels["good: new and diverse"]
    assert y < 0.5 < x  # down-right


def test_bars_draw_error_bars_only_where_seeds_give_a_std():
    plt = _pyplot()
    fig, ax = plt.subplots()
    stats = {"a": stat_of([1.0, 2.0, 3.0]), "b": stat_of([2.0])}
    _bars(ax, ["a", "b"], ["s"], lambda group, series: stats[group], {}, "y")
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = errorbars.lines[2][0].get_segments()
    assert len(segments) == 1 and segments[0][:, 1].tolist() == [1.0, 3.0]  # mean 2 ± std 1, group a only
    plt.close(fig)


def test_report_defangs_urls_from_inputs(tmp_path):
    make_fake_run(tmp_path, images=False)
    with open(tmp_path / "matrix.yaml", "a") as f:
        f.write("notes: see https://example.com/run and http://x.y\n")
    text = write_report(tmp_path).read_text()
    assert "http://" not in text and "https://" not in text
    assert "example.com" in text  # the text survives, only the scheme is defanged
    assert "image missing" in text  # no PNGs in this run: placeholders instead of broken links


def test_show_table_lists_every_group_and_not_ok_cell(fake_run):
    _, records = fake_run
    out = format_table(records)
    lines = out.splitlines()
    for p in (0, 1):
        assert any(line.startswith(f"== {pair_name(p)}") for line in lines)
        for strategy in STRATEGIES:
            for setup in SETUPS:
                assert any(re.match(rf"{strategy}\s+{setup}\s+\d", line) for line in lines), (
                    strategy, setup)
    assert f"failed: {cell_id(*FAILED_CELL)}: {FAILED_REASON}" in out
    assert f"skipped: {cell_id(*SKIPPED_CELL)}: {SKIPPED_REASON}" in out
    assert "2 ok, 1 failed" in out and "2 ok, 1 skipped" in out
    assert out.count("[cpu-1proc]") == 2 and "significant" in out


def test_show_columns_align(fake_run):
    _, records = fake_run
    block = format_table(records).split("\n\n")[0].splitlines()
    header, rows = block[1], [line for line in block[2:] if not line.startswith("  ")]
    assert len(rows) == len(STRATEGIES) * len(SETUPS)
    # right-aligned numeric columns end at the same character as their header
    for name in ("KID", "target cls", "memorised", "img/s", "wall s"):
        end = header.index(name) + len(name)
        assert all(row[end - 1] != " " and (len(row) == end or row[end] == " ") for row in rows)


def test_show_has_transfer_columns_with_dashes_where_absent(fake_run):
    _, records = fake_run
    tables = format_table(records).split("\n\n")
    header = tables[0].splitlines()[1]
    assert all(name in header for name in ("target cls", "coverage", "memorised"))
    ewc = next(line for line in tables[0].splitlines() if line.startswith("ewc") and "cpu-1proc" in line)
    shares = [r["metrics"]["transfer/target_class_share"] for r in records if r["status"] == "ok"
              and (r["pair"], r["strategy"], r["setup"]) == (pair_name(0), "ewc", "cpu-1proc")]
    assert f" {sum(shares) / len(shares):.2f} " in ewc
    header = tables[1].splitlines()[1]
    ewc_digits = next(line for line in tables[1].splitlines() if line.startswith("ewc"))
    start = header.index("target cls")
    assert ewc_digits[start:header.index("coverage") + len("coverage")].split() == ["-", "-"]


def test_show_per_cell_lists_every_cell(fake_run):
    _, records = fake_run
    lines = format_table(records, per_cell=True).splitlines()
    for r in records:
        pattern = rf"{r['strategy']}\s+{r['setup']}\s+{r['seed']}\s+{r['status']}\b"
        assert any(re.match(pattern, line) for line in lines), r["cell_id"]


def test_show_cli_and_user_error(fake_run, tmp_path, capsys):
    run_dir, _ = fake_run
    show_main([str(run_dir)])
    assert "verdicts" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        show_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no results.jsonl")


def test_torn_last_line_is_warned_about_in_show_and_report(tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    with open(run_dir / "results.jsonl", "a") as f:  # a writer killed mid-line
        f.write('{"schema": 1, "run_id": "x", "cell_id": "finetune-')
    with pytest.warns(UserWarning, match="torn last line"):
        show_main([str(run_dir)])
    with pytest.warns(UserWarning, match="torn last line"):
        write_report(run_dir)


@pytest.mark.slow
def test_report_and_show_of_a_real_run(real_run, tmp_path):
    run_dir, records = real_run
    copy = tmp_path / "run"  # the report writes plots into the run directory: leave the session's as it was
    shutil.copytree(run_dir, copy)
    text = write_report(copy).read_text(encoding="utf-8")
    [pair] = {r["pair"] for r in records}
    ids = set(re.findall(r'id="([^"]+)"', text))
    assert {"overview", "environment", "verdicts", "failed-skipped"} <= ids
    assert {f"pair-{slug(pair)}{part}" for part in ("", "-table", "-fid", "-curves", "-samples")} <= ids
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(f'{r["metrics"]["quality/fid"]:.2f}' in text for r in ok)
    assert all(r["env"]["torch"] in text for r in ok)
    not_ok = [r for r in records if r["status"] != "ok"]
    assert not_ok and all(r["cell_id"] in text and html.escape(r["reason"]) in text for r in not_ok)

    lines = format_table(records, per_cell=True).splitlines()
    for r in records:
        pattern = rf"{r['strategy']}\s+{r['setup']}\s+{r['seed']}\s+{r['status']}\b"
        assert any(re.match(pattern, line) for line in lines), r["cell_id"]
    out = format_table(records)
    assert any(line.startswith(f"== {pair}") for line in out.splitlines())
    lines = out.splitlines()  # one line per status and reason, naming its cells (two here)
    assert all(any(line.strip().startswith(f"{r['status']}: ") and r["cell_id"] in line and line.endswith(r["reason"])
                   for line in lines) for r in not_ok)


def test_show_and_report_mark_figures_measured_beside_other_cells(fake_run, tmp_path):
    _, records = fake_run
    assert "cells sharing the device" not in format_table(records)  # measured alone: no mark
    shared = [{**r, "metrics": {**r["metrics"], "timing/concurrent_cells": 2}} if r["status"] == "ok" else r
              for r in records]
    assert format_table(shared).count("up to 2 cells sharing the device") == 2  # under each pair's table
    run_dir = tmp_path / "shared"
    run_dir.mkdir()
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shared))
    assert "up to 2 cells sharing the device" in write_report(run_dir).read_text(encoding="utf-8")


def test_report_escapes_markup_from_inputs(tmp_path):
    records = make_fake_run(tmp_path / "run", images=False)
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    lines = [json.dumps({**r, "reason": hostile} if r["status"] != "ok" else {**r, "target": hostile}) + "\n"
             for r in records]
    (tmp_path / "run" / "results.jsonl").write_text("".join(lines))
    text = write_report(tmp_path / "run").read_text()
    assert "<script" not in text.lower() and "<img src=x" not in text  # no tag made it through
    assert text.count("&lt;script&gt;alert(") >= 3  # the reasons (table, per-pair lines) and the target, as text
