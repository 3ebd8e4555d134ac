"""The classic fully connected GAN (Goodfellow et al. 2014 style), for any size 8..64 px.

G: z -> 3 x (Linear + BatchNorm1d + ReLU) -> Linear -> tanh -> [N, C, H, W].
D: flatten -> 3 x (Linear + LeakyReLU(0.2)) -> Linear -> one logit.
Hidden layers have 4 * width units (256 at the default width 64). Default PyTorch init.
"""

from __future__ import annotations

from torch import nn

from ganlib.nets import Discriminator, Generator, NetConfig, NetFamily

NUM_HIDDEN = 3  # hidden layers in each of G and D
LEAK = 0.2  # LeakyReLU negative slope in D


def _g_block(fan_in: int, hidden: int) -> nn.Module:
    # No bias: BatchNorm's shift makes it redundant.
    return nn.Sequential(nn.Linear(fan_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU())


def _d_block(fan_in: int, hidden: int, flatten: bool = False) -> nn.Module:
    layers = [nn.Flatten(1)] if flatten else []  # images [N, C, H, W] enter D's first block
    return nn.Sequential(*layers, nn.Linear(fan_in, hidden), nn.LeakyReLU(LEAK))


def build(cfg: NetConfig) -> tuple[Generator, Discriminator]:
    """Build the MLP pair; G features are [N, hidden], D features are [N, hidden] (flat)."""
    shape = (cfg.channels, cfg.size, cfg.size)
    pixels = cfg.channels * cfg.size * cfg.size
    hidden = 4 * cfg.width

    g_blocks = [_g_block(cfg.latent_dim if i == 0 else hidden, hidden) for i in range(NUM_HIDDEN)]
    g_head = nn.Sequential(nn.Linear(hidden, pixels), nn.Tanh(), nn.Unflatten(1, shape))

    d_blocks = [_d_block(pixels if i == 0 else hidden, hidden, flatten=i == 0)
                for i in range(NUM_HIDDEN)]
    d_head = nn.Sequential(nn.Linear(hidden, 1), nn.Flatten(0))  # [N, 1] -> [N]

    return (Generator(g_blocks, g_head, cfg.latent_dim, shape),
            Discriminator(d_blocks, d_head, shape))


FAMILY = NetFamily(
    name="mlp",
    sizes=None,
    size_range=(8, 64),
    build=build,
    spatial_d_features=False,
    description="fully connected GAN, 3 hidden layers of 4*width units; any size 8..64 px",
)
