"""SNGAN-style ResNet (Miyato et al. 2018, CIFAR-10 architecture) at 32 px, narrower by default.

G: Linear z -> 4x4 map, 3 up blocks (4 -> 8 -> 16 -> 32), head BN-ReLU-conv3x3-tanh.
   Up block: BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3, plus an upsample-conv1x1 shortcut.
D: every conv and linear spectrally normalised. Optimized first block (32 -> 16), one down
   block (16 -> 8), two plain blocks at 8x8, then ReLU, sum over space, linear -> logit.
Every block has `width` channels (the paper uses 256 in G and 128 in D; 64 here keeps CPU
runs short). Init as in common SNGAN code: Xavier-uniform, gain sqrt(2) on residual convs,
1 on shortcuts, the linear layers and G's output conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ganlib.nets import Discriminator, Generator, NetConfig, NetFamily

BOTTOM = 4  # side of G's first map and of the map G's blocks double from, in pixels
RESIDUAL_GAIN = math.sqrt(2)  # Xavier gain for convs followed by ReLU inside residual paths


def _xavier(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _sn(layer: nn.Module, gain: float) -> nn.Module:
    """Init `layer` then wrap it in spectral norm (power-iteration vectors start from the init)."""
    return spectral_norm(_xavier(layer, gain))


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class UpBlock(nn.Module):
    """G residual block: [N, c_in, s, s] -> [N, c_out, 2s, 2s]."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _xavier(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), RESIDUAL_GAIN)  # BN next
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _xavier(nn.Conv2d(c_out, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.shortcut = _xavier(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_upsample(F.relu(self.bn1(x))))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.shortcut(_upsample(x))


class OptimizedDownBlock(nn.Module):
    """D's first block, taking images: conv-ReLU-conv-avgpool, shortcut avgpool-conv1x1.

    No ReLU before the first conv, so the raw image (with negative values) is not clipped.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(c_in, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.conv2 = _sn(nn.Conv2d(c_out, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.shortcut = _sn(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class DownBlock(nn.Module):
    """D residual block: ReLU-conv-ReLU-conv (then avgpool when `downsample`); the shortcut is
    conv1x1 (+ avgpool) when the shape changes, identity otherwise."""

    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.conv1 = _sn(nn.Conv2d(c_in, c_out, 3, 1, 1), RESIDUAL_GAIN)
        self.conv2 = _sn(nn.Conv2d(c_out, c_out, 3, 1, 1), RESIDUAL_GAIN)
        needs_projection = downsample or c_in != c_out
        self.shortcut = _sn(nn.Conv2d(c_in, c_out, 1), 1.0) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ReLU: x is still needed, unclipped, by the shortcut.
        h = self.conv2(F.relu(self.conv1(F.relu(x))))
        s = self.shortcut(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SumPoolHead(nn.Module):
    """D head: ReLU, sum over space, linear: [N, c, h, w] -> logits [N]."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear = _sn(nn.Linear(channels, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.relu(x).sum(dim=(2, 3))).flatten(0)


def build(cfg: NetConfig) -> tuple[Generator, Discriminator]:
    """Build the ResNet pair; G features and D features are maps [N, width, h, w]."""
    shape = (cfg.channels, cfg.size, cfg.size)
    ch = cfg.width
    n_up = int(math.log2(cfg.size // BOTTOM))  # 3 at 32 px

    stem = nn.Sequential(_xavier(nn.Linear(cfg.latent_dim, BOTTOM * BOTTOM * ch), 1.0),
                         nn.Unflatten(1, (ch, BOTTOM, BOTTOM)))
    g_blocks = [stem] + [UpBlock(ch, ch) for _ in range(n_up)]
    g_head = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(),
                           _xavier(nn.Conv2d(ch, cfg.channels, 3, 1, 1), 1.0), nn.Tanh())

    d_blocks = [OptimizedDownBlock(cfg.channels, ch), DownBlock(ch, ch, downsample=True),
                DownBlock(ch, ch, downsample=False), DownBlock(ch, ch, downsample=False)]
    d_head = SumPoolHead(ch)

    return (Generator(g_blocks, g_head, cfg.latent_dim, shape),
            Discriminator(d_blocks, d_head, shape))


FAMILY = NetFamily(
    name="resnet",
    sizes=(32,),
    build=build,
    spatial_d_features=True,
    description="SNGAN-style ResNet: residual up blocks in G, spectral-norm residual D; 32 px",
)
