"""GAN objectives by name (non-saturating, hinge), the R1 gradient penalty on real images, and
StyleGAN2's path-length regularisation of G."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ganlib.errors import UserError
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


PL_DECAY = 0.01       # per regularised step, how far the target moves toward the batch's mean path length (paper)
PL_BATCH_SHRINK = 2   # the regularised batch is the training batch divided by this (paper), at least 1


def path_lengths(images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Per sample, |J_w^T y| with y ~ N(0, I) / sqrt(pixels): how far the image moves per unit step
    in w (Karras et al. 2020, eq. 4), averaged over the per-layer w slots. [N].

    `ws` [N, layers, w_dim] must have produced `images` [N, C, H, W]; the graph is kept (create_graph)
    so the lengths can be back-propagated into G. Dividing y by sqrt(H W) keeps the lengths
    independent of the resolution.
    """
    y = torch.randn_like(images, dtype=torch.float32) / math.sqrt(images.shape[2] * images.shape[3])
    (grad,) = torch.autograd.grad((images.float() * y).sum(), ws, create_graph=True)
    return grad.float().square().sum(2).mean(1).sqrt()


class PathLengthRegularizer:
    """Lazy path-length regularisation of G (StyleGAN2): every `interval` G steps, weight * interval *
    mean((|J^T y| - a)^2), where the target `a` is an exponential moving average (decay `PL_DECAY`)
    of the path lengths seen so far. Needs a generator that returns its per-layer w (`return_ws=True`,
    the stylegan2 family). `mean` is state a resumed run must restore."""

    def __init__(self, weight: float, interval: int):
        self.weight, self.interval = weight, interval
        self.mean = torch.zeros(())

    @staticmethod
    def check(G: torch.nn.Module, net: str) -> None:
        """UserError unless G can return the per-layer w it made an image from (the stylegan2 families)."""
        if "return_ws" not in inspect.signature(G.forward).parameters:
            raise UserError(f"--pl-weight: path-length regularisation needs a generator with per-layer w "
                            f"(--net stylegan2 or stylegan2-tanh), not --net {net}; use --pl-weight 0")

    def due(self, step: int) -> bool:
        """Whether G step `step` (0-based) is a regularised one."""
        return step % self.interval == 0

    def loss(self, G, z: torch.Tensor, reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted penalty on a batch of `z` (shrunk by `PL_BATCH_SHRINK`) to back-propagate into G,
        and its logs; moves the target. `reduce_mean` averages the batch's mean length over processes,
        so every process keeps the same target (and a resumed run can restore it)."""
        z = z[:max(1, z.shape[0] // PL_BATCH_SHRINK)]
        images, ws = G(z, return_ws=True)
        lengths = path_lengths(images, ws)
        self.mean = self.mean.to(lengths.device)
        self.mean = self.mean + PL_DECAY * (reduce_mean(lengths.detach().mean()) - self.mean)
        penalty = (lengths - self.mean).square().mean()
        # + 0 * a pixel: parameters the Jacobian does not depend on (to_rgb biases) still join the graph,
        # as DDP needs a gradient for every parameter it wraps (the reference adds the same term).
        weighted = penalty * (self.weight * self.interval) + 0 * images[0, 0, 0, 0].float()
        return weighted, {"loss/G/pl": penalty.detach(), "loss/G/pl_mean": self.mean.clone()}
