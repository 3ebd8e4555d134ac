"""GAN objectives by name (non-saturating, hinge) and the R1 gradient penalty on real images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ganlib.registry import Registry


@dataclass(frozen=True)
class GANLoss:
    """A pair of per-batch scalar losses computed from discriminator logits of shape [N]."""

    name: str
    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real_logits, fake_logits) -> scalar
    g_loss: Callable[[torch.Tensor], torch.Tensor]  # fake_logits -> scalar


def _nonsat_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # softplus(-x) == BCE-with-logits(x, 1); softplus(x) == BCE-with-logits(x, 0); fp32 for stability.
    return F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()


def _nonsat_g(fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake.float()).mean()


def _hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean()


def _hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.float().mean()


LOSSES: Registry[GANLoss] = Registry("loss")
LOSSES.register("nonsat", GANLoss("nonsat", _nonsat_d, _nonsat_g))
LOSSES.register("hinge", GANLoss("hinge", _hinge_d, _hinge_g))


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||dD(x)/dx||^2 at real images (Mescheder et al. 2018).

    `real_images` must have requires_grad=True and have produced `real_logits`; the graph is kept
    (create_graph) so the penalty itself can be back-propagated into D. Multiply by gamma / 2.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()
