"""DCGAN (Radford et al. 2016) at 28, 32 and 64 px.

G: transposed convs, each block ConvTranspose2d + BatchNorm2d + ReLU, doubling the resolution
and halving the channels; head ConvTranspose2d -> tanh.
D: strided convs, each block Conv2d (+ BatchNorm2d from the second block on) + LeakyReLU(0.2),
halving the resolution and doubling the channels; head Conv2d over the last map -> one logit.
Convs followed by BatchNorm carry no bias (BN's shift does that job).
Init as in the paper: conv weights N(0, 0.02), BN weight N(1, 0.02), biases 0.
G's first conv (1x1 latent map -> k x k) and D's head (a conv over the whole last map) are dense
layers: they run as matmuls (ganlib.nets.whole_map), with the same parameters.

Resolutions (G from the latent side; D mirrors it from the image side):
  28 px: z -> 7x7 -> 14 -> 28         D: 28 -> 14 -> 7 -> 4 -> logit
  32 px: z -> 4x4 -> 8 -> 16 -> 32    D: 32 -> 16 -> 8 -> 4 -> logit
  64 px: z -> 4x4 -> 8 -> 16 -> 32 -> 64   D: 64 -> 32 -> 16 -> 8 -> 4 -> logit
"""

from __future__ import annotations

from torch import nn

from ganlib.nets import Discriminator, Generator, NetConfig, NetFamily
from ganlib.nets.whole_map import LatentConvTranspose2d, WholeMapConv2d

LEAK = 0.2  # LeakyReLU negative slope in D
INIT_STD = 0.02  # std of the N(0, .) conv init and N(1, .) BN-scale init

# Per size: the kernel of G's first block (1x1 latent -> 7x7 or 4x4), the number of stride-2
# up blocks after it, and the kernel of each stride-2 D block (the last one reaches 4x4).
_PLANS = {
    28: dict(g_first_kernel=7, up_blocks=1, d_kernels=(4, 4, 3)),  # 7 -> 4 needs k3 s2 p1
    32: dict(g_first_kernel=4, up_blocks=2, d_kernels=(4, 4, 4)),
    64: dict(g_first_kernel=4, up_blocks=3, d_kernels=(4, 4, 4, 4)),
}


def _up(c_in: int, c_out: int, kernel: int = 4, stride: int = 2, padding: int = 1) -> nn.Module:
    conv_type = LatentConvTranspose2d if (stride, padding) == (1, 0) else nn.ConvTranspose2d
    return nn.Sequential(conv_type(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def _down(c_in: int, c_out: int, norm: bool, kernel: int = 4) -> nn.Module:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=2, padding=1, bias=not norm)
    return nn.Sequential(conv, *([nn.BatchNorm2d(c_out)] if norm else []), nn.LeakyReLU(LEAK))


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN init in place: conv weights N(0, 0.02), BN weight N(1, 0.02), all biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)


def build(cfg: NetConfig) -> tuple[Generator, Discriminator]:
    """Build the DCGAN pair; all block features are maps [N, channels, h, w]."""
    plan = _PLANS[cfg.size]
    shape = (cfg.channels, cfg.size, cfg.size)
    w, n_up = cfg.width, plan["up_blocks"]

    # G: channels shrink from width * 2**n_up to width, one halving per up block.
    g_channels = [w * 2 ** (n_up - i) for i in range(n_up + 1)]
    first = _up(cfg.latent_dim, g_channels[0], plan["g_first_kernel"], stride=1, padding=0)
    g_blocks = [nn.Sequential(nn.Unflatten(1, (cfg.latent_dim, 1, 1)), *first)]
    g_blocks += [_up(c_in, c_out) for c_in, c_out in zip(g_channels, g_channels[1:])]
    g_head = nn.Sequential(nn.ConvTranspose2d(w, cfg.channels, 4, 2, 1), nn.Tanh())

    # D: one block per halving down to 4x4, channels width, 2*width, ...; no BN on the first.
    d_channels = [cfg.channels] + [w * 2 ** i for i in range(len(plan["d_kernels"]))]
    d_blocks = [_down(d_channels[i], d_channels[i + 1], norm=i > 0, kernel=k)
                for i, k in enumerate(plan["d_kernels"])]
    d_head = nn.Sequential(WholeMapConv2d(d_channels[-1], 1, 4, 1, 0), nn.Flatten(0))  # [N,1,1,1] -> [N]

    G = Generator(g_blocks, g_head, cfg.latent_dim, shape)
    D = Discriminator(d_blocks, d_head, shape)
    init_dcgan_weights(G)
    init_dcgan_weights(D)
    return G, D


FAMILY = NetFamily(
    name="dcgan",
    sizes=tuple(sorted(_PLANS)),
    build=build,
    spatial_d_features=True,
    description="DCGAN: transposed-conv G with BatchNorm, strided-conv D; 28, 32 or 64 px",
)
