"""Tests for ganlib/nets: every registered family x size x channels keeps the shared contract."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ganlib.errors import UserError
from ganlib.nets import NETWORKS, NetConfig, build_networks, count_parameters

BATCH = 4  # > 1 so BatchNorm can train
LATENT = 16  # small latent keeps the tests quick; default-latent builds are checked separately
WIDTH = 8  # channel multiplier for speed; the structure does not depend on it
SIZES_FOR_ANY = (28, 32)  # sizes tested for families that accept any size
MAX_SIZE = 64  # larger sizes of a family are built in its own test file (tests/test_stylegan2.py)


def _cases():
    for name in NETWORKS.names():
        family = NETWORKS.get(name)
        for size in [s for s in family.sizes or SIZES_FOR_ANY if s <= MAX_SIZE]:
            for channels in (1, 3):
                yield pytest.param(name, size, channels, id=f"{name}-{size}px-c{channels}")


CASES = list(_cases())


def _build(name, size, channels, seed=0, latent_dim=LATENT, width=WIDTH):
    torch.manual_seed(seed)
    return build_networks(NetConfig(name, size, channels, latent_dim=latent_dim, width=width))


def _z(G, seed=1):
    return torch.randn(BATCH, G.latent_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,size,channels", CASES)
def test_shapes_ranges_and_features(name, size, channels):
    G, D = _build(name, size, channels)
    assert G.latent_dim == LATENT and G.image_shape == (channels, size, size)
    images, g_feats = G(_z(G), return_features=True)
    assert images.shape == (BATCH, channels, size, size)
    assert images.dtype == torch.float32
    assert images.std() > 0
    # The contract's range holds in eval mode (StyleGAN2 trains D on its raw output, as the paper does).
    G.eval()
    bounded = G(_z(G))
    assert bounded.min() >= -1 and bounded.max() <= 1 and bounded.std() > 0
    logits, d_feats = D(images, return_features=True)
    assert logits.shape == (BATCH,) and torch.isfinite(logits).all()
    assert len(g_feats) == len(G.blocks) and len(d_feats) == len(D.blocks)
    assert all(f.shape[0] == BATCH for f in g_feats + d_feats)
    if NETWORKS.get(name).spatial_d_features:
        assert all(f.dim() == 4 for f in d_feats)
    else:
        assert all(f.dim() == 2 for f in d_feats)
    # The plain call returns exactly the first output of the feature call (in eval mode, where
    # spectral norm's power iteration does not step between calls).
    D.eval()
    assert torch.equal(D(images), D(images, return_features=True)[0])


@pytest.mark.parametrize("name,size,channels", CASES)
def test_blocks_head_contract(name, size, channels):
    G, D = _build(name, size, channels)
    for net in (G, D):
        assert isinstance(net.blocks, nn.ModuleList)
        assert isinstance(net.head, nn.Module)
        for pname, _ in net.named_parameters():
            assert pname.startswith(("blocks.", "head.")), pname
        for bname, _ in net.named_buffers():
            assert bname.startswith(("blocks.", "head.")), bname
        # "the first k blocks" == the state-dict prefixes blocks.0 .. blocks.{k-1}
        k = 2
        prefixed = sum(p.numel() for n, p in net.named_parameters()
                       if n.startswith(tuple(f"blocks.{i}." for i in range(k))))
        assert prefixed == sum(count_parameters(b) for b in net.blocks[:k])
    assert len(D.blocks) >= 3
    assert all(count_parameters(b) > 0 for b in D.blocks)
    affine_norms = [m for m in G.modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine]
    style_affines = NETWORKS.get(name).g_affine_params
    assert affine_norms or (style_affines and style_affines(G)), \
        "G needs affine normalisation layers (or style affines) for scale/shift transfer"


@pytest.mark.parametrize("name,size,channels", CASES)
def test_gradient_reaches_every_parameter(name, size, channels):
    G, D = _build(name, size, channels)
    loss = nn.functional.softplus(-D(G(_z(G)))).mean()
    loss.backward()
    for net in (G, D):
        for pname, p in net.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,size,channels", CASES)
def test_build_is_deterministic_under_seed(name, size, channels):
    first = [n.state_dict() for n in _build(name, size, channels, seed=3)]
    second = [n.state_dict() for n in _build(name, size, channels, seed=3)]
    other = [n.state_dict() for n in _build(name, size, channels, seed=4)]
    for a, b, c in zip(first, second, other):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("name,size,channels", CASES)
def test_bf16_autocast_forward_and_backward_on_cpu(name, size, channels):
    G, D = _build(name, size, channels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images, g_feats = G(_z(G), return_features=True)
        logits, d_feats = D(images, return_features=True)
    assert images.shape == (BATCH, channels, size, size)
    assert logits.shape == (BATCH,)
    assert torch.isfinite(images.float()).all() and torch.isfinite(logits.float()).all()
    logits.float().mean().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("name,size,channels", CASES)
def test_state_dict_round_trip_and_deepcopy(name, size, channels):
    """Checkpoints and strategies (frozen source copies) rely on these."""
    G, D = _build(name, size, channels, seed=0)
    G2, D2 = _build(name, size, channels, seed=1)
    G2.load_state_dict(G.state_dict())
    D2.load_state_dict(D.state_dict())
    G.eval(), D.eval(), G2.eval(), D2.eval()
    z = _z(G)

    def gen(net):  # noise inputs (stylegan2) draw from the global generator: the same draws for both
        torch.manual_seed(5)
        return net(z)

    assert torch.equal(gen(G), gen(G2))
    assert torch.equal(D(gen(G)), D2(gen(G)))
    D3 = copy.deepcopy(D)
    assert torch.equal(D3(gen(G)), D(gen(G)))


def test_default_width_and_latent_build_every_family():
    for name in NETWORKS.names():
        family = NETWORKS.get(name)
        size = (family.sizes or SIZES_FOR_ANY)[0]
        torch.manual_seed(0)
        G, D = build_networks(NetConfig(name, size, 1))
        assert G.latent_dim == 100
        assert D(G(torch.randn(2, 100))).shape == (2,)


def test_width_scales_parameters():
    for name in NETWORKS.names():
        size = (NETWORKS.get(name).sizes or SIZES_FOR_ANY)[0]
        small = [count_parameters(n) for n in _build(name, size, 1, width=4)]
        large = [count_parameters(n) for n in _build(name, size, 1, width=8)]
        assert all(s < l for s, l in zip(small, large)), name


def test_count_parameters_trainable_only():
    G, D = _build("dcgan", 32, 1)
    total = count_parameters(D)
    assert total == sum(p.numel() for p in D.parameters())
    D.blocks[0].requires_grad_(False)
    frozen = count_parameters(D.blocks[0])
    assert frozen > 0
    assert count_parameters(D, trainable_only=True) == total - frozen
    assert count_parameters(D) == total


@pytest.mark.parametrize("cfg,fragment", [
    (NetConfig("dcgan", 48, 1), "48"),
    (NetConfig("resnet", 28, 1), "28"),
    (NetConfig("mlp", 4, 1), "8..64"),
    (NetConfig("mlp", 128, 3), "128"),
    (NetConfig("nope", 32, 1), "nope"),
    (NetConfig("dcgan", 32, 2), "channels=2"),
    (NetConfig("mlp", 28, 1, latent_dim=0), "latent_dim=0"),
    (NetConfig("dcgan", 32, 3, width=0), "width=0"),
])
def test_bad_configs_raise_one_line_user_error(cfg, fragment):
    with pytest.raises(UserError) as info:
        build_networks(cfg)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_unsupported_size_lists_supported_values():
    with pytest.raises(UserError, match="28, 32, 64"):
        build_networks(NetConfig("dcgan", 48, 1))
    with pytest.raises(UserError, match="known: dcgan, mlp, resnet"):
        build_networks(NetConfig("stylegan", 32, 1))
