"""The `bench` command: run a matrix, list what exists, show, report and compare results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.rundir import CSV_FILE, PARQUET_FILE, results_path
from bench.wandb_target import WandbTarget, add_wandb_arguments
from ganlib.config import ArgumentParser
from ganlib.errors import UserError, exit_on_user_error


def _cmd_run(args) -> int:
    from bench.run import RunOptions, run_matrix
    from bench.shard import parse_shard

    return run_matrix(args.matrix, RunOptions(
        only=args.only, resume=args.resume, retry_failed=args.retry_failed, out=args.out, dry_run=args.dry_run,
        wandb=WandbTarget.from_args(args), base_config=args.accelerate_config, cache_dir=args.cache_dir,
        workers=args.workers, cells_per_gpu=args.cells_per_gpu,
        shard=parse_shard(args.shard) if args.shard is not None else None))


def _cmd_list(args) -> int:
    from bench.matrix import augments_help, preset_names, setup_names
    from ganlib.data import DATASETS
    from ganlib.extractors import EXTRACTORS
    from ganlib.losses import LOSSES
    from ganlib.nets import NETWORKS
    from ganlib.strategies import STRATEGIES

    sections = [
        ("presets", [(n, "") for n in preset_names()]),
        ("setups", [(n, "") for n in setup_names()]),
        ("strategies", [(n, STRATEGIES.get(n).paper) for n in STRATEGIES.names()]),
        ("augmentations", augments_help()),
        ("networks", [(n, NETWORKS.get(n).description) for n in NETWORKS.names()]),
        ("datasets", [(n, DATASETS.get(n).description) for n in DATASETS.names()] + [("folder:PATH", "a folder of images")]),
        ("extractors", [(n, EXTRACTORS.get(n).description) for n in EXTRACTORS.names()]),
        ("losses", [(n, "") for n in LOSSES.names()]),
    ]
    for title, rows in sections:
        print(f"{title}:")
        width = max(len(n) for n, _ in rows)
        for name, text in rows:
            print(f"  {name:<{width}}  {text}".rstrip())
    return 0


def _cmd_show(args) -> int:
    from bench.show import show

    print(show(*[_run_dir(d) for d in args.run_dir], per_cell=args.cells))
    return 0


def _cmd_report(args) -> int:
    from bench.report import write_report

    print(write_report(_run_dir(args.run_dir)))
    return 0


def _cmd_export(args) -> int:
    from bench.export import write_csv, write_parquet

    run_dir = _run_dir(args.run_dir)
    if args.csv is None and args.parquet is None:
        raise UserError("bench export: say which table to write: --csv [PATH] and/or --parquet [PATH]")
    if args.parquet is not None:  # first: it is the one that can fail for a missing package
        print(write_parquet(run_dir, args.parquet or run_dir / PARQUET_FILE))
    if args.csv is not None:
        print(write_csv(run_dir, args.csv or run_dir / CSV_FILE))
    return 0


def _cmd_wandb_report(args) -> int:
    from bench.wandb_report import publish

    print(publish(_run_dir(args.run_dir), args.entity, args.project, args.title))
    return 0


def _run_dir(text: str) -> Path:
    """`text` as a run directory (checked here, not as an argparse type, which would swallow the message)."""
    path = Path(text)
    if not results_path(path).is_file():
        raise UserError(f"{text} is not a bench run directory (no results.jsonl)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench", description="ganbench: compare GAN transfer strategies.")
    parser.add_version()
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a matrix (a preset name or a YAML file; default: the default preset)")
    run.add_argument("matrix", nargs="?", default=None, help="preset name or matrix YAML file")
    run.add_argument("--only", default=None, help="keep matching cells: strategy=finetune,pair=mnist5k*,setup=...")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue a run, skipping finished cells")
    run.add_argument("--retry-failed", action="store_true", help="with --resume: rerun failed cells too")
    run.add_argument("--out", type=Path, default=None, metavar="DIR", help="run directory (default runs/<run id>)")
    run.add_argument("--dry-run", action="store_true", help="list the cells without training")
    add_wandb_arguments(run, "auto", "W&B mode: auto = online with credentials (WANDB_API_KEY or netrc), else offline")
    run.add_argument("--accelerate-config", type=Path, default=None, metavar="FILE",
                     help="base Accelerate config (e.g. accelerate_config.yaml) that each setup overrides")
    run.add_argument("--cache-dir", type=Path, default=None, help="cache root (default $GANBENCH_CACHE or ~/.cache/ganbench)")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="cells run side by side per one-process setup (default: the matrix's `workers`, else "
                          "cores / threads_per_process on a CPU, one per visible GPU); 1 = one at a time")
    run.add_argument("--cells-per-gpu", type=int, default=None, metavar="K",
                     help="one-GPU setups: K workers per visible GPU (packs small networks onto one GPU)")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run the I-th of N cost-balanced slices of the cells (jobs of one run may share --out)")
    run.set_defaults(func=_cmd_run)

    lst = sub.add_parser("list", help="presets, setups, strategies, networks, datasets, extractors")
    lst.set_defaults(func=_cmd_list)

    show = sub.add_parser("show", help="print a run's results table and verdicts")
    show.add_argument("run_dir", nargs="+", help="run directories (several: e.g. shards that wrote one each)")
    show.add_argument("--cells", action="store_true", help="one row per cell and seed")
    show.set_defaults(func=_cmd_show)

    report = sub.add_parser("report", help="write DIR/report.html")
    report.add_argument("run_dir", help="a run directory (holds results.jsonl)")
    report.set_defaults(func=_cmd_report)

    export = sub.add_parser("export", help="one flat row per cell, the metrics as columns (CSV, Parquet)")
    export.add_argument("run_dir", help="a run directory (holds results.jsonl)")
    export.add_argument("--csv", nargs="?", const="", default=None, metavar="PATH",
                        help="write a CSV table (default path RUN_DIR/cells.csv)")
    export.add_argument("--parquet", nargs="?", const="", default=None, metavar="PATH",
                        help="write a Parquet table (default RUN_DIR/cells.parquet; needs pandas and pyarrow)")
    export.set_defaults(func=_cmd_export)

    wreport = sub.add_parser("wandb-report", help="publish a W&B Report of a run (needs the wandb-report extra)")
    wreport.add_argument("run_dir", help="a run directory whose W&B runs are online (bench run --wandb, wandb sync)")
    wreport.add_argument("--entity", required=True, help="W&B entity (team or user) that owns the project")
    wreport.add_argument("--project", default="ganbench", help="W&B project of the runs (default ganbench)")
    wreport.add_argument("--title", default=None, help="report title (default: ganbench <run id>)")
    wreport.set_defaults(func=_cmd_wandb_report)

    compare = sub.add_parser("compare", help="compare two runs (exit 1 on regression)", add_help=False)
    compare.set_defaults(func=None)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        from bench.compare import main_compare

        return main_compare(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
