"""bench/wandb_report.py: the W&B Report object is built offline (never published) with its panels."""

from __future__ import annotations

import json
import sys

import pytest

from bench.results import latest_per_cell
from bench.wandb_sink import STEP_KEY
from fakes import make_fake_run

wr = pytest.importorskip(
    "wandb_workspaces.reports.v2",
    reason="LOUD SKIP: wandb-workspaces is not installed, so `bench wandb-report` is untested here; "
           "pip install 'ganbench[wandb-report]'")
from wandb_workspaces import expr  # noqa: E402

from bench.wandb_report import build_report, panel_titles  # noqa: E402

EXPECTED_PANELS = ["FID by strategy", "throughput by strategy (img/s)", "throughput vs FID", "FID curves",
                   "losses", "system metrics: process memory (MB)", "sample grids", "cells"]


def _config(panel) -> dict:
    """The panel as the report would save it (panels serialise without the network; runsets do not)."""
    return json.loads(panel._to_model().model_dump_json(by_alias=True, exclude_none=True))["config"]


def _grids(report) -> list:
    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


def test_report_object_has_the_expected_panels_over_this_runs_cells(tmp_path):
    records = make_fake_run(tmp_path / "run")
    run_id = records[0]["run_id"]
    report = build_report(records, "my-team", "ganbench")
    assert (report.entity, report.project) == ("my-team", "ganbench") and run_id in report.title
    assert panel_titles(report) == EXPECTED_PANELS
    panels = {_config(p).get("chartTitle", "cells"): _config(p) for g in _grids(report) for p in g.panels}
    assert panels["FID by strategy"]["metrics"] == ["summary_metrics.quality/fid"]
    assert panels["FID by strategy"]["groupBy"] == "cell.value.strategy"  # the sink's config.cell.strategy
    assert (panels["throughput vs FID"]["xAxis"], panels["throughput vs FID"]["yAxis"]) == (
        "summary:timing/img_per_s", "summary:quality/fid")
    assert panels["FID curves"] == {"chartTitle": "FID curves", "xAxis": STEP_KEY, "metrics": ["curve/fid"]}
    assert panels["sample grids"]["mediaKeys"] == ["samples"]
    assert "cells" in json.dumps(panels["cells"])  # the summary run's table of cells (with its samples column)
    # every runset selects this run's group: the cells, or the summary run alone
    for grid in _grids(report):
        for runset in grid.runsets:
            tree = expr.expr_to_filters(runset.filters)
            terms = {(f.key.name, f.op, f.value) for f in tree.filters}
            assert ("group", "=", run_id) in terms
            job = next(t for t in terms if t[0] == "jobType")
            assert job[1:] == (("=", "summary") if grid.panels[0].__class__ is wr.WeavePanelSummaryTable
                               else ("!=", "summary"))
    n = len(latest_per_cell(records))
    assert f"{n} cells" in " ".join(b.text for b in report.blocks if isinstance(b, wr.P))


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from bench.__main__ import main

    make_fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["wandb-report", str(tmp_path / "run"), "--entity", "me"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "wandb-report" in err and "pip install" in err
