"""bench/wandb_sink.py against real offline W&B runs, read back from the files wandb writes.

The offline `.wandb` file is a LevelDB-style log of protobuf `Record`s; `read_wandb_file`
decodes it (checking each chunk's CRC) so the tests compare what W&B would upload with
results.jsonl, not what a mock was called with.
"""

from __future__ import annotations

import glob
import json
import shutil
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest

import bench.cell
from bench import worker
from bench.matrix import parse_matrix
from bench.results import IDENTITY_FIELDS, latest_per_cell, load_records, results_path
from bench.run import write_plan
from bench.wandb_target import WandbTarget
from bench.wandb_sink import (REDACTED, STEP_KEY, WandbSink, has_credentials, resolve_mode, scrub,
                              wandb_run_id)
from ganlib.distributed import make_accelerator
from fakes import FAILED_CELL, SKIPPED_CELL, cell_id, make_fake_run
from ganlib.errors import UserError
from ganbench_faults import FAULT_ENV

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

SECRET = "secret123" + "f" * 31  # looks like a 40-character API key
BLOCK, HEADER = 32768, 7


def read_wandb_file(path: Path) -> list:
    """Decode a `.wandb` transaction log into protobuf Records (FULL/FIRST/MIDDLE/LAST chunks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, records, pending = HEADER, [], b""
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        if pos + HEADER > len(data):
            break  # the writer has not flushed this chunk yet
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if crc == length == kind == 0:
            pos += left
            continue
        if pos + HEADER + length > len(data):
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _complete_log(run_dir: Path, timeout_s: float = 20.0) -> list:
    """The run's records once its exit record is on disk.

    wandb-core buffers the transaction log and flushes it after `run.finish()` returns, so
    a reader right after finish can see a partial file; poll until the exit record lands.
    """
    [log] = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_file(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{log} has no exit record after {timeout_s} s")
        time.sleep(0.1)


def read_run(run_dir: Path) -> dict:
    """The run's identity, config, history rows and final summary, as W&B recorded them."""
    out = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for record in _complete_log(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, name=run.display_name, group=run.run_group,
                       job_type=run.job_type, tags=list(run.tags))
            out["config"].update({_key(u): json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            out["config"].update({_key(u): json.loads(u.value_json)
                                  for u in record.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({_key(u): json.loads(u.value_json)
                                   for u in record.summary.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "stats":
            out.setdefault("stats", []).append({i.key for i in record.stats.item})
    return out


def offline_runs(base: Path) -> dict[str, dict]:
    """Every offline run under `base/wandb`, keyed by run name."""
    runs = {}
    for d in sorted((base / "wandb").glob("offline-run-*")):
        run = read_run(d)
        run["dir"] = d
        runs[run["name"]] = run
    return runs


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("RANK", raising=False)
    return wandb_dir


@pytest.fixture
def fake_run(tmp_path):
    run_dir = tmp_path / "run"
    return run_dir, make_fake_run(run_dir)


def _pick(records):
    """One ok cell, the failed cell and the skipped cell."""
    by_id = {r["cell_id"]: r for r in records}
    return [records[0], by_id[cell_id(*FAILED_CELL)], by_id[cell_id(*SKIPPED_CELL)]]


def _contains(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def assert_runs_match(runs: dict[str, dict], records: list[dict]) -> None:
    """Each record's W&B run holds its identity, scrubbed config, curves as history, metrics as summary."""
    for r in records:
        run = runs[r["cell_id"]]
        assert (run["group"], run["job_type"]) == (r["run_id"], r["strategy"])
        assert run["tags"] == [r["pair"], r["setup"], r["network"]]
        assert run["exit_code"] == (1 if r["status"] == "failed" else 0)  # skipped is not a failure
        assert run["config"]["cell"] == {**{k: r[k] for k in IDENTITY_FIELDS}, "env": r["env"]}
        expected_config = scrub(r["config"])
        assert {k: v for k, v in run["config"].items() if k not in ("cell", "_wandb")} \
            == expected_config
        # history: one row per step with the training values, FID curve merged in
        rows: dict = {}  # a step's values may come in several log calls (losses, then samples)
        for row in run["history"]:
            rows.setdefault(row["train/step"], {}).update(row)
        for train_row in r["curves"].get("train", []):
            got = rows[train_row["step"]]
            for key, value in train_row.items():
                if key != "step":
                    assert got[key] == pytest.approx(value)
        for fid_row in r["curves"].get("fid", []):
            assert rows[fid_row["step"]]["curve/fid"] == pytest.approx(fid_row["fid"])
        # summary: the record's final metrics win over the last history row (transfer/* included)
        for key, value in r["metrics"].items():
            got = run["summary"][key]
            if isinstance(value, list):
                assert json.loads(got) == value
            elif isinstance(value, float):
                assert got == pytest.approx(value)
            else:
                assert got == value
        assert run["summary"]["status"] == r["status"]
        assert run["summary"]["reason"] == r["reason"]
        if r["status"] == "ok":
            assert run["summary"]["samples/_type"] == "image-file"
            assert (run["dir"] / "files" / run["summary"]["samples/path"]).is_file()


def test_offline_runs_match_results_jsonl(fake_run, wandb_env, capsys):
    run_dir, records = fake_run
    cells = _pick(records)
    cells[0] = {**cells[0], "config": {**cells[0]["config"],
                                       "wandb": {"api_key": SECRET, "entity": "me"}}}
    sink = WandbSink(mode="auto", dir=run_dir)  # auto + WANDB_MODE=offline
    assert sink.mode == "offline"
    for r in cells:
        assert sink.log_cell(r, run_dir / r["artifacts"].get("samples", "none.png"))
    plots = sorted(Path(p) for p in glob.glob(str(run_dir / "cells" / "*" / "real.png")))[:2]
    assert sink.log_summary(records[0]["run_id"], records, plots)
    assert sink.enabled and sink.warning is None

    runs = offline_runs(run_dir)
    assert set(runs) == {r["cell_id"] for r in cells} | {f"{records[0]['run_id']}-summary"}
    assert_runs_match(runs, cells)
    assert runs[cells[0]["cell_id"]]["config"]["wandb"] == {"api_key": REDACTED, "entity": "me"}
    assert any("transfer/memorised_share" in runs[r["cell_id"]]["summary"] for r in cells)

    summary = runs[f"{records[0]['run_id']}-summary"]
    assert summary["job_type"] == "summary" and summary["group"] == records[0]["run_id"]
    table_path = summary["dir"] / "files" / summary["summary"]["cells/path"]
    table = json.loads(table_path.read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert {row["cell_id"] for row in rows} == {r["cell_id"] for r in records}
    by_id = {r["cell_id"]: r for r in records}
    for row in rows:
        record = by_id[row["cell_id"]]
        assert row["status"] == record["status"]
        fid = record["metrics"].get("quality/fid")
        assert row["quality/fid"] == (pytest.approx(fid) if fid is not None else None)
    assert summary["summary"]["cells/failed"] == 1 and summary["summary"]["cells/skipped"] == 1
    assert {k for k in summary["summary"] if k.startswith("plots/")} >= {
        f"plots/{p.stem}/_type" for p in plots}

    # the API key is nowhere on disk, and the sync command points at these runs
    assert _contains(run_dir, SECRET.encode()) == []
    assert _contains(wandb_env, SECRET.encode()) == []
    command = sink.close()
    assert command == f"wandb sync {run_dir / 'wandb'}/offline-run-*"
    assert command in capsys.readouterr().out
    assert len(glob.glob(command.split(" ", 2)[2])) == len(cells) + 1


def test_disabled_writes_nothing(fake_run, wandb_env, capsys):
    run_dir, records = fake_run
    before = sorted(p for p in run_dir.rglob("*"))
    sink = WandbSink(mode="disabled", dir=run_dir)
    assert not sink.log_cell(records[0], run_dir / records[0]["artifacts"]["samples"])
    assert not sink.log_summary(records[0]["run_id"], records, [])
    assert sink.close() is None
    assert sorted(p for p in run_dir.rglob("*")) == before
    assert not (run_dir / "wandb").exists() and list(wandb_env.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_init_failure_disables_sink_and_keeps_results(fake_run, wandb_env, monkeypatch, capsys):
    run_dir, records = fake_run
    calls = []

    def broken_init(*args, **kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("could not reach api.wandb.ai: timed out")

    monkeypatch.setattr(wandb, "init", broken_init)
    sink = WandbSink(mode="online", dir=run_dir)
    assert sink.log_cell(records[0], None) is False
    assert not sink.enabled
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: W&B logging of cell")
    assert "CommError" in err
    # disabled for the rest of the run: no second init attempt
    assert sink.log_cell(records[1], None) is False
    assert sink.log_summary(records[0]["run_id"], records, []) is False
    assert len(calls) == 1 and calls[0]["settings"].init_timeout > 0
    assert load_records(run_dir) == records


def test_unreachable_server_disables_within_timeout(fake_run, wandb_env, monkeypatch, capsys):
    run_dir, records = fake_run
    with socket.socket() as sock:  # a local port with nobody listening: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    timeouts, real_init = [], wandb.init

    def spy_init(*args, **kwargs):  # the real init, against the dead port; wandb enforces the timeout
        timeouts.append(kwargs["settings"].init_timeout)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    sink = WandbSink(mode="online", dir=run_dir, init_timeout_s=3)
    assert sink.log_cell(records[0], None) is False
    assert timeouts == [3]  # our timeout, not wandb's default (90 s) nor INIT_TIMEOUT_S
    assert not sink.enabled and capsys.readouterr().err.startswith("warning: W&B logging")
    assert load_records(run_dir) == records
    assert _contains(run_dir, SECRET.encode()) == []


def test_log_failure_finishes_run_as_failed(fake_run, wandb_env, monkeypatch, capsys):
    run_dir, records = fake_run

    def broken_log(self, *args, **kwargs):
        raise OSError("disk full while writing history")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    sink = WandbSink(mode="offline", dir=run_dir)
    # its own run id: wandb-core keeps the id of the timed-out init of the test above "in use"
    cell = {**records[0], "run_id": "log-failure"}
    assert sink.log_cell(cell, run_dir / records[0]["artifacts"]["samples"]) is False
    assert not sink.enabled and "disk full" in sink.warning
    assert capsys.readouterr().err.count("warning:") == 1
    [run] = offline_runs(run_dir).values()
    assert run["exit_code"] == 1  # the half-logged run was closed, not left dangling
    assert sink.log_cell(records[1], None) is False
    assert len(offline_runs(run_dir)) == 1
    assert load_records(run_dir) == records


def test_auto_mode_follows_credentials(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not has_credentials() and resolve_mode("auto") == "offline"
    netrc_file.write_text("machine other.host login user password abc\n")
    assert resolve_mode("auto") == "offline"
    netrc_file.write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert has_credentials() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline" and resolve_mode("online") == "online"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    assert resolve_mode("auto") == "online"
    with pytest.raises(UserError, match="'cloud'"):
        resolve_mode("cloud")


def test_non_main_process_is_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    sink = WandbSink(mode="offline", dir=tmp_path)
    assert sink.mode == "disabled" and not sink.enabled


def test_scrub_redacts_nested_secret_keys():
    config = {"lr": 0.1, "API_KEY": "k", "auth": {"Token": "t", "user": "u"},
              "hooks": [{"password": "p", "x": 1}], "monkey_patch": True}
    assert scrub(config) == {"lr": 0.1, "API_KEY": REDACTED,
                             "auth": {"Token": REDACTED, "user": "u"},
                             "hooks": [{"password": REDACTED, "x": 1}], "monkey_patch": True}
    assert config["API_KEY"] == "k"  # the caller's dict is untouched


@pytest.mark.parametrize("name", ["key", "apikey", "apiKey", "wandb-api-key", "accessToken", "hf_token",
                                  "client_secret", "db.password", "passwd", "aws_credentials", "ssh_keys"])
def test_credential_names_are_redacted(name):
    assert scrub({name: "s"}) == {name: REDACTED}


@pytest.mark.parametrize("name", ["monkey_patch", "tokenizer", "keypoints", "donkey", "passthrough", "secretary"])
def test_names_that_only_contain_a_credential_word_are_kept(name):
    assert scrub({name: 1}) == {name: 1}


@pytest.mark.slow
def test_offline_runs_match_the_records_of_a_real_run(real_run, wandb_env, tmp_path):
    run_dir, records = real_run
    copy = tmp_path / "run"  # the sink writes under the run directory: leave the session's run as it was
    shutil.copytree(run_dir, copy)
    sink = WandbSink(mode="offline", dir=copy)
    for r in records:
        assert sink.log_cell(r, copy / r["artifacts"]["samples"] if "samples" in r["artifacts"] else None)
    assert sink.enabled and sink.warning is None
    runs = offline_runs(copy)
    assert set(runs) == {r["cell_id"] for r in records}
    assert_runs_match(runs, records)


# --- live cell runs: a real tiny matrix through bench.worker, W&B offline -------------------------

LIVE_STEPS, LIVE_LOG_EVERY, LIVE_EVAL_EVERY = 20, 5, 10
LIVE_MATRIX = {
    "name": "live", "network": {"name": "dcgan", "size": 28, "width": 8},
    "pairs": [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"}],
    "strategies": ["scratch"], "setups": ["cpu-1proc"], "seeds": [0, 1],
    "source_steps": 20, "transfer_steps": LIVE_STEPS,
    "train": {"batch": 16, "log_every": LIVE_LOG_EVERY, "warmup_steps": 2},
    "metrics": {"num_samples": 100, "curve_samples": 50, "eval_every": LIVE_EVAL_EVERY},
}


def sampled_history(run) -> dict[str, list[float]]:
    """What wandb-core holds of an open run's history now (its own read-back, offline too)."""
    result = run._interface.deliver_request_sampled_history().wait_or(timeout=20)
    return {i.key: list(i.values_float) or list(i.values_int)
            for i in result.response.sampled_history_response.item}


def all_offline_runs(base: Path) -> list[dict]:
    """Every offline run directory under `base/wandb` (a resumed run has one per process that ran it)."""
    return [{**read_run(d), "dir": d} for d in sorted((base / "wandb").glob("offline-run-*"))]


@pytest.fixture
def live_run(tmp_path, wandb_env, monkeypatch):
    """The `live` matrix planned in a run directory, seed 1 made to diverge; run it with `run()`."""
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_X_STATS_SAMPLING_INTERVAL", "0.5")  # wandb's default is 15 s
    # wandb reads WANDB_X_* once per process, when it first sets up: after an earlier test's run the
    # 0.5 s would be ignored (wandb 0.29 then records no sample in an 8 s cell). Start afresh.
    wandb.teardown()
    matrix = parse_matrix(LIVE_MATRIX, "live")
    ok, failed = matrix.cells()
    monkeypatch.setenv(FAULT_ENV, f"{failed.id}=nan")
    run_dir = tmp_path / "run"
    write_plan(run_dir, matrix, "run-live", [ok, failed])
    seen: list[tuple[int, dict]] = []  # (evaluation, W&B history at that moment)
    real_evaluate = bench.cell.evaluate_generator

    def evaluate_and_look(*args, **kwargs):  # a spy on the evaluation, not on the sink
        if wandb.run is not None:
            seen.append((len(seen), sampled_history(wandb.run)))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(bench.cell, "evaluate_generator", evaluate_and_look)
    threads = __import__("torch").get_num_threads()
    __import__("torch").set_num_threads(1)

    def run() -> None:
        worker.run_setup(make_accelerator(), run_dir, None, WandbTarget("offline"))

    yield run_dir, ok, failed, run, seen
    __import__("torch").set_num_threads(threads)


@pytest.mark.slow
def test_live_cell_run_streams_training_and_resumes_into_the_same_runs(live_run):
    run_dir, ok, failed, run, seen = live_run
    run()
    records = {r["cell_id"]: r for r in load_records(run_dir)}
    assert records[ok.id]["status"] == "ok" and records[failed.id]["status"] == "failed"

    # during the cell: at the evaluation after step 10 (the ok cell's 2nd), loss rows were in W&B
    at_step_10 = seen[1][1]
    assert len(at_step_10["loss/D"]) == LIVE_EVAL_EVERY // LIVE_LOG_EVERY  # steps 5 and 10
    assert max(at_step_10[STEP_KEY]) == LIVE_EVAL_EVERY  # nothing from after that moment
    assert len(at_step_10["curve/fid"]) == 1  # the step-0 FID, already there

    runs = all_offline_runs(run_dir)
    by_id = {r["id"]: r for r in runs}
    assert set(by_id) == {wandb_run_id("run-live", ok.id), wandb_run_id("run-live", failed.id)}
    live = by_id[wandb_run_id("run-live", ok.id)]
    assert live["name"] == ok.id and live["exit_code"] == 0
    loss_rows = [r for r in live["history"] if "loss/D" in r]
    assert [r[STEP_KEY] for r in loss_rows] == list(range(LIVE_LOG_EVERY, LIVE_STEPS + 1, LIVE_LOG_EVERY))
    assert [r["loss/D"] for r in loss_rows] == pytest.approx(
        [row["loss/D"] for row in records[ok.id]["curves"]["train"]])
    fid_rows = [r for r in live["history"] if r.get("curve/fid") is not None]
    assert [r[STEP_KEY] for r in fid_rows] == [0, 10, 20]
    grids = [r for r in live["history"] if "samples/_type" in r]
    assert [r[STEP_KEY] for r in grids] == [0, 10, 20, 20]  # each evaluation, then the final grid
    walls = [r["timing/cell_wall_s"] for r in loss_rows]
    assert walls == sorted(walls) and walls[0] > 0
    runtimes = [r["_runtime"] for r in live["history"]]
    assert runtimes == sorted(runtimes) and runtimes[-1] > runtimes[0]  # logged over time, not at once
    assert live["stats"] and any("proc.memory.rssMB" in keys for keys in live["stats"])  # system metrics
    assert live["summary"]["quality/fid"] == pytest.approx(records[ok.id]["metrics"]["quality/fid"])

    dead = by_id[wandb_run_id("run-live", failed.id)]
    assert dead["exit_code"] == 1 and dead["summary"]["status"] == "failed"
    assert dead["summary"]["reason"] == records[failed.id]["reason"] and "diverged" in dead["summary"]["reason"]

    # a relaunch after the ok cell's record was lost: it runs again, into the same W&B run
    kept = [r for r in load_records(run_dir) if r["cell_id"] != ok.id]
    results_path(run_dir).write_text("".join(json.dumps(r) + "\n" for r in kept))
    run()
    again = all_offline_runs(run_dir)
    assert len(again) == len(runs) + 1
    assert {r["id"] for r in again} == set(by_id)  # no new W&B run
    [rerun] = [r for r in again if r["dir"] not in {x["dir"] for x in runs}]
    assert rerun["id"] == live["id"] and rerun["exit_code"] == 0


def test_summary_and_unrun_cells_keep_their_run_ids(fake_run, wandb_env):
    run_dir, records = fake_run
    run_id = records[0]["run_id"]
    for _ in range(2):  # a --resume logs the summary again: into the same run
        sink = WandbSink(mode="offline", dir=run_dir)
        never_ran = [r for r in latest_per_cell(records) if r["status"] == "skipped"]  # setup skipped
        assert never_ran and sink.log_unrun_cells(records) == len(never_ran)  # the others ran in a worker
        unrun = [{**r, "artifacts": {}} for r in _pick(records)[1:]]  # failed launch, skipped setup
        assert sink.log_unrun_cells(unrun) == 2
        assert sink.log_summary(run_id, records, [])
    runs = all_offline_runs(run_dir)
    logged = {r["cell_id"]: r for r in [*never_ran, *unrun]}
    assert len(runs) == 2 * (len(never_ran) + len(unrun) + 1)  # one offline directory per process that ran it
    expected = {wandb_run_id(run_id, "summary")} | {wandb_run_id(run_id, cell_id) for cell_id in logged}
    assert {r["id"] for r in runs} == expected
    for r in runs:
        if r["id"] != wandb_run_id(run_id, "summary"):
            record = logged[r["name"]]
            assert r["summary"]["reason"] == record["reason"]
            assert r["exit_code"] == (1 if record["status"] == "failed" else 0)


@pytest.mark.slow
def test_wandb_failure_during_a_live_cell_is_one_warning_and_the_cells_go_on(live_run, monkeypatch, capsys):
    run_dir, ok, failed, run, seen = live_run

    def broken_log(self, *args, **kwargs):
        raise OSError("disk full while writing history")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    run()
    records = {r["cell_id"]: r for r in load_records(run_dir)}
    assert records[ok.id]["status"] == "ok" and records[failed.id]["status"] == "failed"
    assert records[ok.id]["metrics"]["quality/fid"] > 0 and len(records[ok.id]["curves"]["train"]) == 4
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "disk full" in err
    [dead] = all_offline_runs(run_dir)  # the first cell's run, closed as failed; then W&B was off
    assert dead["id"] == wandb_run_id("run-live", ok.id) and dead["exit_code"] == 1
