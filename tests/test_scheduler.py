"""bench/scheduler.py and bench/shard.py: cell pools, shards, and what must not change with them.

Fast tests check the shard split and pool sizing on the presets and the bad-input lines; slow ones
run tiny matrices through the real `bench run` with pools of workers and concurrent shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.__main__ import main as bench_main
from bench.matrix import load_matrix, parse_matrix
from bench.results import load_records
from bench.scheduler import PoolOptions, pool_shape
from bench.shard import Shard, cost_share, parse_shard, split
from ganlib.errors import UserError
from ganlib.pretrain import source_key
from ganbench_faults import FAULT_ENV
import bench.run as run_module
from test_bench_run import BENCH, bench, bench_env, gone, records_of, tiny_matrix, wait_for, write

# --- shards: a pure split of the plan --------------------------------------------------------------


@pytest.mark.parametrize("preset", ["default", "nightly", "paper"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 40])
def test_shards_are_disjoint_and_together_the_whole_run(preset, n):
    matrix = load_matrix(preset)
    cells = matrix.cells()
    shards = split(matrix, cells, n)
    assert len(shards) == n
    ids = [c.id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.id for c in cells) and len(set(ids)) == len(ids)
    order = {c.id: i for i, c in enumerate(cells)}
    for shard in shards:  # plan order inside a shard
        assert [order[c.id] for c in shard] == sorted(order[c.id] for c in shard)
    assert split(matrix, cells, n) == shards  # every job of an array computes the same split


def test_paper_on_16_nodes_is_balanced_by_cost():
    matrix = load_matrix("paper")
    cells = matrix.cells()
    shares = [cost_share(matrix, part, cells) for part in split(matrix, cells, 16)]
    assert max(shares) <= 1.5 / 16  # the longest job within 1.5x of a perfect split (sources included)
    # a cell of the 8-GPU setups costs 8x a 1-GPU one: counts of cells per shard differ, costs do not
    counts = [len(part) for part in split(matrix, cells, 16)]
    assert max(counts) > min(counts)


def test_a_source_stays_in_one_shard_when_splitting_it_would_not_help():
    data = tiny_matrix(setups=["cpu-1proc"], strategies=["finetune", {"name": "freeze_d", "options": {"layers": 1}}],
                       pairs=[{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"},
                              {"source": "mnist5k", "target": "digits:n=100"}],
                       source_steps=1000, transfer_steps=10)
    matrix = parse_matrix(data, "m")
    shards = split(matrix, matrix.cells(), 2)
    assert [{c.pair.source for c in part} for part in shards] in ([{matrix.pairs[0].source}, {matrix.pairs[1].source}],
                                                                   [{matrix.pairs[1].source}, {matrix.pairs[0].source}])


@pytest.mark.parametrize("text", ["3/2", "0/0", "0/4", "1/0", "x", "1/2/3", "-1/2", ""])
def test_bad_shard_is_one_line(text):
    with pytest.raises(UserError, match="--shard"):
        parse_shard(text)


def test_good_shard():
    assert parse_shard("3/16") == Shard(3, 16) and parse_shard(" 1 / 1 ") == Shard(1, 1)


@pytest.mark.parametrize("args, words", [
    (["--shard", "3/2"], "--shard 3/2"),
    (["--shard", "0/0"], "--shard 0/0"),
    (["--workers", "0"], "--workers 0"),
    (["--cells-per-gpu", "2"], "--cells-per-gpu 2: no one-GPU setup"),
])
def test_bad_run_options_exit_2_with_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["run", "default", "--dry-run", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and err.count("\n") == 1, err


def test_dry_run_of_each_shard_lists_its_cells(capsys):
    bench_main(["run", "default", "--dry-run"])
    whole = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    listed = []
    for i in (1, 2, 3):
        bench_main(["run", "default", "--dry-run", "--shard", f"{i}/3"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"shard {i}/3: ")
        listed += [line.split()[1] for line in out[1:]]
    assert sorted(listed) == sorted(whole) and len(whole) == len(load_matrix("default").cells())


def test_shards_of_one_run_work_side_by_side_and_a_second_job_for_one_shard_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with run_module._only_runner(run_dir, Shard(1, 2)):
        with run_module._only_runner(run_dir, Shard(2, 2)):  # the other shard: fine
            pass
        with pytest.raises(UserError, match="running shard 1/2 of"):
            with run_module._only_runner(run_dir, Shard(1, 2)):
                pass
        with pytest.raises(UserError, match="another `bench run` is using"):  # the whole run, unsharded
            with run_module._only_runner(run_dir):
                pass
    with run_module._only_runner(run_dir):
        with pytest.raises(UserError, match="another `bench run` is using"):
            with run_module._only_runner(run_dir, Shard(2, 2)):
                pass


def test_a_shard_joins_only_the_same_run(tmp_path):
    matrix = parse_matrix(tiny_matrix(setups=["cpu-1proc"]), "m")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = run_module._claim_plan(run_dir, matrix, "run-a", matrix.cells(), Shard(1, 2))
    assert run_module._claim_plan(run_dir, matrix, "run-b", matrix.cells(), Shard(2, 2)) == first == "run-a"
    with pytest.raises(UserError, match="split into 2 shards"):
        run_module._claim_plan(run_dir, matrix, "run-c", matrix.cells(), Shard(1, 3))
    with pytest.raises(UserError, match="holds another run"):
        run_module._claim_plan(run_dir, matrix, "run-c", matrix.cells()[:1], Shard(2, 2))
    with pytest.raises(UserError, match="already holds a run"):
        run_module._claim_plan(run_dir, matrix, "run-d", matrix.cells(), None)


def test_matrix_workers_field():
    assert load_matrix("nightly").workers == 1  # the nightly gate measures throughput alone
    assert load_matrix("default").workers is None  # auto
    with pytest.raises(UserError, match="workers=0"):
        parse_matrix(tiny_matrix(workers=0), "m")


# --- pool sizing ---------------------------------------------------------------------------------

def test_cpu_pool_is_cores_over_threads_and_workers_overrides():
    setup = load_matrix("default").setup("cpu-1proc")
    shape = pool_shape(setup, PoolOptions(), 1, cpus=2, gpus=[])
    assert [s.name for s in shape.slots] == ["cpu-1proc", "cpu-1proc.w1"] and shape.per_device == 2
    assert {s.threads for s in shape.slots} == {1} and {s.gpu for s in shape.slots} == {None}
    assert len(pool_shape(setup, PoolOptions(), 2, cpus=16, gpus=[]).slots) == 8
    serial = pool_shape(setup, PoolOptions(workers=1), 1, cpus=16, gpus=[])
    assert len(serial.slots) == 1 and serial.per_device == 1


def test_gpu_pool_is_one_worker_per_gpu_times_cells_per_gpu():
    setup = load_matrix("paper").setup("1xgpu-bf16")
    gpus = ["2", "3", "5", "7"]  # CUDA_VISIBLE_DEVICES=2,3,5,7
    one = pool_shape(setup, PoolOptions(), None, cpus=32, gpus=gpus)
    assert [s.gpu for s in one.slots] == gpus and one.per_device == 1 and {s.threads for s in one.slots} == {8}
    four = pool_shape(setup, PoolOptions(cells_per_gpu=4), None, cpus=32, gpus=gpus)
    assert Counter(s.gpu for s in four.slots) == {g: 4 for g in gpus} and four.per_device == 4
    assert len({s.name for s in four.slots}) == 16


# --- end to end: pools and shards through the real `bench run` -------------------------------------

def _scratch_matrix(name: str, **changes) -> dict:
    """Scratch cells (no source to pretrain), two per seed (default seeds 0 and 1), a few steps each."""
    settings = dict(name=name, setups=["cpu-1proc"], transfer_steps=6, seeds=[0, 1],
                    strategies=["scratch", {"name": "scratch", "id": "scratch2"}],
                    metrics={"num_samples": 50, "curve_samples": 50, "eval_every": 0})
    return tiny_matrix(**{**settings, **changes})


@pytest.mark.slow
def test_workers_1_and_2_give_bitwise_the_same_fids_and_weights(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-determinism")
    matrix_file = write(tmp_path / "m.yaml", tiny_matrix(
        name="det", setups=["cpu-1proc"], transfer_steps=6, seeds=[0, 1],
        strategies=["scratch", "finetune", {"name": "freeze_d", "options": {"layers": 1}}],
        metrics={"num_samples": 50, "curve_samples": 50, "eval_every": 3}))
    runs = {}
    for workers in (2, 1):  # the pool first: its cells pretrain the source, the serial run reuses it
        run_dir = tmp_path / f"w{workers}"
        proc = bench(["run", str(matrix_file), "--out", str(run_dir), "--workers", str(workers)], tmp_path,
                     bench_env(cache))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[workers] = {r["cell_id"]: r for r in load_records(run_dir)}
    assert sorted(runs[1]) == sorted(runs[2]) and len(runs[1]) == 6
    assert {r["metrics"]["timing/concurrent_cells"] for r in runs[2].values()} == {2}
    assert {r["metrics"]["timing/concurrent_cells"] for r in runs[1].values()} == {1}
    for cell_id, serial in runs[1].items():
        pooled = runs[2][cell_id]
        for key in ("quality/fid", "quality/kid_mean", "quality/precision", "quality/recall"):
            assert pooled["metrics"][key] == serial["metrics"][key], (cell_id, key)
        curve = lambda record: [(p["step"], p["fid"]) for p in record["curves"]["fid"]]
        assert curve(pooled) == curve(serial) and len(curve(serial)) == 3, cell_id
        for name in ("generator.safetensors", "discriminator.safetensors"):
            assert (tmp_path / "w2" / "cells" / cell_id / name).read_bytes() == \
                   (tmp_path / "w1" / "cells" / cell_id / name).read_bytes(), (cell_id, name)


@pytest.mark.slow
def test_a_worker_killed_in_a_cell_is_relaunched_once_then_the_cell_fails_and_the_pool_goes_on(tmp_path,
                                                                                             tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-kill")
    matrix_file = write(tmp_path / "m.yaml", _scratch_matrix("kill"))
    victim = "scratch2-mnist5k-c0-4_2_mnist5k-c5-9-n25-cpu-1proc-s0"
    run_dir = tmp_path / "run"
    proc = bench(["run", str(matrix_file), "--out", str(run_dir), "--workers", "2"], tmp_path,
                 bench_env(cache, **{FAULT_ENV: f"{victim}=kill"}))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"died in {victim}" in proc.stdout and "relaunching to run it again" in proc.stdout
    counts = Counter(r["cell_id"] for r in records_of(run_dir))
    assert sorted(counts) == sorted(c.id for c in load_matrix(str(matrix_file)).cells())
    assert set(counts.values()) == {1}  # each cell once: the victim's failure, the others' results
    by_id = {r["cell_id"]: r for r in records_of(run_dir)}
    assert by_id[victim]["status"] == "failed"
    assert "died while running this cell 2 times" in by_id[victim]["reason"]
    assert all(r["status"] == "ok" for cid, r in by_id.items() if cid != victim)
    assert "[bench] 3 ok, 1 failed, 0 skipped" in proc.stdout


def _blocked_on(path: Path) -> int:
    """How many other processes wait for the lock `path` right now: the cache lock polls (a bounded
    wait), so a waiter is a process holding the file open (Linux: /proc/<pid>/fd) while we hold the lock."""
    target, waiting = str(path.resolve()), 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                waiting += 1
        except OSError:  # the process ended, or is not ours to look at
            continue
    return waiting


@pytest.mark.slow
def test_two_shards_share_one_run_directory_and_pretrain_their_source_once(tmp_path, tmp_path_factory):
    """Two jobs of one run at once, on one cold cache: together the unsharded run's cells, none twice.
    Both need one source: the test holds its cache lock until both jobs wait on it, then lets go;
    the source is pretrained once, the other job reuses it."""
    cache = tmp_path_factory.mktemp("cache-shards")
    data = tiny_matrix(name="shards", setups=["cpu-1proc"], transfer_steps=4, seeds=[0],
                       strategies=["finetune", {"name": "freeze_d", "options": {"layers": 1}}, "ewc", "scale_shift"],
                       metrics={"num_samples": 50, "curve_samples": 50, "eval_every": 0})
    matrix_file = write(tmp_path / "m.yaml", data)
    matrix = load_matrix(str(matrix_file))
    assert all(len(part) == 2 for part in split(matrix, matrix.cells(), 2))  # each job has cells of the source
    lock = cache / "sources" / f".{source_key(matrix.source_config(matrix.cells()[0]), 1, 'no')}.lock"
    lock.parent.mkdir(parents=True)
    run_dir = tmp_path / "run"
    env = bench_env(cache)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "another job is pretraining the source"
        jobs = [subprocess.Popen([str(BENCH), "run", str(matrix_file), "--out", str(run_dir), "--shard", f"{i}/2",
                                  "--workers", "1", "--wandb", "disabled"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
        try:
            wait_for(lambda: _blocked_on(lock) == 2 or jobs[1].poll() is not None, jobs[0], "both jobs at the lock")
            assert jobs[1].poll() is None, jobs[1].stdout.read()
            fcntl.flock(held, fcntl.LOCK_UN)
            outs = [job.communicate(timeout=600)[0] for job in jobs]
        finally:
            for job in jobs:
                job.kill()
    assert [job.returncode for job in jobs] == [0, 0], outs
    records = records_of(run_dir)
    counts = Counter(r["cell_id"] for r in records)
    assert sorted(counts) == sorted(c.id for c in matrix.cells())
    assert set(counts.values()) == {1}
    assert len({r["run_id"] for r in records}) == 1  # the second job joined the first one's run
    assert [r["metrics"]["timing/source_cache_hit"] for r in records].count(False) == 1
    assert len([p for p in (cache / "sources").iterdir() if not p.name.startswith(".")]) == 1
    assert json.loads((run_dir / "plan.json").read_text())["shards"] == 2


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_resume_finishes_the_rest(tmp_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-interrupt")
    matrix_file = write(tmp_path / "m.yaml", _scratch_matrix("interrupt", seeds=[0, 1, 2]))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([str(BENCH), "run", str(matrix_file), "--out", str(run_dir), "--workers", "2",
                             "--wandb", "disabled"], cwd=tmp_path, env=bench_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # Ctrl-C's default, as a terminal gives it: a suite started in the
                            # background (`cmd &`) would hand `bench run` SIGINT ignored.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: len(records_of(run_dir)) >= 1, proc, "the first record")
        pids = [int(p.read_text()) for p in (run_dir / "launch").glob("*.pid")]
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to `bench run` (its workers have sessions of their own)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "--resume" in err, err
    deadline = time.monotonic() + 5  # less than a cell takes
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 2 and all(gone(pid) for pid in pids), "a worker outlived the interrupted `bench run`"
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        json.loads(line)  # whole lines only
    again = bench(["run", "--resume", str(run_dir)], tmp_path, bench_env(cache))
    assert again.returncode == 0, again.stdout + again.stderr
    counts = Counter(r["cell_id"] for r in records_of(run_dir))
    assert sorted(counts) == sorted(c.id for c in load_matrix(str(matrix_file)).cells())
    assert set(counts.values()) == {1}


def test_show_takes_the_directories_of_shards_together(tmp_path, capsys):
    from fakes import make_fake_run

    whole = tmp_path / "whole"
    whole.mkdir()
    records = make_fake_run(whole)
    for i, part in enumerate((records[::2], records[1::2])):  # two shards, each its own directory
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    bench_main(["show", str(whole), "--cells"])
    expected = capsys.readouterr().out
    bench_main(["show", str(tmp_path / "s0"), str(tmp_path / "s1"), "--cells"])
    together = capsys.readouterr().out
    assert sorted(together.splitlines()) == sorted(expected.splitlines())
    bench_main(["show", str(tmp_path / "s0"), "--cells"])
    assert capsys.readouterr().out != expected  # one shard alone lacks cells
