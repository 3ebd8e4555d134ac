"""GAN losses against hand-computed references, and R1 on a function with a known gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ganlib.errors import UserError
from ganlib.losses import LOSSES, r1_penalty

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
