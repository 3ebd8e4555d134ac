"""`bench wandb-report RUN_DIR`: a W&B Report of one matrix run, built from its W&B runs.

It shows what the HTML report shows, where the team looks: FID by strategy, throughput against FID,
the FID and loss curves of every cell, system metrics, and the summary run's table of cells with their
sample grids. The runs must be in W&B already (`bench run --wandb online`, or `wandb sync` of the
offline ones); the report only points at them. Needs `wandb-workspaces` (the `wandb-report` extra).

`build_report` makes the report object without touching the network; `publish` saves it.
"""

from __future__ import annotations

import os

from bench.results import latest_per_cell, load_records
from bench.wandb_sink import STEP_KEY
from ganlib.errors import UserError

INSTALL = "pip install 'ganbench[wandb-report]' (wandb-workspaces)"
STRATEGY = "config.cell.strategy"  # where each cell run's config keeps its identity (bench.wandb_sink)


def workspaces():
    """The wandb_workspaces reports API, or a UserError naming what to install."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise UserError(f"bench wandb-report needs wandb-workspaces, which is not installed: {INSTALL}") from None
    return wr


def build_report(records: list[dict], entity: str, project: str, title: str | None = None):
    """The Report object for the run the `records` belong to (nothing is sent anywhere).

    Panels (their titles are the contract the tests check): FID by strategy, throughput vs FID,
    FID curves, losses, system metrics; then the summary run's `cells` table (sample grid column).
    """
    wr = workspaces()
    if not records:
        raise UserError("the run has no records yet: nothing to report")
    run_id = records[0]["run_id"]
    cells = wr.Runset(entity=entity, project=project, name=f"cells of {run_id}",
                      filters=f"Group = '{run_id}' and JobType != 'summary'")
    by_strategy = wr.Runset(entity=entity, project=project, name=f"by strategy ({run_id})",
                            filters=f"Group = '{run_id}' and JobType != 'summary'", groupby=[STRATEGY])
    summary = wr.Runset(entity=entity, project=project, name=f"summary of {run_id}",
                        filters=f"Group = '{run_id}' and JobType = 'summary'")
    n_ok = sum(r["status"] == "ok" for r in latest_per_cell(records))
    blocks = [
        wr.H1(text=title or f"ganbench run {run_id}"),
        wr.P(text=f"Matrix {records[0].get('matrix')}: {len(latest_per_cell(records))} cells, {n_ok} ok. "
                  "Mean over seeds; each cell is one W&B run in the group of this run."),
        wr.PanelGrid(runsets=[by_strategy], panels=[
            wr.BarPlot(title="FID by strategy", metrics=[wr.SummaryMetric("quality/fid")], groupby=STRATEGY,
                       groupby_aggfunc="mean", groupby_rangefunc="stddev"),
            wr.BarPlot(title="throughput by strategy (img/s)", metrics=[wr.SummaryMetric("timing/img_per_s")],
                       groupby=STRATEGY, groupby_aggfunc="mean", groupby_rangefunc="stddev"),
        ]),
        wr.PanelGrid(runsets=[cells], panels=[
            wr.ScatterPlot(title="throughput vs FID", x=wr.SummaryMetric("timing/img_per_s"),
                           y=wr.SummaryMetric("quality/fid")),
            wr.LinePlot(title="FID curves", x=STEP_KEY, y=["curve/fid"]),
            wr.LinePlot(title="losses", x=STEP_KEY, y=["loss/D", "loss/G"]),
            wr.LinePlot(title="system metrics: process memory (MB)", x="_runtime",
                        y=["system/proc.memory.rssMB"]),
            wr.MediaBrowser(title="sample grids", media_keys=["samples"]),
        ]),
        wr.H2(text="cells"),
        wr.PanelGrid(runsets=[summary], panels=[wr.WeavePanelSummaryTable(table_name="cells")]),
    ]
    return wr.Report(project=project, entity=entity, title=title or f"ganbench {run_id}",
                     description=f"bench wandb-report of run {run_id}", blocks=blocks)


def panel_titles(report) -> list[str]:
    """Titles (or table names) of the report's panels, in order: what a reader sees."""
    wr = workspaces()
    titles = []
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            titles += [getattr(p, "title", None) or getattr(p, "table_name", "") for p in block.panels]
    return titles


def publish(run_dir: str | os.PathLike, entity: str, project: str, title: str | None = None) -> str:
    """Build and save the report in W&B; its URL."""
    report = build_report(load_records(run_dir), entity, project, title)
    report.save()
    return report.url
