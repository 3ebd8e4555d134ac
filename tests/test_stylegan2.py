"""Tests for ganlib/nets/stylegan2 beyond the shared contract (tests/test_nets.py covers 32 and 64 px).

Numeric agreement with the reference implementation was measured outside the repository (the
reference is not vendored); docs/stylegan2.md records the figure and how it was obtained.
"""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState

from ganlib.nets import NETWORKS, NetConfig, build_networks, count_parameters
from ganlib.nets.stylegan2 import channels_at, fir_filter, fir_kernel


@pytest.mark.parametrize("size", NETWORKS.get("stylegan2").sizes)
def test_every_size_builds_and_generates(size):
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("stylegan2", size, 3, latent_dim=8, width=1))
    G.eval()
    with torch.no_grad():
        images, feats = G(torch.randn(2, 8), return_features=True)
        logits = D(images)
    assert images.shape == (2, 3, size, size) and logits.shape == (2,)
    assert [f.shape[-1] for f in feats[1:]] == [2 ** r for r in range(2, size.bit_length())]
    assert G.num_ws == 2 * (size.bit_length() - 1) - 2  # the reference's n_latent = 2 log2(size) - 2


def test_config_f_channels_and_parameter_counts():
    """Width 64 is the paper's config F: 512 channels up to 64 px, then halving."""
    assert [channels_at(2 ** r, 64) for r in range(2, 11)] == [512] * 5 + [256, 128, 64, 32]
    G, D = build_networks(NetConfig("stylegan2", 256, 3, latent_dim=512, width=64))
    # the reference's FFHQ-256 networks: 30,034,338 (G incl. mapping) and 28,864,129 parameters
    assert (count_parameters(G), count_parameters(D)) == (30_034_338, 28_864_129)


def test_fir_upsampling_keeps_a_constant_image_constant_and_preserves_its_mean():
    x = torch.ones(1, 2, 8, 8)
    up = fir_filter(x, fir_kernel(4.0), pad=(2, 1), up=2)
    assert up.shape == (1, 2, 16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    down = fir_filter(torch.ones(1, 2, 16, 16), fir_kernel(), pad=(1, 1), down=2)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 2, 6, 6))


def _generate(G, z, seed=0, **kw):
    torch.manual_seed(seed)
    return G(z, **kw)


def test_style_mixing_only_in_training_and_not_for_features():
    torch.manual_seed(0)
    G, _ = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=8, width=2))
    z = torch.randn(4, 8)
    G.mixing_prob = 0.0
    plain = _generate(G, z, noise_mode="const")
    G.mixing_prob = 1.0
    assert not torch.equal(_generate(G, z, noise_mode="const"), plain), "training forward did not mix"
    # CDC's feature forward and eval use one latent per sample
    assert torch.equal(_generate(G, z, return_features=True, noise_mode="const")[0], plain)
    G.eval()
    assert torch.equal(_generate(G, z, noise_mode="const"), plain.clamp(-1, 1))


def test_noise_inputs_change_images_unless_const():
    torch.manual_seed(0)
    G, _ = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=8, width=2))
    G.mixing_prob = 0.0
    with torch.no_grad():
        for m in G.modules():
            if type(m).__name__ == "NoiseInjection":
                m.weight.fill_(0.5)
    z = torch.randn(2, 8)
    assert not torch.equal(_generate(G, z, seed=1), _generate(G, z, seed=2))
    assert torch.equal(_generate(G, z, seed=1, noise_mode="const"), _generate(G, z, seed=2, noise_mode="const"))


def test_features_through_matches_the_forward_features():
    torch.manual_seed(0)
    G, _ = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=8, width=2))
    z = torch.randn(4, 8)
    _, feats = _generate(G, z, return_features=True)
    for k in range(len(G.blocks)):
        torch.manual_seed(0)
        assert torch.equal(G.features_through(G.blocks[: k + 1], z), feats[k]), k


def test_compiles_as_one_graph_with_mixing_forward_and_backward():
    """fullgraph=True fails on any graph break (Python randomness, data-dependent control flow)."""
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=8, width=1))
    G.mixing_prob = 1.0
    step = torch.compile(lambda z: D(G(z)).mean(), backend="aot_eager", fullgraph=True)
    step(torch.randn(4, 8)).backward()
    assert all(p.grad is not None for p in G.parameters())


# --- path-length regularisation in the loop (ganlib.losses.PathLengthRegularizer) -----------------

PL_TINY = dict(net="stylegan2", size=32, width=1, latent_dim=8, batch=4, log_every=1)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_path_length_regularisation_runs_on_due_g_steps_and_changes_only_g(tiny_config):
    from ganlib.train import Trainer

    runs = {}
    for pl_weight in (0.0, 2.0):
        AcceleratorState._reset_state(True)
        trainer = Trainer(tiny_config(**PL_TINY, steps=6, pl_weight=pl_weight, pl_interval=4))
        logs = [trainer.step(s) for s in range(1)]
        runs[pl_weight] = (_state(trainer.D), _state(trainer.G), logs, trainer)
    (d0, g0, _, _), (d2, g2, logs, trainer) = runs[0.0], runs[2.0]
    assert all(torch.equal(d0[k], d2[k]) for k in d0)  # D's step comes first and PL never reaches D
    assert any(not torch.equal(g0[k], g2[k]) for k in g0)  # the penalty's gradient went into G's step
    assert "loss/G/pl" in logs[0] and logs[0]["loss/G/pl"] > 0
    due = [s for s in range(1, 6) if "loss/G/pl" in trainer.step(s)]
    assert due == [4]  # lazy: every pl_interval G steps
    assert 0 < trainer.path_length.mean.item()  # the target moved off 0


def test_path_length_resume_restores_its_target(tiny_config, tmp_path, crash_after_first_checkpoint):
    from ganlib.train import train

    opts = dict(PL_TINY, steps=6, ckpt_every=3, pl_weight=2.0, pl_interval=2)
    a = train(tiny_config(**opts, out=str(tmp_path / "a")))
    AcceleratorState._reset_state(True)
    crash_after_first_checkpoint(lambda: train(tiny_config(**opts, out=str(tmp_path / "b"))))
    AcceleratorState._reset_state(True)
    b = train(tiny_config(**opts, out=str(tmp_path / "b"), resume=True))
    targets = lambda run: [(row["step"], row["loss/G/pl_mean"]) for row in run.curves["train"]  # noqa: E731
                           if "loss/G/pl_mean" in row]
    assert [step for step, _ in targets(a)] == [1, 3, 5]
    assert targets(b) == targets(a)  # step 5's target continued from the restored one, not from 0


@pytest.mark.parametrize("bad, message", [(dict(pl_weight=-1.0), "pl_weight=-1.0 must be >= 0"),
                                          (dict(pl_interval=0), "pl_interval=0 must be >= 1")])
def test_bad_path_length_settings_are_one_line_errors(tiny_config, bad, message):
    from ganlib.errors import UserError

    with pytest.raises(UserError, match=message):
        tiny_config(**{**PL_TINY, **bad})


def test_path_length_on_a_generator_without_per_layer_w_is_refused_before_anything_is_written(tiny_config):
    from ganlib.errors import UserError
    from ganlib.train import Trainer

    cfg = tiny_config(net="dcgan", pl_weight=2.0)
    with pytest.raises(UserError, match="needs a generator with per-layer w .* not --net dcgan"):
        Trainer(cfg)
    assert not os.path.exists(cfg.out)


def test_tanh_family_is_stylegan2_with_a_tanh_on_the_image_and_loads_no_reference_checkpoint():
    torch.manual_seed(0)
    G, D = build_networks(NetConfig("stylegan2", 32, 1, latent_dim=8, width=2))
    torch.manual_seed(0)
    G_tanh, D_tanh = build_networks(NetConfig("stylegan2-tanh", 32, 1, latent_dim=8, width=2))
    assert G.state_dict().keys() == G_tanh.state_dict().keys() and D.state_dict().keys() == D_tanh.state_dict().keys()
    G.mixing_prob = G_tanh.mixing_prob = 0.0  # eval never mixes: compare single-latent images
    z = torch.randn(4, 8)
    linear = _generate(G, z, noise_mode="const")
    assert linear.abs().max() > 1  # the paper's G leaves its training output unbounded
    for mode in ("train", "eval"):
        getattr(G_tanh, mode)()
        torch.testing.assert_close(_generate(G_tanh, z, noise_mode="const"), torch.tanh(linear))
    from ganlib.errors import UserError
    from ganlib.nets.rosinality import load_source_checkpoint

    with pytest.raises(UserError, match="needs --net stylegan2, not --net stylegan2-tanh"):
        load_source_checkpoint("unused.pt", NetConfig("stylegan2-tanh", 32, 1, latent_dim=8, width=2), G_tanh, D_tanh)


@pytest.mark.slow
def test_path_length_regularisation_trains_under_two_process_ddp(tmp_path):
    """DDP wants a gradient for every parameter it wraps after each backward, and the path-length
    penalty alone does not reach G's to_rgb biases: the run must still finish on 2 processes."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "ganlib.train", "--net", "stylegan2", "--size", "32", "--width", "1", "--latent-dim", "8",
           "--batch", "4", "--steps", "5", "--pl-weight", "2", "--pl-interval", "2", "--log-every", "1",
           "--data", "mnist5k:classes=0-1:n=64", "--out", str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["env/num_processes"] == 2 and metrics["loss/G/pl"] > 0  # step 5 (index 4) was a PL step


def test_path_length_fields_enter_the_fingerprint_only_when_on():
    """Off (the default), runs and cached sources keep the fingerprint they had before the option
    existed; on, a resume with another weight or interval is refused."""
    from ganlib.config import TrainConfig
    from ganlib.pretrain import source_key_fields
    from ganlib.train import _fingerprint_fields, fingerprint

    assert not {"pl_weight", "pl_interval"} & set(_fingerprint_fields(TrainConfig(pl_interval=8)))
    assert not {"pl_weight", "pl_interval"} & set(source_key_fields(TrainConfig(pl_interval=8), 1, "no"))
    on = TrainConfig(net="stylegan2", size=32, pl_weight=2.0)
    assert fingerprint(on) != fingerprint(TrainConfig(net="stylegan2", size=32, pl_weight=2.0, pl_interval=8))
    assert source_key_fields(on, 1, "no")["pl_weight"] == 2.0
