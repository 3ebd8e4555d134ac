"""GAN losses against hand-computed references, and R1 on a function with a known gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ganlib.errors import UserError
from ganlib.losses import LOSSES, PL_BATCH_SHRINK, PL_DECAY, PathLengthRegularizer, path_lengths, r1_penalty

REAL = torch.tensor([2.0, -1.0, 0.5, 0.0])
FAKE = torch.tensor([-3.0, 1.5, 0.2, 4.0])


def test_registry_names_and_unknown_name():
    assert set(LOSSES.names()) >= {"nonsat", "hinge"}
    with pytest.raises(UserError, match="nope"):
        LOSSES.get("nope")


def test_nonsat_matches_binary_cross_entropy():
    loss = LOSSES.get("nonsat")
    bce = F.binary_cross_entropy_with_logits
    want_d = bce(REAL, torch.ones(4)) + bce(FAKE, torch.zeros(4))
    want_g = bce(FAKE, torch.ones(4))
    torch.testing.assert_close(loss.d_loss(REAL, FAKE), want_d)
    torch.testing.assert_close(loss.g_loss(FAKE), want_g)


def test_nonsat_by_hand():
    # D loss = mean log(1 + e^-real) + mean log(1 + e^fake); written out with math, not torch.
    d = (sum(math.log1p(math.exp(-r)) for r in REAL.tolist()) / 4
         + sum(math.log1p(math.exp(f)) for f in FAKE.tolist()) / 4)
    g = sum(math.log1p(math.exp(-f)) for f in FAKE.tolist()) / 4
    assert LOSSES.get("nonsat").d_loss(REAL, FAKE).item() == pytest.approx(d, rel=1e-6)
    assert LOSSES.get("nonsat").g_loss(FAKE).item() == pytest.approx(g, rel=1e-6)


def test_hinge_by_hand():
    loss = LOSSES.get("hinge")
    # real: relu(1 - [2, -1, .5, 0]) = [0, 2, .5, 1] -> 0.875
    # fake: relu(1 + [-3, 1.5, .2, 4]) = [0, 2.5, 1.2, 5] -> 2.175
    assert loss.d_loss(REAL, FAKE).item() == pytest.approx(0.875 + 2.175)
    assert loss.g_loss(FAKE).item() == pytest.approx(-(-3.0 + 1.5 + 0.2 + 4.0) / 4)


@pytest.mark.parametrize("name", ["nonsat", "hinge"])
def test_losses_are_fp32_scalars_from_bf16_logits(name):
    loss = LOSSES.get(name)
    d = loss.d_loss(REAL.bfloat16(), FAKE.bfloat16())
    g = loss.g_loss(FAKE.bfloat16())
    assert d.dtype == g.dtype == torch.float32 and d.dim() == g.dim() == 0


@pytest.mark.parametrize("name", ["nonsat", "hinge"])
def test_d_loss_prefers_a_discriminator_that_separates(name):
    loss = LOSSES.get(name)
    good = loss.d_loss(torch.full((8,), 3.0), torch.full((8,), -3.0))
    bad = loss.d_loss(torch.full((8,), -3.0), torch.full((8,), 3.0))
    assert good < bad
    assert loss.g_loss(torch.full((8,), 3.0)) < loss.g_loss(torch.full((8,), -3.0))


def test_r1_of_a_linear_function_is_the_squared_weight_norm():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 5)
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    logits = (w * x).flatten(1).sum(1)  # D(x) = <w, x>: gradient w for every sample
    penalty = r1_penalty(logits, x)
    torch.testing.assert_close(penalty, w.square().sum())


def test_r1_of_a_quadratic_and_its_gradient_reaches_the_parameters():
    # D(x) = a * sum(x^2): grad 2 a x, so R1 = mean_n 4 a^2 ||x_n||^2 and dR1/da = 8 a mean_n ||x_n||^2.
    a = torch.tensor(0.7, requires_grad=True)
    x = torch.randn(4, 1, 3, 3, requires_grad=True)
    penalty = r1_penalty(a * x.square().flatten(1).sum(1), x)
    norms = x.detach().square().flatten(1).sum(1)
    torch.testing.assert_close(penalty, 4 * 0.49 * norms.mean())
    penalty.backward()
    torch.testing.assert_close(a.grad, 8 * 0.7 * norms.mean())


class _TinyStyleG(torch.nn.Module):
    """A generator with a known Jacobian: image = tanh(A w) for w = B z, repeated over 2 w slots
    (slot 0 drives the top half of the image, slot 1 the bottom)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.B = torch.nn.Parameter(torch.randn(3, 3))
        self.A = torch.nn.Parameter(torch.randn(2, 3, 8))

    def forward(self, z, return_ws=False):
        ws = (z @ self.B.T).unsqueeze(1).expand(-1, 2, -1)
        top, bottom = (torch.tanh(ws[:, i] @ self.A[i]).view(-1, 1, 2, 4) for i in range(2))
        image = torch.cat([top, bottom], dim=2)  # [N, 1, 4, 4]
        return (image, ws) if return_ws else image


def _lengths_by_jacobian(G, z, y):
    """|J_w^T y| per sample and w slot with the Jacobian built column by column by torch.func, then
    the root of the mean over slots of the squared lengths."""
    out = []
    for i in range(z.shape[0]):
        w = (z[i] @ G.B.T).detach()

        def image_of(ws):  # [2, 3] -> [1, 4, 4]
            top, bottom = (torch.tanh(ws[j] @ G.A[j]).view(1, 2, 4) for j in range(2))
            return torch.cat([top, bottom], dim=1)

        J = torch.func.jacrev(image_of)(w.expand(2, 3).clone())  # [1, 4, 4, 2, 3]
        jty = torch.einsum("chw,chwsk->sk", y[i], J)  # [2 slots, 3]
        out.append(jty.square().sum(1).mean().sqrt())
    return torch.stack(out)


def test_path_lengths_equal_an_independent_jacobian_computation():
    G, z = _TinyStyleG(), torch.randn(5, 3)
    images, ws = G(z, return_ws=True)
    torch.manual_seed(11)
    got = path_lengths(images, ws)
    torch.manual_seed(11)  # the same y: N(0, I) / sqrt(H W)
    y = torch.randn_like(images) / math.sqrt(16)
    torch.testing.assert_close(got, _lengths_by_jacobian(G, z, y))
    assert got.requires_grad  # kept in the graph, so the penalty trains G


def test_regulariser_moves_its_target_and_weights_by_weight_times_interval():
    G, z = _TinyStyleG(), torch.randn(8, 3)
    reg = PathLengthRegularizer(weight=2.0, interval=4)
    torch.manual_seed(5)
    loss, logs = reg.loss(G, z)
    torch.manual_seed(5)
    images, ws = G(z[:8 // PL_BATCH_SHRINK], return_ws=True)
    lengths = path_lengths(images, ws).detach()
    target = PL_DECAY * lengths.mean()  # from 0
    torch.testing.assert_close(reg.mean, target)
    torch.testing.assert_close(logs["loss/G/pl"], (lengths - target).square().mean())
    torch.testing.assert_close(loss.detach(), 2.0 * 4 * logs["loss/G/pl"])
    before = reg.mean.clone()
    reg.loss(G, z)
    assert 0 < (reg.mean - before).abs() < (lengths.mean() - before).abs()  # a step of PL_DECAY toward the lengths


def test_regulariser_is_lazy_and_reaches_mapping_and_synthesis():
    reg = PathLengthRegularizer(weight=2.0, interval=4)
    assert [s for s in range(10) if reg.due(s)] == [0, 4, 8]
    G = _TinyStyleG()
    loss, _ = reg.loss(G, torch.randn(4, 3))
    loss.backward()
    assert G.A.grad.abs().sum() > 0 and G.B.grad.abs().sum() > 0  # synthesis and mapping both regularised
