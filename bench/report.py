"""`bench report DIR`: one self-contained `report.html` (plus `plots/*.png`) from results.jsonl.

Self-contained means: CSS inline, every image a base64 data URI, no script, no external URL of
any kind (text that contains a scheme is defanged), so the file opens offline and can be mailed.
The page is Jinja2 with autoescape: templates/report.html (the page) and templates/sections.html
(one macro per section); values are escaped unless the code hands over Markup.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
from collections import defaultdict
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from bench.columns import REPORT_COLUMNS
from bench.published import PublishedFids, parse_published
from bench.results import (Stat, aggregate, concurrency_note, format_counts, group_by_pair, latest_per_cell,
                           load_records, not_ok, ordered_unique, status_counts)
from bench.rundir import matrix_path, plots_dir, report_path
from bench.stats import Verdict, verdicts
from ganlib.errors import UserError

ENV_COMMON = ("python", "torch", "accelerate", "cuda", "git_commit", "hostname")
ENV_PER_SETUP = ("devices", "device_count", "num_processes", "mixed_precision")


def slug(name: str) -> str:
    """A file-name- and id-safe form of a pair or strategy name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --- plots ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede the pyplot import
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no URL in the PNG either
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _bars(ax, groups: list[str], series: list[str], stat_for, colors: dict, ylabel: str) -> None:
    """Grouped bars: one group per `groups` entry, one bar per `series` entry, std error bars (n >= 2)."""
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, means, errs = [], [], []
        for i, group in enumerate(groups):
            stat = stat_for(group, name)
            if stat is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                means.append(stat.mean)
                errs.append(stat.std)
        ax.bar(xs, means, width * 0.92, label=name, color=colors.get(name), edgecolor="white")
        spread = [(x, m, e) for x, m, e in zip(xs, means, errs) if e is not None]
        if spread:  # error bars only where a std exists (n >= 2 seeds): none beats a zero-length one
            ax.errorbar(*zip(*spread), fmt="none", ecolor="black", elinewidth=1, capsize=3)
    ax.set_xticks(range(len(groups)), groups)
    if len(groups) > 4:  # strategy names side by side overlap ("freeze_dtwo_phase"): slant them
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)


def plot_pair(run_dir: Path, pair: str, records: list[dict], colors: dict) -> dict[str, Path]:
    """Write the four plots of one pair into run_dir/plots; returns {kind: path}."""
    plt = _pyplot()
    stats = aggregate(records)
    strategies = ordered_unique(r["strategy"] for r in records)
    setups = ordered_unique(r["setup"] for r in records)
    setup_colors = {s: plt.cm.Set2(i % 8) for i, s in enumerate(setups)}
    markers = dict(zip(setups, "osD^vP*X"))

    def stat(strategy, setup, key):
        return stats.get((pair, strategy, setup), {}).get(key)

    out, base = {}, plots_dir(run_dir) / slug(pair)
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    _bars(ax, strategies, setups, lambda st, se: stat(st, se, "quality/fid"), setup_colors,
          "FID (lower is better)")
    ax.set_title("FID by strategy (mean ± std over seeds)")
    ax.legend(title="setup", frameon=False, loc="best")
    out["fid"] = _save(fig, Path(f"{base}-fid.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in ((axes[0], "timing/img_per_s", "throughput (img/s)"),
                           (axes[1], "resources/peak_mem_gb", "peak memory (GB)")):
        _bars(ax, setups, strategies, lambda se, st, k=key: stat(st, se, k), colors, label)
        ax.set_title(f"{label.split(' (')[0].capitalize()} by setup")
    axes[1].legend(title="strategy", frameon=False, fontsize=9, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0))
    out["throughput"] = _save(fig, Path(f"{base}-throughput-memory.png"))

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for k, strategy in enumerate(strategies):
        for setup in setups:
            fid, cost = stat(strategy, setup, "quality/fid"), stat(strategy, setup,
                                                                  "timing/device_seconds")
            if fid is None or cost is None:
                continue
            ax.errorbar(cost.mean, fid.mean, xerr=cost.std or 0, yerr=fid.std or 0,
                        fmt=markers[setup], color=colors[strategy], capsize=3, ms=7)
            ax.annotate(strategy, (cost.mean, fid.mean), textcoords="offset points",
                        xytext=(6, 5 if k % 2 == 0 else -12), fontsize=9,
                        color=colors[strategy])
    for setup in setups:  # legend for marker shapes only
        ax.plot([], [], markers[setup], color="grey", label=setup)
    ax.set_xlabel("device time (device-seconds)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("Cost vs quality (down-left is better)")
    ax.legend(title="setup", frameon=False, loc="best")
    out["cost"] = _save(fig, Path(f"{base}-cost-quality.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    styles = dict(zip(setups, ["-", "--", ":", "-."] * 4))
    for strategy in strategies:
        for setup in setups:
            cells = [r for r in records if r["status"] == "ok" and r["strategy"] == strategy
                     and r["setup"] == setup]
            for ax, curve, key in ((axes[0], "train", "loss/D"), (axes[1], "train", "loss/G"),
                                   (axes[2], "fid", "fid")):
                steps, means = _mean_curve(cells, curve, key)
                if steps:
                    ax.plot(steps, means, styles[setup], color=colors[strategy], lw=1.6,
                            label=f"{strategy} · {setup}")
    for ax, title in zip(axes, ("loss/D", "loss/G", "FID during transfer")):
        ax.set_title(f"{title} (mean over seeds)")
        ax.set_xlabel("step")
    handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        axes[2].legend(handles, labels, frameon=False, fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))
    out["curves"] = _save(fig, Path(f"{base}-curves.png"))
    return out


TRANSFER_BARS = (("transfer/target_class_share", "share in the target classes"),
                 ("transfer/class_coverage", "class coverage (1 = all equally)"))
MEMORISED_EXPECTED = 0.05   # memorised share of a generator of new images (ganlib.fewshot's quantile)


def plot_transfer(run_dir: Path, pair: str, records: list[dict], colors: dict) -> dict[str, Path]:
    """The "did it transfer" plots of one pair (only those it has metrics for); returns {kind: path}."""
    stats = aggregate(records)
    strategies = ordered_unique(r["strategy"] for r in records)
    setups = ordered_unique(r["setup"] for r in records)

    def stat(strategy, setup, key):
        return stats.get((pair, strategy, setup), {}).get(key)

    has = lambda key: any(stat(st, se, key) for st in strategies for se in setups)
    out, base, plt = {}, plots_dir(run_dir) / slug(pair), None
    if has(TRANSFER_BARS[0][0]):
        plt = _pyplot()
        setup_colors = {s: plt.cm.Set2(i % 8) for i, s in enumerate(setups)}
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, (key, label) in zip(axes, TRANSFER_BARS):
            _bars(ax, strategies, setups, lambda st, se, k=key: stat(st, se, k), setup_colors, label)
            ax.set_ylim(0, 1.05)
            ax.set_title(label.split(" (")[0].capitalize() + " by strategy")
        axes[1].legend(title="setup", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out["classes"] = _save(fig, Path(f"{base}-transfer-classes.png"))
    if has("transfer/memorised_share"):
        plt = plt or _pyplot()
        relative = has("transfer/diversity_vs_real")
        x_key = "transfer/diversity_vs_real" if relative else "transfer/diversity"
        markers = dict(zip(setups, "osD^vP*X"))
        fig, ax = plt.subplots(figsize=(6.2, 4.2))
        for strategy in strategies:
            named = False
            for setup in setups:
                div, mem = stat(strategy, setup, x_key), stat(strategy, setup, "transfer/memorised_share")
                if div is None or mem is None:
                    continue
                ax.errorbar(div.mean, mem.mean, xerr=div.std, yerr=mem.std, fmt=markers[setup],
                            color=colors[strategy], capsize=3, ms=7)
                if not named:  # one label per strategy; the marker shape tells the setups apart
                    ax.annotate(strategy, (div.mean, mem.mean), textcoords="offset points", xytext=(6, 4),
                                fontsize=9, color=colors[strategy])
                    named = True
        if len(setups) > 1:
            for setup in setups:
                ax.plot([], [], markers[setup], color="grey", label=setup)
            ax.legend(title="setup", frameon=False, loc="center left")
        ax.axhline(MEMORISED_EXPECTED, color="grey", lw=0.8, ls="--")
        if relative:
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(left=0)
        for x, y, ha, va, text in ((0.02, 0.97, "left", "top", "copying"),
                                   (0.98, 0.03, "right", "bottom", "good: new and diverse")):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="grey", style="italic")
        ax.set_xlabel("intra-cluster diversity" + (" / held-out reals' (1 = as real)" if relative else ""))
        ax.set_ylabel("memorised share (new images: ~0.05)")
        ax.set_title("Memorisation vs diversity (down-right is good)")
        out["memorisation"] = _save(fig, Path(f"{base}-transfer-memorisation.png"))
    return out


def _transfer_panel(run_dir: Path, sid: str, records: list[dict], plots: dict[str, Path]) -> Markup:
    """The pair's "did it transfer" section: reasons for absent metrics, the plots, nearest shots."""
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["seed"])
    reasons = ordered_unique((r.get("metrics") or {}).get(k) for r in ok
                             for k in ("transfer/class_metrics_reason", "transfer/fewshot_reason",
                                       "transfer/memorisation_reason", "transfer/diversity_reason"))
    spaces = [s for s in ordered_unique((r.get("metrics") or {}).get("transfer/diversity_space") for r in ok) if s]
    figs = []
    for strategy in ordered_unique(r["strategy"] for r in records):
        cell = next((r for r in ok if r["strategy"] == strategy and (r.get("artifacts") or {}).get("nearest")), None)
        if cell is None:
            continue
        m = cell.get("metrics") or {}
        facts = [f"{label} {m[key]:.2f}" for key, label in (("transfer/target_class_share", "target classes"),
                                                           ("transfer/memorised_share", "memorised"))
                 if isinstance(m.get(key), (int, float))]
        figs.append({"uri": _uri(run_dir / cell["artifacts"]["nearest"]), "cell_id": cell["cell_id"],
                     "strategy": strategy, "setup": cell["setup"], "seed": cell["seed"], "facts": " · ".join(facts)})
    reasons = [r for r in reasons if r]
    if not (reasons or plots or figs):
        return Markup("")
    return _macro("transfer_panel")(sid, reasons, ", ".join(spaces),
                                    [(kind, _uri(path)) for kind, path in plots.items()], figs)


def _mean_curve(cells: list[dict], curve: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over cells of `key` per step (steps that some seeds lack use the seeds present)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for cell in cells:
        for row in (cell.get("curves") or {}).get(curve, []):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                per_step[int(row["step"])].append(float(value))
    steps = sorted(per_step)
    return steps, [sum(per_step[s]) / len(per_step[s]) for s in steps]


# --- HTML ----------------------------------------------------------------------------------
# Each section is a macro of templates/sections.html rendered with autoescape; the functions below
# gather its data and return Markup. A new panel is one macro and one function, appended to `parts`.

def _defang(value) -> Markup:
    """Every value a template prints: escaped, with any `scheme://` defanged (so the file holds no URL);
    Markup (a macro's output, a data URI) is already HTML and passes as it is."""
    if isinstance(value, Markup):
        return value
    return Markup(str(escape(value)).replace("://", ":&#47;&#47;"))


@functools.cache
def _templates() -> Environment:
    env = Environment(loader=PackageLoader("bench", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, finalize=_defang, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = format  # {{ x|fmt(".2f") }}
    return env


def _macro(name: str):
    """A section macro of templates/sections.html; calling it returns Markup."""
    return getattr(_templates().get_template("sections.html").module, name)


def _uri(path: Path | None) -> Markup | None:
    """A PNG as a data URI (Markup: base64 needs no escaping), None when the file is missing."""
    return Markup(_data_uri(path)) if path is not None and path.is_file() else None


def _img(path: Path | None, alt: str, cls: str = "") -> Markup:
    return _macro("img")(_uri(path), alt, cls)


def _stat_cell(stat: Stat | None, spec: str, best: bool = False) -> Markup:
    return _macro("stat_cell")(stat, spec, best)


def _env_block(records: list[dict]) -> Markup:
    common = [(key, ", ".join(ordered_unique(str((r.get("env") or {}).get(key)) for r in records)))
              for key in ENV_COMMON]
    extractors = [e for e in ordered_unique((r.get("metrics") or {}).get("quality/extractor")
                                            for r in records if r["status"] == "ok") if e]
    samples = ordered_unique((r.get("metrics") or {}).get("quality/num_samples")
                             for r in records if r["status"] == "ok")
    setups = []
    for setup in ordered_unique(r["setup"] for r in records):
        env = next((r.get("env") or {}) for r in records if r["setup"] == setup)
        setups.append((setup, [", ".join(map(str, v)) if isinstance(v, list) else v
                               for v in (env.get(k) for k in ENV_PER_SETUP)]))
    note = any(not str(e).lower().startswith("inception") for e in extractors)
    return _macro("env_block")(common, ", ".join(extractors), ", ".join(str(s) for s in samples if s),
                               ENV_PER_SETUP, setups, note)


def _published(run_dir: Path) -> list[PublishedFids]:
    """The published FIDs of the run's matrix (its stored matrix.yaml); none for an older or odd file."""
    try:
        raw = yaml.safe_load(matrix_path(run_dir).read_text())
        return parse_published(raw.get("published"), "matrix") if isinstance(raw, dict) else []
    except (OSError, yaml.YAMLError, UserError):
        return []


def _pair_table(pair: str, records: list[dict], stats: dict, counts: dict,
                published: list[PublishedFids] = ()) -> Markup:
    strategies = ordered_unique(r["strategy"] for r in records)
    setups = ordered_unique(r["setup"] for r in records)
    sources = [src for src in published if pair in src.fid]  # numbered [1], [2] in the table
    best_fid = {}
    for setup in setups:
        fids = [(stats[(pair, st, setup)]["quality/fid"].mean, st) for st in strategies
                if "quality/fid" in stats.get((pair, st, setup), {})]
        best_fid[setup] = min(fids)[1] if fids else None
    rows = []
    for strategy in strategies:
        for setup in setups:
            key = (pair, strategy, setup)
            if key not in counts:
                continue
            per = stats.get(key, {})
            cells = [{"stat": per.get(c.key), "spec": c.spec,
                      "best": c.key == "quality/fid" and best_fid[setup] == strategy} for c in REPORT_COLUMNS]
            reported = [f"{src.fid[pair][strategy]:.2f} [{i}]" for i, src in enumerate(sources, 1)
                        if strategy in src.fid[pair]]
            rows.append({"strategy": strategy, "setup": setup, "cells": cells,
                         "counts": format_counts(counts[key]), "published": "; ".join(reported) or "–"})
    fid_at = [c.key for c in REPORT_COLUMNS].index("quality/fid")  # the published FID goes beside it
    return _macro("pair_table")([c.header for c in REPORT_COLUMNS], rows, sources, fid_at)


def _samples(run_dir: Path, records: list[dict]) -> Markup:
    """Per setup: the target's real images first, then each strategy's lowest-seed ok cell."""
    setups = []
    for setup in ordered_unique(r["setup"] for r in records):
        ok = sorted((r for r in records if r["setup"] == setup and r["status"] == "ok"),
                    key=lambda r: r["seed"])
        if not ok:
            continue
        real = (ok[0].get("artifacts") or {}).get("real")
        figures = []
        for strategy in ordered_unique(r["strategy"] for r in records):
            cell = next((r for r in ok if r["strategy"] == strategy), None)
            if cell is None:
                continue
            path = (cell.get("artifacts") or {}).get("samples")
            fid = (cell.get("metrics") or {}).get("quality/fid")
            figures.append({"uri": _uri(run_dir / path if path else None), "cell_id": cell["cell_id"],
                            "strategy": strategy, "seed": cell["seed"],
                            "fid": f"FID {fid:.2f}" if isinstance(fid, (int, float)) else "FID –"})
        setups.append({"name": setup, "real": _uri(run_dir / real if real else None),
                       "target": ok[0]["target"], "figures": figures})
    return _macro("samples")(setups)


def _verdict_html(v: Verdict) -> Markup:
    return _macro("verdict")(v)


def _figure(path: Path, alt: str) -> Markup:
    return _macro("figure")(_uri(path), alt)


def _not_ok_lines(records: list[dict]) -> Markup:
    return _macro("not_ok_lines")(not_ok(records))


def _not_ok_table(records: list[dict]) -> Markup:
    return _macro("not_ok_table")(not_ok(records))


def write_report(run_dir: str | os.PathLike) -> Path:
    """Render `run_dir/report.html` (and `run_dir/plots/*.png`) from the run's records."""
    run_dir = Path(run_dir)
    records = latest_per_cell(load_records(run_dir))
    run_id = records[0]["run_id"] if records else run_dir.name
    matrix = records[0].get("matrix", "?") if records else "?"
    strategies = ordered_unique(r["strategy"] for r in records)
    plt = _pyplot()
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(strategies)}
    stats, counts = aggregate(records), status_counts(records)
    verdict_list = verdicts(records)
    pairs = group_by_pair(records)
    published = _published(run_dir)
    total = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "skipped")}

    parts = [_macro("header")(run_id, matrix, len(records), total, [(p, f"pair-{slug(p)}") for p in pairs],
                              len(strategies))]
    parts.append(_env_block(records) if records else Markup())
    parts.append(_macro("verdicts")(verdict_list))
    for pair, pair_records in pairs.items():
        plots = plot_pair(run_dir, pair, pair_records, colors)
        sid = f"pair-{slug(pair)}"
        transfer = _transfer_panel(run_dir, sid, pair_records, plot_transfer(run_dir, pair, pair_records, colors))
        parts.append(_macro("pair_section")(
            pair, sid, pair_records[0], [v for v in verdict_list if v.pair == pair],
            _pair_table(pair, pair_records, stats, counts, published), _not_ok_lines(pair_records),
            concurrency_note(pair_records), transfer,
            {kind: _uri(path) for kind, path in plots.items()}, _samples(run_dir, pair_records)))
    parts.append(_not_ok_table(records))
    matrix_file = matrix_path(run_dir)
    if matrix_file.is_file():
        parts.append(_macro("matrix_details")(matrix_file.read_text()))
    page = _templates().get_template("report.html").render(title=f"ganbench · {run_id}", parts=parts)
    out = report_path(run_dir)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def plot_paths(run_dir: str | os.PathLike) -> list[Path]:
    """The PNGs the last `write_report` left in run_dir/plots (the W&B summary reuses them)."""
    return sorted(plots_dir(run_dir).glob("*.png"))
