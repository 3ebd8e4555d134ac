"""bench/__main__.py: the `bench` command without training anything.

Bad input is one `error:` line, exit code 2 and no run directory; `--dry-run` lists cells and
starts nothing; `bench list` shows exactly what the registries hold; `bench show` and
`bench report` read a run directory. (End-to-end runs are in test_bench_run.py.)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bench.__main__ import main
from bench.matrix import load_matrix, preset_names, setup_names
from bench.run import write_plan
from bench.rundir import LOCK_FILE
from fakes import FAILED_CELL, FAILED_REASON, SKIPPED_CELL, SKIPPED_REASON, cell_id, make_fake_run
from ganlib.data import DATASETS
from ganlib.extractors import EXTRACTORS
from ganlib.losses import LOSSES
from ganlib.nets import NETWORKS
from ganlib.strategies import STRATEGIES

BENCH = Path(sys.executable).with_name("bench")
TINY = {
    "name": "tiny",
    "network": {"name": "dcgan", "size": 28, "width": 8},
    "pairs": [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"}],
    "strategies": ["scratch", "finetune"],
    "setups": ["cpu-1proc", "cpu-2proc", "1xgpu-bf16"],
    "seeds": [0],
    "source_steps": 20,
    "transfer_steps": 10,
    "train": {"batch": 16},
    "metrics": {"num_samples": 100, "curve_samples": 50, "eval_every": 10},
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Caches under tmp; run from tmp so the default runs/ directory would land there."""
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def write_matrix(path: Path, **changes) -> Path:
    data = {**TINY, **changes}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`bench ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


# --- bad input: exit 2, one line, nothing started -----------------------------------------------

BAD = [
    ("malformed YAML", "name: x\npairs: [\n", ["malformed YAML", "line"]),
    ("unknown strategy", dict(strategies=["finetune", "no_such"]), ["no_such"]),
    ("unknown dataset", dict(pairs=[{"source": "mnist5k", "target": "nodata:n=5"}]), ["nodata"]),
    ("unknown setup", dict(setups=["cpu-7proc"]), ["cpu-7proc"]),
    ("unknown option", dict(strategies=[{"name": "freeze_d", "options": {"layerz": 1}}]), ["layerz"]),
    ("duplicate cell ids", dict(strategies=["finetune", "finetune"]), ["duplicate cell id"]),
    ("classes the dataset lacks", dict(pairs=[{"source": "mnist5k", "target": "mnist5k:classes=5-12"}]),
     ["classes"]),
]


@pytest.mark.parametrize("label, content, words", BAD, ids=[b[0] for b in BAD])
def test_bad_matrix_exits_2_and_starts_nothing(tmp_path, capsys, label, content, words):
    path = tmp_path / "bad.yaml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_matrix(path, **content)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["run", str(path), "--out", str(out_dir), "--wandb", "disabled"], capsys)
    assert code == 2
    assert_one_error_line(err, *words)
    assert not out_dir.exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache" / "sources").exists()


@pytest.mark.parametrize("argv, words", [
    (["run", "no_such_preset"], ["no_such_preset", "default"]),
    (["run", "missing.yaml"], ["missing.yaml"]),
    (["run", "default", "--only", "strategy=no_such"], ["--only"]),
    (["run", "default", "--retry-failed"], ["--retry-failed", "--resume"]),
    (["run", "--resume", "not_a_run"], ["not_a_run"]),
    (["show", "not_a_run"], ["not_a_run"]),
    (["report", "not_a_run"], ["not_a_run"]),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, words):
    code, _, err = run_cli(argv + ["--wandb", "disabled"] if argv[0] == "run" else argv, capsys)
    assert code == 2
    assert_one_error_line(err, *words)
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def planned_run(tmp_path):
    """A run directory as `bench run` leaves it before the first launch (plan, resolved matrix)."""
    run_dir = tmp_path / "run"
    matrix = load_matrix(str(write_matrix(tmp_path / "tiny.yaml")))
    write_plan(run_dir, matrix, "20261127-000000-tiny", matrix.cells())
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file's bytes, but the (empty) lock file that any `bench run` on the directory takes first."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".bench.lock"}


def test_resume_with_another_matrix_exits_2_and_leaves_the_run_alone(tmp_path, capsys, planned_run):
    before = _snapshot(planned_run)
    other = write_matrix(tmp_path / "other.yaml", transfer_steps=11)
    code, _, err = run_cli(["run", str(other), "--resume", str(planned_run), "--wandb", "disabled"], capsys)
    assert code == 2
    assert_one_error_line(err, "different matrix")
    assert _snapshot(planned_run) == before


def test_new_run_into_an_existing_run_directory_exits_2(tmp_path, capsys, planned_run):
    before = _snapshot(planned_run)
    code, _, err = run_cli(["run", str(tmp_path / "tiny.yaml"), "--out", str(planned_run), "--wandb", "disabled"],
                           capsys)
    assert code == 2
    assert_one_error_line(err, "--resume")
    assert _snapshot(planned_run) == before


def test_second_runner_on_one_directory_exits_2(tmp_path, capsys, planned_run):
    with open(planned_run / LOCK_FILE, "a") as handle:  # as a running `bench run` holds it
        fcntl.flock(handle, fcntl.LOCK_EX)
        code, _, err = run_cli(["run", "--resume", str(planned_run), "--wandb", "disabled"], capsys)
    assert code == 2
    assert_one_error_line(err, "another `bench run`")
    assert not (planned_run / "results.jsonl").exists() and not (planned_run / "launch").exists()


def test_bad_input_through_the_installed_command(tmp_path):
    """The real entry point: exit code 2 and a single stderr line, no traceback, no directory."""
    bad = write_matrix(tmp_path / "bad.yaml", strategies=[{"name": "freeze_d", "options": {"nope": 1}}])
    out_dir = tmp_path / "out"
    proc = subprocess.run([str(BENCH), "run", str(bad), "--out", str(out_dir), "--wandb", "disabled"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GANBENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "nope", "bad.yaml")
    assert proc.stdout == "" and not out_dir.exists()


# --- --dry-run ----------------------------------------------------------------------------------

def _listed(out: str) -> list[str]:
    """Cell ids from the numbered lines (`  1. <cell id>   [skipped: ...]`) of a dry run."""
    return [line.split()[1] for line in out.splitlines() if re.match(r"\s*\d+\. ", line)]


def test_dry_run_lists_every_cell_and_starts_nothing(tmp_path, capsys):
    path = write_matrix(tmp_path / "tiny.yaml")
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(["run", str(path), "--dry-run", "--out", str(out_dir), "--wandb", "disabled"], capsys)
    assert code == 0
    cells = load_matrix(str(path)).cells()
    listed = _listed(out)
    assert listed == [c.id for c in cells]
    for line in out.splitlines():
        if "-1xgpu-bf16-" in line and not torch.cuda.device_count():
            assert "[skipped: needs 1 GPU(s), 0 present]" in line
        elif "-cpu-" in line or "-1xgpu-bf16-" in line:
            assert "skipped" not in line
    assert not out_dir.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_dry_run_of_the_default_preset_with_only(tmp_path, capsys):
    code, out, _ = run_cli(["run", "--dry-run", "--only", "strategy=finetune", "--wandb", "disabled"], capsys)
    assert code == 0
    matrix = load_matrix("default")
    expected = [c.id for c in matrix.cells() if c.strategy.id == "finetune"]
    listed = _listed(out)
    assert listed == expected and len(expected) == len(matrix.pairs) * len(matrix.augments["finetune"]) * len(matrix.seeds)
    assert not (tmp_path / "runs").exists()


# --- bench list ---------------------------------------------------------------------------------

def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = []
        elif line.strip():
            sections[current].append(line.split()[0])
    return sections


def test_list_shows_what_the_registries_hold(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    sections = _sections(out)
    assert sections["presets"] == preset_names()
    assert sections["setups"] == setup_names()
    assert sections["strategies"] == STRATEGIES.names()
    assert sections["networks"] == NETWORKS.names()
    assert sections["datasets"] == DATASETS.names() + ["folder:PATH"]
    assert sections["extractors"] == EXTRACTORS.names()
    assert sections["losses"] == LOSSES.names()


# --- bench show / report / compare on a run directory --------------------------------------------

@pytest.fixture
def fake_run(tmp_path):
    run_dir = tmp_path / "fake"
    return run_dir, make_fake_run(run_dir, images=False)


def test_show_prints_every_cell(capsys, fake_run):
    run_dir, records = fake_run
    code, out, _ = run_cli(["show", str(run_dir), "--cells"], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    for r in records:
        assert [r["strategy"], r["setup"], str(r["seed"]), r["status"]] in [row[:4] for row in rows], r["cell_id"]
    assert f"{cell_id(*FAILED_CELL)}: {FAILED_REASON}" in out
    assert f"{cell_id(*SKIPPED_CELL)}: {SKIPPED_REASON}" in out


def test_show_aggregated_has_a_row_per_strategy_and_setup(capsys, fake_run):
    run_dir, records = fake_run
    code, out, _ = run_cli(["show", str(run_dir)], capsys)
    assert code == 0
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert {(r["strategy"], r["setup"]) for r in records} <= rows
    assert cell_id(*FAILED_CELL) in out and cell_id(*SKIPPED_CELL) in out


def test_report_writes_html(capsys, fake_run):
    run_dir, _ = fake_run
    code, out, _ = run_cli(["report", str(run_dir)], capsys)
    assert code == 0 and out.strip() == str(run_dir / "report.html")
    assert (run_dir / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_compare_is_dispatched(tmp_path, capsys, fake_run):
    run_dir, _ = fake_run
    code, out, _ = run_cli(["compare", str(run_dir), str(run_dir), "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0
    assert json.loads((tmp_path / "c.json").read_text())["regressed"] is False


def _options(parser) -> list:
    """Every argument of `parser` and of its subcommands (argparse keeps subparsers in an action)."""
    out = []
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):  # the subcommands
            for sub in action.choices.values():
                out += _options(sub)
        else:
            out.append(action)
    return out


def test_every_flag_has_help_and_fixed_sets_list_their_choices():
    from bench.__main__ import build_parser
    from bench.worker import main as worker_main  # noqa: F401 - its parser is built in main
    from ganlib.config import ArgumentParser, add_arguments, field_docs

    missing = [a.option_strings or a.dest for a in _options(build_parser()) if not a.help]
    assert missing == []
    train = ArgumentParser()
    add_arguments(train)
    by_dest = {a.dest: a for a in train._actions}
    docs = field_docs()
    assert all(docs[name] for name in docs if name != "strategy_options"), docs  # each field has its comment
    for name, text in docs.items():
        if name in by_dest:
            assert by_dest[name].help == text  # the comment in TrainConfig is the one source
    assert [a.dest for a in train._actions if not a.help] == []
    assert list(by_dest["net"].choices) == NETWORKS.names()
    assert list(by_dest["strategy"].choices) == STRATEGIES.names()
    assert list(by_dest["loss"].choices) == LOSSES.names()
    assert "channels_last" in by_dest["memory_format"].choices and "bf16" in by_dest["mixed_precision"].choices


@pytest.mark.parametrize("module", ["bench", "ganlib.train"])
def test_version(module):
    import ganlib

    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith(f"(ganbench) {ganlib.__version__}")


def test_closed_pipe_ends_quietly(tmp_path):
    make_fake_run(tmp_path / "run")
    # the reader is gone before bench writes a byte (as `bench show | head -0` would be)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "show", str(tmp_path / "run"), "--cells"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_export_csv_is_one_flat_row_per_cell(tmp_path, capsys):
    import csv

    records = make_fake_run(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--csv", str(tmp_path / "cells.csv")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cells.csv")
    with open(tmp_path / "cells.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    latest = {r["cell_id"]: r for r in records}
    assert [row["cell_id"] for row in rows] == list(latest)  # one row per cell, in the file's order
    for row in rows:
        record = latest[row["cell_id"]]
        assert row["status"] == record["status"] and row["reason"] == (record["reason"] or "")
        for key, value in record["metrics"].items():  # every metric is a column of its own
            if isinstance(value, float):
                assert float(row[key]) == pytest.approx(value, rel=1e-12)
            elif isinstance(value, list):
                assert json.loads(row[key]) == value
            elif value is not None:
                assert row[key] == str(value)
    failed = next(row for row in rows if row["status"] == "failed")
    assert failed["quality/fid"] == "" and failed["reason"] == FAILED_REASON


def test_export_parquet_without_its_packages_says_what_to_install(tmp_path, capsys, monkeypatch):
    make_fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "run"), "--parquet", "--csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "pyarrow" in err and "pip install" in err
    assert not (tmp_path / "run" / "cells.parquet").exists() and not (tmp_path / "run" / "cells.csv").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run")])  # no table asked for
    assert "--csv" in capsys.readouterr().err
