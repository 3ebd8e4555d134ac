"""Tests for ganlib/nets/stylegan2 beyond the shared contract (tests/test_nets.py covers 32 and 64 px).

Numeric agreement with the reference implementation was measured outside the repository (the
reference is not vendored); docs/stylegan2.md records the figure and how it was obtained.
"""

from __future__ import annotations

import pytest
import torch

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
