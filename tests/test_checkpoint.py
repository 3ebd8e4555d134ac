"""Checkpoints: safetensors round trips, corrupt and mismatched files, atomic replacement."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ganlib import checkpoint as ckpt
from ganlib.errors import UserError
from ganlib.nets import NetConfig, build_networks


def _nets(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return build_networks(NetConfig("dcgan", 28, 1, 16, width))


def _trained_bn(module: nn.Module) -> nn.Module:
    """Give BatchNorm buffers non-default values so a round trip of buffers means something."""
    module.train()
    with torch.no_grad():
        module(torch.randn(4, module.latent_dim) if hasattr(module, "latent_dim") else torch.randn(4, 1, 28, 28))
    return module


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_weights_round_trip_bitwise_with_buffers(tmp_path):
    G, _ = _nets(seed=0)
    _trained_bn(G)
    ckpt.save_weights(tmp_path / "g.safetensors", G)
    G2, _ = _nets(seed=1)
    assert not torch.equal(G.head[0].weight, G2.head[0].weight)
    ckpt.load_weights(tmp_path / "g.safetensors", G2)
    _assert_same_state(G, G2)
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_corrupt_or_missing_weights_are_a_user_error(tmp_path, damage):
    G, _ = _nets()
    path = tmp_path / "g.safetensors"
    ckpt.save_weights(path, G)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not safetensors at all" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(UserError, match="unreadable or corrupt"):
        ckpt.load_weights(path, G, "checkpoint generator")


def test_weights_of_another_network_are_a_user_error(tmp_path):
    G8, D8 = _nets(width=8)
    G16, _ = _nets(width=16)
    ckpt.save_weights(tmp_path / "g8.safetensors", G8)
    with pytest.raises(UserError, match="does not match this network.*shape mismatch"):
        ckpt.load_weights(tmp_path / "g8.safetensors", G16)
    with pytest.raises(UserError, match="does not match this network"):
        ckpt.load_weights(tmp_path / "g8.safetensors", D8)  # a D given G's weights: other names


def test_rng_state_round_trip_replays_every_stream():
    data, latent = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    gens = {"data": data, "latent": latent}
    state = ckpt.rng_state(gens)
    first = (torch.rand(3), torch.rand(3, generator=data), torch.randn(3, generator=latent))
    ckpt.set_rng_state(state, gens)
    again = (torch.rand(3), torch.rand(3, generator=data), torch.randn(3, generator=latent))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def _write_checkpoint(ckpt_dir, step: int, G, D, opt, ranks: int = 1):
    tmp = ckpt.begin_checkpoint(ckpt_dir)
    for rank in range(ranks):
        ckpt.write_rng(tmp, rank, ckpt.rng_state({}))
    ckpt.finish_checkpoint(tmp, ckpt_dir, step=step, meta={"fingerprint": "f"},
                           modules={"generator": G, "discriminator": D}, optimizers={"G": opt})


def _optimizer(G):
    opt = torch.optim.Adam(G.parameters(), lr=1e-3)
    G(torch.randn(2, G.latent_dim)).mean().backward()
    opt.step()  # Adam now has moment tensors to save
    return opt


def test_checkpoint_is_complete_and_leaves_no_temporaries(tmp_path):
    G, D = _nets()
    opt = _optimizer(G)
    ckpt_dir = tmp_path / "run" / "checkpoint"
    _write_checkpoint(ckpt_dir, 3, G, D, opt, ranks=2)
    _write_checkpoint(ckpt_dir, 6, G, D, opt, ranks=2)  # replaces the first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "discriminator.safetensors", "generator.safetensors", "meta.json", "optim.pt",
        "rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert ckpt.read_meta(ckpt_dir) == {"fingerprint": "f", "step": 6}
    assert ckpt.find_checkpoint(ckpt_dir) == ckpt_dir

    G2, _ = _nets(seed=5)
    opt2 = torch.optim.Adam(G2.parameters(), lr=1e-3)
    ckpt.load_weights(ckpt_dir / "generator.safetensors", G2)
    ckpt.load_optimizers(ckpt_dir, {"G": opt2})
    _assert_same_state(G, G2)
    for p, p2 in zip(G.parameters(), G2.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
    assert ckpt.load_rng(ckpt_dir, 1).keys() == ckpt.rng_state({}).keys()


def test_killed_during_the_swap_the_previous_checkpoint_is_found(tmp_path, monkeypatch):
    G, D = _nets()
    opt = _optimizer(G)
    ckpt_dir = tmp_path / "checkpoint"
    _write_checkpoint(ckpt_dir, 3, G, D, opt)

    real_replace = os.replace

    def killed_before_the_new_one_lands(src, dst):
        if str(src).endswith(".checkpoint.tmp"):
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_the_new_one_lands)
    for step in (6, 7):  # killed twice at the same point: the resumed run must not lose the old one either
        with pytest.raises(KeyboardInterrupt):
            _write_checkpoint(ckpt_dir, step, G, D, opt)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)

    assert not ckpt_dir.exists()
    found = ckpt.find_checkpoint(ckpt_dir)
    assert found is not None and ckpt.read_meta(found)["step"] == 3
    G2, _ = _nets(seed=9)
    ckpt.load_weights(found / "generator.safetensors", G2)  # complete: loads
    _assert_same_state(G, G2)

    _write_checkpoint(ckpt_dir, 9, G, D, opt)  # the next save cleans up after the killed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert ckpt.read_meta(ckpt_dir)["step"] == 9


def test_no_checkpoint_is_none(tmp_path):
    assert ckpt.find_checkpoint(tmp_path / "checkpoint") is None


# each part of a checkpoint, and the loader that reads it
PARTS = {"meta.json": lambda d, G: ckpt.read_meta(d),
         "optim.pt": lambda d, G: ckpt.load_optimizers(d, {"G": torch.optim.Adam(G.parameters())}),
         "rng-rank0.safetensors": lambda d, G: ckpt.load_rng(d, 0)}


@pytest.mark.parametrize("victim", sorted(PARTS))
def test_corrupt_checkpoint_parts_are_user_errors(tmp_path, victim):
    G, D = _nets()
    opt = _optimizer(G)
    ckpt_dir = tmp_path / "checkpoint"
    _write_checkpoint(ckpt_dir, 3, G, D, opt)
    for load in PARTS.values():
        load(ckpt_dir, G)  # every part reads back while intact
    (ckpt_dir / victim).write_bytes(b"{ not what it should be")
    with pytest.raises(UserError, match="corrupt|unreadable"):
        PARTS[victim](ckpt_dir, G)


def test_missing_rank_and_mismatched_optimizer_are_user_errors(tmp_path):
    G, D = _nets()
    opt = _optimizer(G)
    ckpt_dir = tmp_path / "checkpoint"
    _write_checkpoint(ckpt_dir, 3, G, D, opt)
    with pytest.raises(UserError, match="process 1"):
        ckpt.load_rng(ckpt_dir, 1)
    with pytest.raises(UserError, match="does not match"):
        ckpt.load_optimizers(ckpt_dir, {"D": torch.optim.Adam(D.parameters())})


def test_atomic_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    ckpt.atomic_write_text(path, "one")
    ckpt.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
