"""Tests for ganlib/pretrain.py: a source is pretrained once per key and reused from the cache."""

from __future__ import annotations

import dataclasses
import fcntl
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import ganlib.pretrain as pretrain
from ganlib.config import TrainConfig
from ganlib.errors import USER_ERROR_EXIT_CODE
from ganlib.pretrain import default_cache_dir, is_complete, pretrain_source, source_key, source_meta

SOURCE = dict(net="dcgan", size=28, width=8, latent_dim=16, batch=8, steps=2, data="mnist5k:classes=0-4",
              progress=False, log_every=1, warmup_steps=0, out="unused")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is as fast and does not spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _no_training(*args, **kwargs):
    raise AssertionError("the source was trained again instead of being reused")


def test_second_call_reuses_the_source_without_training(tmp_path, monkeypatch):
    cfg = TrainConfig(**SOURCE)
    entry, hit = pretrain_source(cfg, tmp_path)
    assert not hit and is_complete(entry) and entry.parent == tmp_path
    weights = load_file(str(entry / "generator.safetensors"))
    meta = source_meta(entry)
    assert meta["pretrain_s"] > 0 and meta["key"] == entry.name
    assert meta["fields"]["data"] == "mnist5k:classes=0-4" and meta["fields"]["steps"] == 2
    assert not (entry / "checkpoint").exists()  # optimiser state is not kept in the cache
    assert not list(tmp_path.glob(".*.tmp*"))  # nothing half-written left behind

    monkeypatch.setattr(pretrain, "train", _no_training)
    # What only says where to write or how often to log does not change the key.
    again = dataclasses.replace(cfg, out=str(tmp_path / "elsewhere"), log_every=7, progress=True,
                                strategy="finetune", source="/nonexistent")
    entry2, hit2 = pretrain_source(again, tmp_path)
    assert hit2 and entry2 == entry
    assert all(torch.equal(t, load_file(str(entry / "generator.safetensors"))[k]) for k, t in weights.items())
    assert source_meta(entry2)["pretrain_s"] == meta["pretrain_s"]  # the original cost, for reports


def test_the_source_is_trained_from_scratch_whatever_the_strategy(tmp_path):
    cfg = TrainConfig(**{**SOURCE, "strategy": "finetune", "source": "/nonexistent/dir"})
    entry, hit = pretrain_source(cfg, tmp_path)  # finetune would fail to read the missing source
    assert not hit and is_complete(entry)


def test_key_follows_everything_that_determines_the_weights():
    base = TrainConfig(**SOURCE)
    key = source_key(base)
    changed = dict(net="mlp", size=32, width=16, latent_dim=32, channels=3, data="mnist5k:classes=0-3",
                   steps=3, batch=16, seed=1, loss="hinge", lr_g=1e-4, lr_d=1e-4, beta1=0.0, beta2=0.99,
                   r1_gamma=1.0, r1_interval=4, ema_decay=0.99)
    for name, value in changed.items():
        assert source_key(dataclasses.replace(base, **{name: value})) != key, name
    assert source_key(base, mixed_precision="bf16") != key
    assert source_key(base, num_processes=2) != key
    same = dict(out="x", resume=True, progress=True, ckpt_every=5, log_every=9, warmup_steps=3, eval_every=4,
                data_root="/elsewhere", strategy="cdc", strategy_options={"pairs": 8}, source="s",
                memory_format="channels_last", data="mnist5k:classes=4,0-3", channels=1)
    for name, value in same.items():
        assert source_key(dataclasses.replace(base, **{name: value})) == key, name
    assert source_key(base, mixed_precision="") == source_key(base, mixed_precision="no")
    assert key.startswith("dcgan-28px-mnist5k-c0-4-")


def test_an_incomplete_entry_is_rebuilt(tmp_path):
    cfg = TrainConfig(**SOURCE)
    entry = tmp_path / source_key(cfg)
    entry.mkdir()
    (entry / "generator.safetensors").write_bytes(b"torn write")  # a killed run: no meta.json
    assert not is_complete(entry)
    entry2, hit = pretrain_source(cfg, tmp_path)
    assert entry2 == entry and not hit and is_complete(entry)
    load_file(str(entry / "generator.safetensors"))  # readable now


def test_a_concurrent_job_waits_for_the_lock_and_then_reuses(tmp_path, monkeypatch):
    """While another job holds the key's lock, pretrain_source waits; once that job has finished the
    entry, it reuses it instead of training a second time."""
    cfg = TrainConfig(**SOURCE)
    done, _ = pretrain_source(cfg, tmp_path / "first")
    key = source_key(cfg)
    cache = tmp_path / "shared"
    cache.mkdir()
    monkeypatch.setattr(pretrain, "train", _no_training)
    result = {}

    with open(cache / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the other job" is pretraining
        waiter = threading.Thread(target=lambda: result.update(out=pretrain_source(cfg, cache)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive(), "pretrain_source did not wait for the lock"
        shutil.copytree(done, cache / key)  # the other job finishes its entry ...
        fcntl.flock(lock, fcntl.LOCK_UN)  # ... and releases the lock
    waiter.join(timeout=30)
    assert result["out"] == (cache / key, True)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GANBENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "sources"
    monkeypatch.delenv("GANBENCH_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "ganbench", "sources")


def test_cli_reports_pretrained_then_reused_and_exits_2_on_bad_input(tmp_path, capsys):
    argv = ["--net", "dcgan", "--width", "8", "--latent-dim", "16", "--batch", "8", "--steps", "1",
            "--data", "mnist5k:classes=0-4", "--no-progress", "--cache-dir", str(tmp_path)]
    assert pretrain.main(argv) == 0
    assert capsys.readouterr().out.startswith("pretrained source ")
    assert pretrain.main(argv) == 0
    assert capsys.readouterr().out.startswith("reused source ")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([*argv, "--net", "nope"])
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'nope'" in err[0]



# --- the cache does not trust its files; its lock wait is bounded; an unwritable cache is found first ---

def _zero_tensor_bytes(path):
    """Zero every tensor byte of a safetensors file, keeping its header: it still loads, as zeros."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:] = bytes(len(raw) - start)
    path.write_bytes(bytes(raw))


def test_a_zeroed_cached_source_is_detected_and_retrained(tmp_path, monkeypatch):
    cfg = TrainConfig(**SOURCE)
    entry, _ = pretrain_source(cfg, tmp_path)
    sound = {k: t.clone() for k, t in load_file(str(entry / "generator.safetensors")).items()}  # not a view of the file
    _zero_tensor_bytes(entry / "generator.safetensors")
    assert all(not t.any() for t in load_file(str(entry / "generator.safetensors")).values())  # loads fine

    trained = []
    real_train = pretrain.train
    monkeypatch.setattr(pretrain, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    with pytest.warns(UserWarning, match=r"generator.safetensors does not match its checksum\); retraining"):
        entry2, hit = pretrain_source(cfg, tmp_path)
    assert entry2 == entry and not hit and trained == [1]
    again = load_file(str(entry / "generator.safetensors"))
    assert all(torch.equal(t, sound[k]) for k, t in again.items())  # the same seed: the same weights
    assert pretrain.damage(entry) is None


def test_a_held_lock_is_waited_for_boundedly_and_names_its_holder(tmp_path, monkeypatch):
    cfg = TrainConfig(**SOURCE)
    monkeypatch.setattr(pretrain, "train", _no_training)
    with open(tmp_path / f".{source_key(cfg)}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "the other job", stuck
        lock.write("node7 pid 4242 since 2026-11-30T01:00:00+0000\n")
        lock.flush()
        started = time.monotonic()
        with pytest.raises(pretrain.UserError, match=r"still held after 1 s by node7 pid 4242"):
            pretrain_source(cfg, tmp_path, lock_timeout_s=1.0)
        assert time.monotonic() - started < 10


def test_an_unwritable_cache_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "train", _no_training)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(pretrain.UserError, match=r"source cache .*file/sources is not writable"):
        pretrain_source(TrainConfig(**SOURCE), tmp_path / "file" / "sources")
