"""Tests for ganlib/nets/rosinality: reference-format StyleGAN2 checkpoints load strictly and round-trip.

The reference's key names and shapes come from a committed fixture (tests/fixtures/), listed from
rosinality/stylegan2-pytorch's model.py for the FFHQ-256 configuration CDC starts from; the tensors
are random, so a wrong mapping (two names swapped, a transposed weight) shows up as a mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ganlib.config import TrainConfig
from ganlib.errors import USER_ERROR_EXIT_CODE, UserError
from ganlib.nets import NetConfig, build_networks
from ganlib.nets.rosinality import build_from_checkpoint, export_checkpoint, infer_config, load_source_checkpoint
from ganlib.nets.stylegan2 import fir_kernel
from ganlib.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "rosinality_stylegan2_256.json").read_text())


def reference_state(keys, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the reference names; its resampling filters hold their fixed values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys:
        if name.endswith("kernel"):
            upsampling = name.endswith(("blur.kernel", "upsample.kernel"))
            state[name] = fir_kernel(4.0 if upsampling else 1.0)
        else:
            state[name] = torch.randn(*shape, generator=gen)
    return state


def write_reference(path: Path, seed: int = 0) -> dict:
    g = reference_state(FIXTURE["g_ema"], seed)
    data = {"g_ema": g, "g": g, "d": reference_state(FIXTURE["d"], seed + 1),
            "g_optim": {}, "d_optim": {}}
    torch.save(data, path)
    return data


@pytest.fixture(scope="module")
def ffhq256(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "550000.pt"
    return path, write_reference(path)


def test_reference_keys_load_strictly_and_round_trip(ffhq256):
    path, data = ffhq256
    cfg, G, D = build_from_checkpoint(path)
    assert cfg == NetConfig("stylegan2", 256, 3, latent_dim=512, width=64)
    back = export_checkpoint(G, D, [k for k, _ in FIXTURE["g_ema"]], [k for k, _ in FIXTURE["d"]])
    for part in ("g_ema", "g", "d"):
        assert list(back[part]) == list(data[part])
        for name, tensor in data[part].items():
            assert torch.equal(back[part][name], tensor), f"{part}.{name}"
    # every tensor of our networks came from the file (none kept its random init)
    assert sum(p.numel() for p in G.parameters()) == sum(
        t.numel() for k, t in data["g_ema"].items() if not k.endswith("kernel") and not k.startswith("noises."))
    assert torch.equal(G.blocks[0].layers[7].weight, data["g_ema"]["style.8.weight"])
    assert torch.equal(G.blocks[7].conv1.conv.weight, data["g_ema"]["convs.11.conv.weight"][0])  # [1, out, in, k, k]
    assert torch.equal(G.blocks[7].conv1.noise_const, data["g_ema"]["noises.noise_12"])
    assert torch.equal(D.head.out.weight, data["d"]["final_linear.1.weight"])


def test_first_mismatching_key_is_named(ffhq256, tmp_path):
    _, data = ffhq256
    bad = {k: dict(v) for k, v in data.items()}
    bad["d"]["convs.3.conv2.1.weight"] = torch.zeros(7, 7, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    G, D = build_networks(NetConfig("stylegan2", 256, 3, latent_dim=512, width=64))
    before = {k: v.clone() for k, v in G.state_dict().items()}
    with pytest.raises(UserError, match=r"'convs\.3\.conv2\.1\.weight' has shape \(7, 7, 3, 3\)"):
        load_source_checkpoint(tmp_path / "bad.pt", NetConfig("stylegan2", 256, 3, 512, 64), G, D)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items()), "G changed before the error"


def small_checkpoint(path: Path, size=32, width=2, latent=16, channels=1, seed=3):
    """A reference-format file written from one of our own small networks (its names via the mapping)."""
    torch.manual_seed(seed)
    G, D = build_networks(NetConfig("stylegan2", size, channels, latent_dim=latent, width=width))
    g_names = [n for n in _reference_names(G, "g")]
    d_names = [n for n in _reference_names(D, "d")]
    torch.save(export_checkpoint(G, D, g_names, d_names), path)
    return G, D


def _reference_names(module, part):
    """The reference names of a network built here, derived from the 256 px fixture's naming pattern."""
    levels = module.image_shape[1].bit_length() - 1
    names = []
    for name, _ in FIXTURE["g_ema" if part == "g" else "d"]:
        if name.startswith("style.") and int(name.split(".")[1]) > len(module.blocks[0].layers):
            continue  # a shorter mapping network (latents under 256)
        index = name.split(".")[1] if name.split(".")[0] in ("convs", "to_rgbs") else None
        if name.startswith("noises.noise_"):
            index = name.rsplit("_", 1)[1]
        limit = {"convs": 2 * (levels - 2), "to_rgbs": levels - 2, "noises": 2 * (levels - 2) + 1}
        if part == "d":
            limit = {"convs": levels - 1}
        head = name.split(".")[0]
        if index is not None and head in limit and int(index) >= limit[head]:
            continue
        names.append(name)
    return names


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "truncated or not a torch checkpoint"),
    (lambda p: torch.save({"g_ema": _Opaque()}, p), "cannot be read without running its code"),
    (lambda p: torch.save({"g_ema": {}, "d": {}}, p), "needs the state dicts g_ema, g, d"),
    (lambda p: torch.save({k: v.state_dict() for k, v in zip(
        ("g_ema", "d"), build_networks(NetConfig("dcgan", 32, 1))) } | {"g": {}}, p), "not a StyleGAN2 generator"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, mutate, message):
    path = tmp_path / "x.pt"
    small_checkpoint(path)
    mutate(path)
    G, D = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=16, width=2))
    with pytest.raises(UserError) as info:
        load_source_checkpoint(path, NetConfig("stylegan2", 32, 1, latent_dim=16, width=2), G, D)
    assert message in str(info.value) and "\n" not in str(info.value)


class _Opaque:
    """A class a weights-only load refuses (standing in for any pickled object)."""


def test_other_size_names_the_sizes(tmp_path):
    small_checkpoint(tmp_path / "c.pt", size=64)
    G, D = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=16, width=2))
    with pytest.raises(UserError, match="64 px.*--size 64 --latent-dim 16 --width 2"):
        load_source_checkpoint(tmp_path / "c.pt", NetConfig("stylegan2", 32, 1, latent_dim=16, width=2), G, D)


def test_infer_config_reads_size_width_latent_channels(tmp_path):
    for size, width in ((32, 2), (128, 4)):
        small_checkpoint(tmp_path / "c.pt", size=size, width=width, latent=24, channels=3)
        state = torch.load(tmp_path / "c.pt", weights_only=True)["g_ema"]
        assert infer_config(state) == NetConfig("stylegan2", size, 3, latent_dim=24, width=width)


def test_trainer_starts_from_the_checkpoint(tmp_path):
    G_src, D_src = small_checkpoint(tmp_path / "c.pt")
    cfg = TrainConfig(net="stylegan2", size=32, width=2, latent_dim=16, data="mnist5k:classes=5-9:n=25",
                      strategy="finetune", source_checkpoint=str(tmp_path / "c.pt"), steps=1, batch=4,
                      out=str(tmp_path / "run"), progress=False, memory_format="contiguous")
    trainer = Trainer(cfg)
    for mine, src in ((trainer.G, G_src), (trainer.D, D_src)):
        theirs = src.state_dict()
        for name, value in mine.state_dict().items():
            assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize("args,message", [
    (["--net", "dcgan", "--size", "32"], "needs --net stylegan2"),
    (["--net", "stylegan2", "--size", "32", "--width", "2", "--latent-dim", "16"], "truncated or not a torch"),
])
def test_cli_bad_source_checkpoint_exits_2_and_writes_nothing(tmp_path, args, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ganlib.train", *args, "--strategy", "finetune",
                           "--data", "mnist5k:classes=5-9:n=25", "--source-checkpoint", str(bad),
                           "--out", str(out), "--steps", "1", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == USER_ERROR_EXIT_CODE, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()
