"""The metric columns of `bench show` and the report: each metric's label, unit and format once,
then each table's columns in its order. A new column is one entry here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A metric aggregated over seeds (bench/results.py `aggregate`) and shown in tables."""

    key: str    # the record's metric key
    label: str  # short name
    unit: str   # '' when unitless
    spec: str   # format spec of one value (and of its std)


KEY_METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("quality/fid", "FID", "", ".2f"),
    Metric("quality/kid_mean", "KID", "", ".4f"),
    Metric("quality/precision", "precision", "", ".3f"),
    Metric("quality/recall", "recall", "", ".3f"),
    Metric("timing/img_per_s", "img/s", "img/s", ".0f"),
    Metric("timing/step_time_p50_ms", "step p50", "ms", ".1f"),
    Metric("timing/transfer_s", "transfer", "s", ".1f"),
    Metric("timing/wall_s", "wall", "s", ".1f"),
    Metric("timing/device_seconds", "device-s", "s", ".1f"),
    Metric("timing/time_to_target_s", "time to target", "s", ".1f"),
    Metric("resources/peak_mem_gb", "peak mem", "GB", ".2f"),
    Metric("transfer/target_class_share", "target classes", "", ".2f"),
    Metric("transfer/class_coverage", "coverage", "", ".2f"),
    Metric("transfer/memorised_share", "memorised", "", ".2f"),
    Metric("transfer/nn_dist_ratio", "NN dist ratio", "", ".2f"),
    Metric("transfer/diversity", "diversity", "", ".3g"),
    Metric("transfer/diversity_vs_real", "diversity / real", "", ".2f"),
    Metric("transfer/intra_lpips", "intra-LPIPS", "", ".3f"),
)}


@dataclass(frozen=True)
class Column:
    """One metric column of a table: its header there and whether a cell shows ± std."""

    header: str
    key: str
    with_std: bool = True

    @property
    def spec(self) -> str:
        return KEY_METRICS[self.key].spec


# The report's per-pair table (HTML, room for long headers; every cell mean ± std (n)).
REPORT_COLUMNS = (
    Column("FID ↓", "quality/fid"),
    Column("KID ↓", "quality/kid_mean"),
    Column("throughput (img/s) ↑", "timing/img_per_s"),
    Column("peak memory (GB)", "resources/peak_mem_gb"),
    Column("wall time (s)", "timing/wall_s"),
    Column("device time (s)", "timing/device_seconds"),
    Column("target classes ↑", "transfer/target_class_share"),
    Column("memorised ↓", "transfer/memorised_share"),
    Column("intra-LPIPS ↑", "transfer/intra_lpips"),
)

# `bench show`'s table (a terminal line: short headers, the std of FID only).
SHOW_COLUMNS = (
    Column("FID", "quality/fid"),
    Column("KID", "quality/kid_mean", with_std=False),
    Column("target cls", "transfer/target_class_share", with_std=False),
    Column("coverage", "transfer/class_coverage", with_std=False),
    Column("memorised", "transfer/memorised_share", with_std=False),
    Column("intra-LPIPS", "transfer/intra_lpips", with_std=False),
    Column("img/s", "timing/img_per_s", with_std=False),
    Column("peak mem GB", "resources/peak_mem_gb", with_std=False),
    Column("wall s", "timing/wall_s", with_std=False),
)
