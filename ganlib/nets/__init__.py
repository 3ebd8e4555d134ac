"""GAN network families, looked up by name: `build_networks(NetConfig(...)) -> (G, D)`.

Every family builds the same two wrappers, `Generator` and `Discriminator`, around an
`nn.ModuleList` named `blocks` and a final module `head`. Transfer strategies address layers
only through that contract: "the first k D blocks" are the state-dict prefixes
`blocks.0.` .. `blocks.{k-1}.`, counted from the image side for D and from the latent side for G.
Nothing with parameters lives outside `blocks` and `head`.

Models never pick a device or dtype; the caller (Accelerate) moves them and sets autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ganlib.errors import UserError
from ganlib.registry import Registry

SUPPORTED_CHANNELS = (1, 3)  # grayscale or RGB


@dataclass(frozen=True)
class NetConfig:
    """Which network to build and at what shape; validated by `build_networks`."""

    name: str
    """Family name in `NETWORKS` (`mlp`, `dcgan`, `resnet`, `stylegan2`)."""
    size: int
    """Image height = width, in pixels; each family lists the sizes it supports."""
    channels: int
    """Image channels: 1 (grayscale) or 3 (RGB)."""
    latent_dim: int = 100
    """Length of the latent vector z fed to G (numbers per sample)."""
    width: int = 64
    """Channel multiplier, in channels: the narrowest conv layer has `width` channels
    (dcgan), every residual block has `width` channels (resnet), hidden layers have
    `4 * width` units (mlp, so 256 at the default); stylegan2: 64 = the paper's config F
    (512 channels up to 64 px, then halving per doubling), other values scale every layer."""


@dataclass(frozen=True)
class NetFamily:
    """One registered network family: what it supports and how to build it."""

    name: str
    """Registry name, as written in configs and cell ids."""
    sizes: tuple[int, ...] | None
    """Supported image sizes in pixels; None = any size (within `size_range`)."""
    build: Callable[[NetConfig], tuple[nn.Module, nn.Module]]
    """Builds `(G, D)` from an already validated config; call `build_networks` instead."""
    spatial_d_features: bool
    """True when D's block features include a spatial map [N, C, h, w] usable for a
    patch-level loss; False when they are flat vectors."""
    description: str
    """One line for `bench list`."""
    size_range: tuple[int, int] | None = None
    """(min, max) image size in pixels, inclusive, checked only when `sizes` is None;
    None = no limit."""
    g_affine_params: Callable[[nn.Module], list[nn.Parameter]] | None = None
    """G's parameters that play the part of normalisation scale/shift (what `scale_shift` adapts)
    when G has no affine normalisation layers, e.g. StyleGAN2's style affines; None = G's own
    affine normalisation layers are used."""

    def supports_size(self, size: int) -> bool:
        """Whether `build_networks` accepts this image size (pixels) for this family."""
        if self.sizes is not None:
            return size in self.sizes
        if self.size_range is None:
            return isinstance(size, int) and size >= 1
        low, high = self.size_range
        return isinstance(size, int) and low <= size <= high

    def sizes_text(self) -> str:
        """The supported sizes as people read them: `28, 32, 64` or `8..64`."""
        if self.sizes is not None:
            return ", ".join(str(s) for s in self.sizes)
        if self.size_range is None:
            return "any"
        return f"{self.size_range[0]}..{self.size_range[1]}"


def _run_blocks(blocks: nn.ModuleList, head: nn.Module, x: torch.Tensor, return_features: bool):
    """Apply `blocks` then `head`; collect the activation after each block when asked."""
    features = []
    h = x
    for block in blocks:
        h = block(h)
        if return_features:
            features.append(h)
    out = head(h)
    return (out, features) if return_features else out


class Generator(nn.Module):
    """z [N, latent_dim] -> images [N, C, H, W] in [-1, 1] (float, autocast dtype if any).

    `forward(z, return_features=True)` also returns the activation after each block,
    in block order (latent side first).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, latent_dim: int,
                 image_shape: tuple[int, int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)  # (C, H, W)

    def forward(self, z: torch.Tensor, return_features: bool = False):
        return _run_blocks(self.blocks, self.head, z, return_features)

    def features_through(self, blocks: nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
        """The activation after the last of `blocks` (a prefix of `self.blocks`, or a frozen copy of
        one, as CDC keeps of the source) for latents z; families whose blocks pass more than one
        tensor between them override it."""
        h = z
        for block in blocks:
            h = block(h)
        return h


class Discriminator(nn.Module):
    """Images [N, C, H, W] in [-1, 1] -> logits [N] (real > 0 > fake, no sigmoid).

    `forward(x, return_features=True)` also returns the feature after each block,
    in block order (image side first).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module,
                 image_shape: tuple[int, int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.image_shape = tuple(image_shape)  # (C, H, W)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        return _run_blocks(self.blocks, self.head, x, return_features)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `module` (shared ones once); only `requires_grad` ones
    when `trainable_only`. Spectral-norm power-iteration vectors are buffers, not counted."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


NETWORKS: Registry[NetFamily] = Registry("network")


def validate_net_config(cfg: NetConfig) -> NetFamily:
    """Check `cfg` against its family; a bad value is a one-line UserError. Returns the family."""
    family = NETWORKS.get(cfg.name)
    if cfg.channels not in SUPPORTED_CHANNELS:
        raise UserError(f"channels={cfg.channels!r} is not supported; expected 1 (grayscale) or "
                        f"3 (RGB); set channels to 1 or 3")
    if not isinstance(cfg.latent_dim, int) or cfg.latent_dim < 1:
        raise UserError(f"latent_dim={cfg.latent_dim!r} is invalid; expected an integer >= 1 "
                        f"(default 100); set a positive latent_dim")
    if not isinstance(cfg.width, int) or cfg.width < 1:
        raise UserError(f"width={cfg.width!r} is invalid; expected an integer >= 1 "
                        f"(default 64); set a positive width")
    if not family.supports_size(cfg.size):
        raise UserError(f"network {cfg.name!r} does not support size={cfg.size!r}; supported "
                        f"sizes: {family.sizes_text()}; pick one of those or another network")
    return family


def build_networks(cfg: NetConfig) -> tuple[Generator, Discriminator]:
    """Validate `cfg` and build `(G, D)` on CPU in float32, in training mode.

    Deterministic given `torch.manual_seed`: the same seed gives the same weights and buffers.
    """
    family = validate_net_config(cfg)
    return family.build(cfg)


# The families import Generator/Discriminator/NetFamily from this module, so they are
# imported after those are defined; this is the one place that lists them.
from ganlib.nets import dcgan, mlp, resnet, stylegan2  # noqa: E402

for _family in (mlp.FAMILY, dcgan.FAMILY, resnet.FAMILY, stylegan2.FAMILY, stylegan2.FAMILY_TANH):
    NETWORKS.register(_family.name, _family)

__all__ = ["NETWORKS", "NetConfig", "NetFamily", "Generator", "Discriminator",
           "build_networks", "validate_net_config", "count_parameters"]
