"""bench/run.py, bench/worker.py, bench/cell.py: `bench run` end to end on the CPU.

A tiny matrix runs through the real `bench` command with a 1-process and a 2-process setup and a
GPU setup this machine lacks; failures are injected at run time (GANBENCH_FAULT) and workers are
killed for real. The records must carry every field of the schema, failures must stay in their
cell, and a killed launch or a killed `bench run` must finish without running a cell twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import bench.run as run_module
from bench.__main__ import main as bench_main
from bench.cell import run_cell
from bench.matrix import load_matrix, parse_matrix
from bench.results import latest_per_cell, load_records
from bench.run import RunOptions
from bench.rundir import LOCK_FILE
from bench.wandb_target import WandbTarget
from ganlib.errors import UserError
from ganlib.distributed import TIMEOUT_ENV, make_accelerator
from ganbench_faults import FAULT_ENV

BENCH = Path(sys.executable).with_name("bench")
PAIR = "mnist5k-c0-4_2_mnist5k-c5-9-n25"
TRANSFER_STEPS = 20


def tiny_matrix(**changes) -> dict:
    """Width 8, batch 16, 20 source and 20 transfer steps, 100 FID samples: seconds per cell."""
    data = {
        "name": "tiny",
        "network": {"name": "dcgan", "size": 28, "width": 8},
        "pairs": [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"}],
        "strategies": ["scratch", "finetune", {"name": "freeze_d", "options": {"layers": 1}}],
        "setups": ["cpu-1proc", "cpu-2proc", "1xgpu-bf16"],
        "seeds": [0],
        "source_steps": 20,
        "transfer_steps": TRANSFER_STEPS,
        "train": {"batch": 16, "log_every": 5, "warmup_steps": 2},
        "metrics": {"num_samples": 100, "curve_samples": 50, "eval_every": 10, "target_fid": 300.0},
    }
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: sources and real-image statistics are computed once."""
    return tmp_path_factory.mktemp("cache")


def bench_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "WORLD_SIZE")}
    return {**env, "GANBENCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **extra}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BENCH), *args, "--wandb", "disabled"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_bench_run(matrix_file: Path, run_dir: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    """`bench run MATRIX --out RUN_DIR` in the background (cwd: the matrix's folder), output as text."""
    return subprocess.Popen([str(BENCH), "run", str(matrix_file), "--out", str(run_dir), "--wandb", "disabled"],
                            cwd=matrix_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def records_of(run_dir: Path) -> list[dict]:
    return load_records(run_dir) if (run_dir / "results.jsonl").exists() else []


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180.0) -> None:
    """Poll `predicate()` every 0.1 s until true; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"bench ended (code {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- the main run: 1-process and 2-process setups, injected failures, a GPU setup (skipped on CPU) -

FAULTS = f"scratch-{PAIR}-cpu-1proc-s0=option;scratch-{PAIR}-cpu-2proc-s0=nan"


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, cache):
    """`bench run` of the tiny matrix: scratch fails in both CPU setups (a bad option, then NaN)."""
    root = tmp_path_factory.mktemp("main")
    matrix_file = write(root / "tiny.yaml", tiny_matrix())
    run_dir = root / "run"
    proc = bench(["run", str(matrix_file), "--out", str(run_dir)], root, bench_env(cache, **{FAULT_ENV: FAULTS}))
    return proc, run_dir, load_matrix(str(matrix_file))


def by_id(run_dir: Path) -> dict[str, dict]:
    return {r["cell_id"]: r for r in records_of(run_dir)}


def _id(strategy: str, setup: str) -> str:
    return f"{strategy}-{PAIR}-{setup}-s0"


REQUIRED_METRICS = (
    "timing/source_pretrain_s", "timing/transfer_s", "timing/wall_s", "timing/device_seconds",
    "timing/time_to_target_s", "timing/steps_to_target", "timing/img_per_s", "timing/step_time_p50_ms",
    "timing/step_time_p90_ms", "resources/peak_mem_gb", "resources/peak_mem_gb_per_process",
    "resources/mem_kind", "resources/optimizer_state_bytes", "params/trainable", "params/frozen",
    "quality/fid", "quality/kid_mean", "quality/kid_std", "quality/precision", "quality/recall",
    "quality/extractor", "quality/num_samples",
    "transfer/target_class_share", "transfer/class_coverage", "transfer/memorised_share", "transfer/nn_dist_ratio",
    "transfer/diversity", "transfer/diversity_space", "transfer/diversity_clusters",
    "perf/flops_per_step", "perf/achieved_tflops", "perf/peak_tflops", "perf/peak_fraction",
)
# The 1xgpu-bf16 cells run where a GPU is, and are skipped elsewhere: expectations follow this machine.
GPUS = torch.cuda.device_count()
GPU_CELLS = 3  # one per strategy of the tiny matrix


REQUIRED_ENV = ("python", "torch", "accelerate", "cuda", "devices", "device_count", "num_processes",
                "mixed_precision", "git_commit", "hostname")


@pytest.mark.slow
def test_run_exit_code_says_cells_failed(main_run):
    proc, run_dir, matrix = main_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    expected = "[bench] 7 ok, 2 failed, 0 skipped" if GPUS else "[bench] 4 ok, 2 failed, 3 skipped"
    assert expected in proc.stdout


@pytest.mark.slow
def test_one_record_per_planned_cell(main_run):
    _, run_dir, matrix = main_run
    counts = Counter(r["cell_id"] for r in records_of(run_dir))
    assert sorted(counts) == sorted(c.id for c in matrix.cells())
    assert set(counts.values()) == {1}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        json.loads(line)  # every line whole (written atomically)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["finetune", "freeze_d"])
@pytest.mark.parametrize("setup, procs", [("cpu-1proc", 1), ("cpu-2proc", 2)])
def test_ok_record_carries_every_field(main_run, strategy, setup, procs):
    _, run_dir, matrix = main_run
    r = by_id(run_dir)[_id(strategy, setup)]
    assert r["status"] == "ok" and r["reason"] is None, r["reason"]
    assert (r["strategy"], r["setup"], r["seed"], r["pair"], r["matrix"]) == (strategy, setup, 0, PAIR, "tiny")
    assert r["source"] == "mnist5k:classes=0-4" and r["target"] == "mnist5k:classes=5-9:n=25"
    m = r["metrics"]
    missing = [k for k in REQUIRED_METRICS if k not in m]
    assert not missing
    # the full config: transfer and source training, strategy, metrics, hardware
    cfg = r["config"]
    assert cfg["transfer"]["steps"] == TRANSFER_STEPS and cfg["transfer"]["width"] == 8
    assert cfg["source_pretrain"]["steps"] == 20 and cfg["source_pretrain"]["data"] == "mnist5k:classes=0-4"
    assert cfg["strategy"]["name"] == strategy and cfg["setup"]["num_processes"] == procs
    assert cfg["metrics"]["num_samples"] == 100
    # measurements
    assert m["timing/source_pretrain_s"] > 0 and m["timing/transfer_s"] > 0
    assert m["timing/wall_s"] > m["timing/transfer_s"]
    assert m["timing/device_seconds"] == pytest.approx(m["timing/transfer_s"] * procs)
    assert m["timing/img_per_s"] > 0 and m["timing/step_time_p90_ms"] >= m["timing/step_time_p50_ms"] > 0
    assert len(m["resources/peak_mem_gb_per_process"]) == procs
    assert m["resources/peak_mem_gb"] == max(m["resources/peak_mem_gb_per_process"]) > 0
    assert m["resources/mem_kind"] == "cpu_peak_rss" and m["resources/optimizer_state_bytes"] > 0
    assert m["params/trainable"] > 0
    # model FLOPs: per process, so the same in both setups; utilisation below this machine's matmul peak
    other = by_id(run_dir)[_id(strategy, "cpu-2proc" if procs == 1 else "cpu-1proc")]["metrics"]
    assert m["perf/flops_per_step"] == other["perf/flops_per_step"] > 0
    assert 0 < m["perf/achieved_tflops"] < m["perf/peak_tflops"]
    assert m["perf/peak_fraction"] == pytest.approx(m["perf/achieved_tflops"] / m["perf/peak_tflops"])
    assert m["quality/fid"] > 0 and m["quality/kid_std"] >= 0 and 0 <= m["quality/precision"] <= 1
    assert 0 <= m["quality/recall"] <= 1
    assert (m["quality/extractor"], m["quality/num_samples"]) == ("lenet-mnist5k", 100)
    # the FID curve every 10 steps, and the first point at or under the target
    curve = r["curves"]["fid"]
    assert [p["step"] for p in curve] == [0, 10, 20] and all(p["fid"] > 0 for p in curve)
    reached = [p for p in curve if p["fid"] <= 300.0]
    if reached:
        assert (m["timing/steps_to_target"], m["timing/time_to_target_s"]) == (reached[0]["step"], reached[0]["wall_s"])
    else:
        assert m["timing/steps_to_target"] is None and m["timing/time_to_target_s"] is None
    best = min(curve, key=lambda p: p["fid"])
    assert (m["quality/curve_fid_best"], m["quality/curve_fid_best_step"]) == (best["fid"], best["step"])
    assert r["curves"]["train"][-1]["step"] == TRANSFER_STEPS
    # environment
    env = r["env"]
    assert not [k for k in REQUIRED_ENV if k not in env]
    assert env["num_processes"] == env["device_count"] == len(env["devices"]) == procs
    assert env["torch"] == torch.__version__ and env["mixed_precision"] == "no"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["finetune", "freeze_d"])
def test_recorded_fid_is_the_fid_of_the_saved_generator(main_run, strategy, tmp_path):
    # recomputed here, in one process, from the cell's written weights and the matrix's metric settings
    from bench.cell import EVAL_SEED
    from ganlib import checkpoint as ckpt
    from ganlib.data import load_images
    from ganlib.metrics import MetricConfig, evaluate_generator
    from ganlib.nets import NetConfig, build_networks

    _, run_dir, matrix = main_run
    r = by_id(run_dir)[_id(strategy, "cpu-1proc")]
    cell = next(c for c in matrix.cells() if c.id == r["cell_id"])
    t = r["config"]["transfer"]
    G, _ = build_networks(NetConfig(t["net"], t["size"], t["channels"] or 1, t["latent_dim"], t["width"]))
    ckpt.load_weights(run_dir / r["artifacts"]["dir"] / "generator.safetensors", G)
    m = matrix.metrics
    cfg = MetricConfig(extractor=m.extractor, num_samples=m.num_samples, precision_recall=m.precision_recall,
                       inception_weights=m.inception_weights, cache_dir=str(tmp_path))
    real = load_images(cell.pair.eval_target, t["size"], t["channels"] or 1).images
    direct = evaluate_generator(make_accelerator("no"), G, real, "recomputed", cfg, seed=EVAL_SEED)
    assert r["metrics"]["quality/fid"] == pytest.approx(direct["quality/fid"], rel=1e-6)
    assert r["metrics"]["quality/kid_mean"] == pytest.approx(direct["quality/kid_mean"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["cpu-1proc", "cpu-2proc"])
def test_cell_folder_has_checkpoint_grids_and_log(main_run, setup):
    _, run_dir, _ = main_run
    r = by_id(run_dir)[_id("finetune", setup)]
    art = r["artifacts"]
    cell_dir = run_dir / art["dir"]
    assert (cell_dir / "checkpoint" / "generator.safetensors").is_file()
    assert (cell_dir / "generator.safetensors").is_file()
    # 8 images of 28 px a row, 1 px padding: 64 samples, and the 25 training shots of the target
    for key, rows in (("samples", 8), ("real", 4)):
        with Image.open(run_dir / art[key]) as img:
            assert img.size == (8 * 29 + 1, rows * 29 + 1)
    log = (run_dir / art["log"]).read_text()
    assert r["cell_id"] in log and f"step {TRANSFER_STEPS}" in log and "quality/fid" in log


@pytest.mark.slow
def test_transfer_strategies_share_one_source_and_freezing_shows_in_the_counts(main_run):
    _, run_dir, _ = main_run
    recs = by_id(run_dir)
    for setup in ("cpu-1proc", "cpu-2proc"):
        fine, frozen = recs[_id("finetune", setup)]["metrics"], recs[_id("freeze_d", setup)]["metrics"]
        assert fine["timing/source_cache_hit"] is False and frozen["timing/source_cache_hit"] is True
        assert fine["timing/source_pretrain_s"] == frozen["timing/source_pretrain_s"]  # the cached cost
        assert fine["params/frozen"] == 0 < frozen["params/frozen"]
        assert frozen["params/trainable"] + frozen["params/frozen"] == fine["params/trainable"]
        assert frozen["resources/optimizer_state_bytes"] < fine["resources/optimizer_state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("setup, words", [("cpu-1proc", ["no_such_option"]), ("cpu-2proc", ["nan", "diverged"])])
def test_injected_failure_is_a_failed_cell_and_the_matrix_goes_on(main_run, setup, words):
    _, run_dir, _ = main_run
    recs = by_id(run_dir)
    r = recs[_id("scratch", setup)]
    assert r["status"] == "failed"
    assert all(w in r["reason"] for w in words) and "\n" not in r["reason"], r["reason"]
    assert r["config"]["strategy"]["name"] == "scratch" and r["env"]["devices"]
    log = (run_dir / r["artifacts"]["log"]).read_text()
    assert "Traceback" in log  # the one-line reason in the record, the traceback in the cell's log
    assert recs[_id("finetune", setup)]["status"] == "ok"  # ran after the failure in the same launch


@pytest.mark.slow
def test_gpu_setup_runs_where_a_gpu_is_and_is_skipped_with_the_reason_elsewhere(main_run):
    _, run_dir, matrix = main_run
    gpu_cells = [r for r in records_of(run_dir) if r["setup"] == "1xgpu-bf16"]
    assert len(gpu_cells) == GPU_CELLS
    if GPUS:
        assert all(r["status"] == "ok" and r["env"]["mixed_precision"] == "bf16" for r in gpu_cells)
        assert (run_dir / "launch" / "1xgpu-bf16.yaml").exists()
        return
    for r in gpu_cells:
        assert r["status"] == "skipped" and r["reason"] == "needs 1 GPU(s), 0 present"
        assert r["env"]["git_commit"] == by_id(run_dir)[_id("finetune", "cpu-1proc")]["env"]["git_commit"]
        assert not (run_dir / "cells" / r["cell_id"]).exists()
    assert not (run_dir / "launch" / "1xgpu-bf16.yaml").exists()


@pytest.mark.slow
def test_run_directory_layout(main_run):
    _, run_dir, matrix = main_run
    assert yaml.safe_load((run_dir / "matrix.yaml").read_text()) == matrix.raw
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["cells"] == [c.id for c in matrix.cells()]
    assert {r["run_id"] for r in records_of(run_dir)} == {plan["run_id"]}
    assert (run_dir / "report.html").is_file()
    for setup in ("cpu-1proc", "cpu-2proc"):
        assert (run_dir / "launch" / f"{setup}.log").is_file() and (run_dir / "launch" / f"{setup}.pid").is_file()


@pytest.mark.slow
def test_show_prints_every_cell_of_the_run(main_run, capsys):
    _, run_dir, _ = main_run
    assert bench_main(["show", str(run_dir), "--cells"]) == 0
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()]
    for r in records_of(run_dir):
        assert [r["strategy"], r["setup"], str(r["seed"]), r["status"]] in rows, r["cell_id"]


@pytest.mark.slow
def test_resume_of_a_finished_run_reruns_nothing(main_run, cache):
    _, run_dir, _ = main_run
    before = (run_dir / "results.jsonl").read_bytes()
    proc = bench(["run", "--resume", str(run_dir)], run_dir.parent, bench_env(cache))
    assert proc.returncode == 1  # the two failed cells are still the latest word on them
    assert (run_dir / "results.jsonl").read_bytes() == before  # no cell ran, no skip said twice
    assert "cell 1/" not in proc.stdout


# --- a killed launch is relaunched once and continues after the last finished cell -------------

@pytest.mark.slow
def test_killed_worker_is_relaunched_and_finishes_without_rerunning_cells(tmp_path, cache):
    matrix_file = write(tmp_path / "kill.yaml", tiny_matrix(name="kill", strategies=["finetune"], seeds=[0, 1, 2],
                                                             setups=["cpu-2proc"]))
    run_dir = tmp_path / "run"
    proc = start_bench_run(matrix_file, run_dir, bench_env(cache))
    try:
        wait_for(lambda: len(records_of(run_dir)) >= 1, proc, "the first record")
        pid = int((run_dir / "launch" / "cpu-2proc.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        done_at_kill = len(records_of(run_dir))
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert done_at_kill < 3  # killed mid-matrix
    assert proc.returncode == 0, out
    assert "relaunching to continue" in out
    assert int((run_dir / "launch" / "cpu-2proc.pid").read_text()) != pid  # a second launch ran
    counts = Counter(r["cell_id"] for r in records_of(run_dir))
    assert sorted(counts) == sorted(c.id for c in load_matrix(str(matrix_file)).cells())
    assert set(counts.values()) == {1}
    assert {r["status"] for r in records_of(run_dir)} == {"ok"}


@pytest.mark.slow
def test_killed_bench_leaves_no_worker_and_resume_finishes_the_rest(tmp_path, cache):
    matrix_file = write(tmp_path / "group.yaml", tiny_matrix(name="group", strategies=["scratch"], seeds=[0, 1, 2],
                                                              setups=["cpu-1proc"]))
    run_dir = tmp_path / "run"
    proc = start_bench_run(matrix_file, run_dir, bench_env(cache), start_new_session=True)
    try:
        wait_for(lambda: len(records_of(run_dir)) >= 1, proc, "the first record")
        worker_pid = int((run_dir / "launch" / "cpu-1proc.pid").read_text())
        os.killpg(proc.pid, signal.SIGKILL)  # the whole `bench run` process group, as a job scheduler would
        proc.wait(timeout=30)
    finally:
        proc.kill()
    first = {r["cell_id"]: r for r in records_of(run_dir)}
    assert len(first) < 3
    deadline = time.monotonic() + 5  # less than a cell takes: an orphan would finish its cell and record it
    while not gone(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker_pid), "the worker outlived the `bench run` that launched it"
    time.sleep(1)
    assert {r["cell_id"] for r in records_of(run_dir)} == set(first), "a cell was recorded after bench died"

    again = bench(["run", "--resume", str(run_dir)], tmp_path, bench_env(cache))
    assert again.returncode == 0, again.stdout + again.stderr
    records = records_of(run_dir)
    counts = Counter(r["cell_id"] for r in records)
    assert sorted(counts) == sorted(c.id for c in load_matrix(str(matrix_file)).cells())
    assert set(counts.values()) == {1}  # finished cells were not run again
    assert all(r["status"] == "ok" for r in records)
    assert all(by_id(run_dir)[cid] == rec for cid, rec in first.items())


# --- in-process: the relaunch policy and each kind of cell failure ------------------------------

def test_launch_that_keeps_dying_gives_up_after_one_relaunch(tmp_path, monkeypatch, capsys):
    """Every launch dies before finishing a cell: one relaunch, then the cells are recorded as failed."""
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    launches = []

    def dying_launch(setup, run_dir, *args):
        launches.append(setup.name)
        return 137  # what a SIGKILLed launcher returns

    monkeypatch.setattr(run_module, "launch", dying_launch)
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(strategies=["finetune"], setups=["cpu-2proc", "1xgpu-bf16"]))
    code = run_module.run_matrix(str(matrix_file), RunOptions(out=tmp_path / "run", wandb=WandbTarget("disabled")))
    assert code == 1
    assert launches == ["cpu-2proc", "cpu-2proc"]
    recs = by_id(tmp_path / "run")
    died = recs[_id("finetune", "cpu-2proc")]
    assert died["status"] == "failed" and "launch died 2 times (last exit code 137)" in died["reason"]
    assert "launch/cpu-2proc.log" in died["reason"] and died["env"]["python"]
    assert recs[_id("finetune", "1xgpu-bf16")]["status"] == ("failed" if GPUS else "skipped")


def test_pool_workers_that_keep_dying_at_start_up_fail_the_cells_after_one_relaunch(tmp_path, monkeypatch, capsys):
    """Each worker of a one-process setup's pool exits at once (code 3): each slot is started again
    once, then the cells left are recorded as failed and the run ends."""
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    started = []

    def dying_worker(setup, run_dir, base_config, args, gpu=None):
        started.append(args[args.index("--name") + 1])
        return [sys.executable, "-c", "raise SystemExit(3)"]

    monkeypatch.setattr(run_module, "_worker_command", dying_worker)
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(strategies=["scratch", "finetune", "ewc"],
                                                         setups=["cpu-1proc"]))
    code = run_module.run_matrix(str(matrix_file), RunOptions(out=tmp_path / "run", wandb=WandbTarget("disabled"), workers=2))
    assert code == 1
    assert sorted(started) == ["cpu-1proc", "cpu-1proc", "cpu-1proc.w1", "cpu-1proc.w1"]
    recs = by_id(tmp_path / "run")
    assert len(recs) == 3 and all(r["status"] == "failed" for r in recs.values())
    assert all("launch died 2 times (last exit code 3)" in r["reason"] for r in recs.values())


@pytest.fixture
def one_process(tmp_path, monkeypatch):
    """A 1-process accelerator, the tiny matrix (scratch only: no pretraining), a run directory."""
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no LPIPS weights: the same metrics on every machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is as fast and does not fight other processes
    matrix = parse_matrix(tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"], transfer_steps=10), "tiny")
    yield make_accelerator(), matrix, matrix.cells()[0], tmp_path / "run"
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fault, words", [
    ("oom", ["out of memory"]),
    ("option", ["no_such_option"]),
    ("nan", ["nan", "diverged"]),
])
def test_cell_failure_becomes_a_failed_record(one_process, monkeypatch, fault, words):
    accelerator, matrix, cell, run_dir = one_process
    monkeypatch.setenv(FAULT_ENV, f"nothing-matches=oom;{cell.id[:8]}*={fault}")
    record = run_cell(accelerator, matrix, cell, run_dir, "run-id")
    assert record["status"] == "failed" and record["cell_id"] == cell.id
    assert all(w in record["reason"] for w in words) and "\n" not in record["reason"], record["reason"]
    assert record["env"]["num_processes"] == 1 and record["config"]["transfer"]["steps"] == 10
    assert record["metrics"]["timing/wall_s"] > 0
    log = (run_dir / record["artifacts"]["log"]).read_text()
    assert "Traceback" in log and record["reason"] in log


def test_scratch_cell_records_no_source(one_process):
    accelerator, matrix, cell, run_dir = one_process
    record = run_cell(accelerator, matrix, cell, run_dir, "run-id")
    assert record["status"] == "ok", record["reason"]
    m = record["metrics"]
    assert m["timing/source_pretrain_s"] is None and m["timing/source_cache_hit"] is None
    assert not (run_dir.parent / "cache" / "sources").exists()
    assert (run_dir / record["artifacts"]["samples"]).is_file()


def test_cell_records_transfer_fidelity_and_a_nearest_shot_grid(one_process):
    accelerator, matrix, cell, run_dir = one_process
    record = run_cell(accelerator, matrix, cell, run_dir, "run-id")
    assert record["status"] == "ok", record["reason"]
    m = record["metrics"]
    assert 0 <= m["transfer/target_class_share"] <= 1 and 0 <= m["transfer/class_coverage"] <= 1
    assert 0 <= m["transfer/memorised_share"] <= 1 and m["transfer/nn_dist_ratio"] > 0
    assert m["transfer/diversity"] > 0 and m["transfer/diversity_space"] == "features:lenet-mnist5k"
    assert m["transfer/diversity_clusters"] + m["transfer/diversity_singletons"] <= 25 == m["transfer/num_shots"]
    with Image.open(run_dir / record["artifacts"]["nearest"]) as img:  # 8 samples above their nearest shots
        assert img.size == (8 * 29 + 1, 2 * 29 + 1)


# --- under the user's own launcher (how multi-node runs go) ---------------------------------------

def launch_two(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of two CPU processes (DDP over gloo) running `python -m bench ...`."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(run_module.free_port()),
           "-m", "bench", *args, "--wandb", "disabled"]
    return subprocess.run(cmd, cwd=cwd, env={**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_under_the_users_launch_runs_its_cells_in_that_process_group(tmp_path, cache):
    matrix_file = write(tmp_path / "ext.yaml", tiny_matrix(name="ext", strategies=["scratch"], setups=["cpu-1proc"]))
    proc = launch_two(["run", str(matrix_file)], tmp_path, bench_env(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # one directory, named by the main process for both
    (record,) = records_of(run_dir)
    assert record["status"] == "ok" and record["setup"] == "launch-2xcpu-no", record["reason"]
    assert record["env"]["num_processes"] == 2 and record["metrics"]["timing/img_per_s"] > 0
    assert 0 <= record["metrics"]["transfer/memorised_share"] <= 1  # scored on the main process, recorded once
    assert (run_dir / record["artifacts"]["nearest"]).is_file()
    assert (run_dir / "report.html").is_file() and "Grad strides" not in proc.stderr

    # the same directory again: refused on every process with one line, promptly, nothing changed
    before = (run_dir / "results.jsonl").read_text()
    proc = launch_two(["run", str(matrix_file), "--out", str(run_dir)], tmp_path, bench_env(cache))
    assert proc.returncode != 0 and proc.stderr.count("already holds a run") == 2, proc.stderr[-3000:]
    assert (run_dir / "results.jsonl").read_text() == before


# --- faults under the user's own launcher: a failed cell, a failure on one rank only ---------------

def two_cells(tmp_path: Path) -> Path:
    """Two scratch cells (seeds 0 and 1, no pretraining): the first is the one made to fail."""
    return write(tmp_path / "ext.yaml", tiny_matrix(name="ext", strategies=["scratch"], setups=["cpu-1proc"],
                                                    seeds=[0, 1], transfer_steps=10))


@pytest.mark.slow
def test_failed_cell_under_the_users_launch_is_recorded_and_the_next_cell_runs(tmp_path, cache):
    run_dir = tmp_path / "run"
    env = bench_env(cache, **{FAULT_ENV: "scratch-*-s0=option"})
    proc = launch_two(["run", str(two_cells(tmp_path)), "--out", str(run_dir)], tmp_path, env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a failed cell: exit 1, not a crash
    recs = {r["seed"]: r for r in records_of(run_dir)}
    assert recs[0]["status"] == "failed" and "no_such_option" in recs[0]["reason"], recs[0]["reason"]
    assert recs[1]["status"] == "ok", recs[1]["reason"]
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_failure_on_one_rank_only_is_recorded_with_its_reason_and_the_next_cell_runs(tmp_path, cache):
    """Rank 1 fails alone at the start of the cell; rank 0 waits in a collective until the (short)
    timeout; both record the cell as failed with rank 1's own reason, and go on together."""
    run_dir = tmp_path / "run"
    env = bench_env(cache, **{FAULT_ENV: "scratch-*-s0=oom@1", TIMEOUT_ENV: "8"})
    proc = launch_two(["run", str(two_cells(tmp_path)), "--out", str(run_dir)], tmp_path, env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    recs = {r["seed"]: r for r in records_of(run_dir)}
    reason = recs[0]["reason"]
    assert recs[0]["status"] == "failed" and reason.startswith("rank 1: out of memory") and FAULT_ENV in reason, reason
    assert recs[1]["status"] == "ok", recs[1]["reason"]
    assert proc.stdout.count("agreed: failed") == 2, proc.stdout[-3000:]  # each rank's own verdict


# --- the run directory: locked before anything in it is read or written ---------------------------

def test_second_run_into_a_directory_another_run_has_locked_writes_nothing_and_is_refused(tmp_path, monkeypatch):
    """The first run holds the lock but has not written its plan yet (the window of a simultaneous start)."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"]))
    with open(run_dir / LOCK_FILE, "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `bench run` is using"):
            run_module.run_matrix(str(matrix_file), RunOptions(out=run_dir, wandb=WandbTarget("disabled")))
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no plan, no matrix written


def test_resume_of_a_locked_directory_is_refused_before_reading_it(tmp_path):
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text("{torn")  # being written by the run that holds the lock
    with open(run_dir / LOCK_FILE, "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `bench run` is using"):
            run_module.run_matrix(None, RunOptions(resume=run_dir, wandb=WandbTarget("disabled")))


@pytest.mark.parametrize("args, words", [
    (["run", "{matrix}", "--out", "{file}"], "is a file"),
    (["run", "--resume", "{corrupt}"], "plan.json is corrupt"),
])
def test_bad_run_directories_are_one_line_exit_2(tmp_path, args, words):
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"]))
    (tmp_path / "afile").write_text("x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write(corrupt / "matrix.yaml", tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"]))
    (corrupt / "plan.json").write_bytes(b"\x00\xff{not json")
    args = [a.format(matrix=matrix_file, file=tmp_path / "afile", corrupt=corrupt) for a in args]
    proc = subprocess.run([str(BENCH), *args, "--wandb", "disabled"], cwd=tmp_path, capture_output=True, text=True,
                          env=bench_env(tmp_path / "cache"), timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_unwritable_cache_is_refused_before_any_cell_runs(tmp_path):
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(strategies=["scratch"], setups=["cpu-1proc"]))
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([str(BENCH), "run", str(matrix_file), "--out", str(tmp_path / "run"), "--wandb", "disabled"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=bench_env(tmp_path / "afile" / "cache"))
    assert proc.returncode == 2 and "cache directory" in proc.stderr and "not writable" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_dry_run_checks_the_data_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pairs = [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5:n=99999"}]  # more than class 5 has
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(pairs=pairs, setups=["cpu-1proc"]))
    with pytest.raises(UserError, match="n=99999"):
        run_module.run_matrix(str(matrix_file), RunOptions(dry_run=True, wandb=WandbTarget("disabled")))
    assert not (tmp_path / "runs").exists()


# --- the field's protocol in miniature: a checkpoint source, 10 shots, a separate test folder --------

def _image_folder(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.mark.slow
def test_fewshot_protocol_runs_from_a_checkpoint_skips_what_is_missing_and_resumes_it(tmp_path, cache):
    from test_rosinality import small_checkpoint

    small_checkpoint(tmp_path / "ffhq.pt", size=32, width=2, latent=16, channels=3)
    _image_folder(tmp_path / "data" / "babies" / "train", 10, seed=1)
    _image_folder(tmp_path / "data" / "babies" / "test", 40, seed=2)
    pair = {"source_checkpoint": "$GB_CKPT", "target": "folder:$GB_DATA/{}/train:n=10",
            "eval": "folder:$GB_DATA/{}/test", "fetch": "gdown 1abc -O {}.zip"}
    pairs = [{"id": d, **{k: v.format(d) for k, v in pair.items()}} for d in ("babies", "sketches")]
    matrix = tiny_matrix(network={"name": "stylegan2", "size": 32, "width": 2}, pairs=pairs,
                         strategies=["scratch", "finetune"], setups=["cpu-1proc"], transfer_steps=2,
                         train={"batch": 4, "latent_dim": 16, "warmup_steps": 0},
                         metrics={"num_samples": 60, "curve_samples": 20, "cap_at_real": False, "intra_lpips": True},
                         published=[{"citation": "Paper et al., Table 1", "url": "https://example.org/t1",
                                     "fid": {"babies": {"finetune": 104.79}}}])
    del matrix["source_steps"]   # every source a checkpoint: nothing to pretrain
    matrix_file, run_dir = write(tmp_path / "m.yaml", matrix), tmp_path / "run"
    env = bench_env(cache, GB_CKPT=str(tmp_path / "ffhq.pt"), GB_DATA=str(tmp_path / "data"))

    proc = bench(["run", str(matrix_file), "--out", str(run_dir)], tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = {(r["pair"], r["strategy"]): r for r in latest_per_cell(records_of(run_dir))}
    for strategy in ("scratch", "finetune"):
        ok = recs[("babies", strategy)]
        assert ok["status"] == "ok", ok["reason"]
        assert ok["source"] == "checkpoint:$GB_CKPT" and ok["config"]["source_pretrain"] is None
        m = ok["metrics"]
        assert (m["quality/num_samples"], m["quality/num_real"]) == (60, 40)   # 60 samples against 40 reals
        assert m["transfer/num_shots"] == 10 and m["transfer/num_heldout"] == 40   # the test folder, all held out
        assert (run_dir / ok["artifacts"]["nearest"]).is_file()                   # samples above their nearest shots
        assert m["transfer/intra_lpips_samples"] == 60                            # around the 10 shots of the folder
        assert m["transfer/intra_lpips"] is not None or "vgg16" in m["transfer/intra_lpips_reason"]
        skipped = recs[("sketches", strategy)]
        assert skipped["status"] == "skipped"
        assert skipped["reason"] == (f"target folder {tmp_path}/data/sketches/train does not exist (from "
                                     "$GB_DATA/sketches/train); to get the files: gdown 1abc -O sketches.zip")
    assert recs[("babies", "finetune")]["metrics"]["timing/source_pretrain_s"] is None
    assert "2 cell(s) skipped: target folder" in proc.stdout
    page = (run_dir / "report.html").read_text()
    assert "published FID" in page and "104.79 [1]" in page and "Paper et al., Table 1" in page

    _image_folder(tmp_path / "data" / "sketches" / "train", 10, seed=3)
    _image_folder(tmp_path / "data" / "sketches" / "test", 30, seed=4)
    proc = bench(["run", "--resume", str(run_dir)], tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    latest = latest_per_cell(records_of(run_dir))
    assert [r["status"] for r in latest] == ["ok"] * 4
    assert len(records_of(run_dir)) == 6   # babies ran once; sketches were skipped, then ran


def test_a_launch_runs_only_the_cells_resume_only_selected(one_process):
    """`bench run --resume DIR --only ...` hands its filter to each multi-process launch: the worker
    reads the whole plan, and ran every unfinished cell of its setup whatever --only said."""
    from bench import worker

    accelerator, _, _, run_dir = one_process
    matrix = parse_matrix(tiny_matrix(strategies=["scratch"], setups=["cpu-2proc"], seeds=[0, 1], transfer_steps=4,
                                      metrics={"num_samples": 20, "curve_samples": 20}), "tiny")
    run_module.write_plan(run_dir, matrix, "run-id", matrix.cells())
    ran = worker.run_setup(accelerator, run_dir, "cpu-2proc", WandbTarget("disabled"), only="seed=1")
    assert ran == 1 and [r["seed"] for r in records_of(run_dir)] == [1]


def test_dry_run_says_each_long_skip_reason_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GB_NOWHERE", raising=False)
    fetch = "gdown 1abc -O shots.zip && unzip -q shots.zip -d $GB_NOWHERE/shots (a fetch command long enough to footnote)"
    pairs = [{"source": "mnist5k:classes=0-4", "target": "folder:$GB_NOWHERE/shots:n=10", "fetch": fetch}]
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(pairs=pairs, setups=["cpu-1proc"]))
    assert run_module.run_matrix(str(matrix_file), RunOptions(dry_run=True, wandb=WandbTarget("disabled"))) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.endswith("[skipped: (1) below]") for line in lines) == 3   # scratch, finetune, freeze_d
    notes = [line for line in lines if line.startswith("(1) ")]
    assert notes == [f"(1) target folder $GB_NOWHERE/shots names $GB_NOWHERE, which is not set; to get the files: {fetch}"]
    assert not (tmp_path / "runs").exists()
