"""bench/report.py and bench/show.py: all sections present, self-contained HTML, all cells shown."""

from __future__ import annotations

import base64
import json
import re

import pytest

from bench.report import PLOTS_DIR, plot_paths, slug, write_report
from bench.show import format_table, main as show_main
from fakes import (FAILED_CELL, FAILED_REASON, SETUPS, SKIPPED_CELL, SKIPPED_REASON, STRATEGIES,
                   cell_id, make_fake_run, pair_name)

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
    # 4 plots per pair + per pair and setup: 1 real grid + one sample grid per strategy
    assert len(srcs) == 2 * 4 + 2 * len(SETUPS) * (1 + len(STRATEGIES))


def test_plots_are_written_for_wandb(fake_run, report):
    run_dir, _ = fake_run
    paths = plot_paths(run_dir)
    assert len(paths) == 8 and all(p.parent.name == PLOTS_DIR for p in paths)
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
    for name in ("KID", "img/s", "wall s"):
        end = header.index(name) + len(name)
        assert all(row[end - 1] != " " and (len(row) == end or row[end] == " ") for row in rows)


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


def test_report_escapes_markup_from_inputs(tmp_path):
    records = make_fake_run(tmp_path / "run", images=False)
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    lines = [json.dumps({**r, "reason": hostile} if r["status"] != "ok" else {**r, "target": hostile}) + "\n"
             for r in records]
    (tmp_path / "run" / "results.jsonl").write_text("".join(lines))
    text = write_report(tmp_path / "run").read_text()
    assert "<script" not in text.lower() and "<img src=x" not in text  # no tag made it through
    assert text.count("&lt;script&gt;alert(") >= 3  # the reasons (table, per-pair lines) and the target, as text
