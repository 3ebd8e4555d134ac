"""StyleGAN2 (Karras et al. 2020, config F) at 32 to 1024 px, in plain PyTorch.

G: a mapping network (pixel norm, 8 equalised-lr linear layers at lr x0.01; 2 for latents shorter
than 256, as stylegan2-ada's small-image config) turns z into w; the
synthesis network starts from a learned constant 4x4 map and doubles the resolution per block with
modulated/demodulated 3x3 convs, per-pixel noise and a `to_rgb` per resolution whose outputs are
summed through upsampled skips (the "skip" generator). D is the residual discriminator: `from_rgb`,
one residual block per halving down to 4x4, minibatch standard deviation, a conv and two linears.
Every weight uses equalised learning rate (stored N(0, 1), scaled by 1/sqrt(fan_in) when used).

Blocks, as the `blocks`/`head` contract counts them:
  G: blocks.0 mapping (z -> w) | blocks.1 const + 4x4 conv + to_rgb | blocks.k, k >= 2: the
     2**(k+1) px block (up-conv, conv, to_rgb) | head: no parameters (the summed RGB skip).
     The feature of a synthesis block is its conv activation [N, C, r, r]; of the mapping, w [N, latent].
  D: blocks.0 from_rgb (1x1 conv) | blocks.k: residual block halving the resolution | head: minibatch
     stddev, 3x3 conv, two linears -> one logit.

Sub-module names inside each block follow rosinality/stylegan2-pytorch's (`conv`, `noise`, `activate`,
`modulation`, `to_rgb`...), so a checkpoint in that format maps onto this one by prefixes only
(ganlib.nets.rosinality). Resampling filters ([1, 3, 3, 1] FIR) run as depthwise convolutions.

`stylegan2-tanh` (FAMILY_TANH) is the same network with a tanh on G's image, for data with a
saturated background such as digits (why: the comment above FAMILY_TANH).

Departures, each for a reason: (1) the image is clamped to [-1, 1] in eval mode only (samples and
metrics see the contract's range, D trains on the raw output as in the paper); (2) style mixing
happens only when G is asked for images alone (CDC's feature comparison uses single-latent forwards,
as the CDC code does); (3) modulation scales the activations rather than the weights (the paper's
"non-fused" form: one conv for the whole batch, the same numbers up to rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ganlib.nets import Discriminator, Generator, NetConfig, NetFamily

SIZES = (32, 64, 128, 256, 512, 1024)
MAPPING_LAYERS = 8        # depth of the mapping network at full size (paper: latent 512)
SMALL_MAPPING_LAYERS = 2  # ... for latents shorter than FULL_LATENT (stylegan2-ada's CIFAR-10 config)
FULL_LATENT = 256         # latent length from which the mapping network has the paper's depth
MAPPING_LR_MUL = 0.01     # the mapping network's learning-rate multiplier (paper)
MIXING_PROB = 0.9         # probability that a training batch mixes two latents (paper)
LEAK = 0.2                # LeakyReLU slope; activations are then scaled by sqrt(2) to keep unit variance
FIR = (1.0, 3.0, 3.0, 1.0)  # the binomial resampling filter
MBSTD_GROUP = 4           # minibatch-stddev group size (paper); smaller when the batch does not divide


def channels_at(resolution: int, width: int) -> int:
    """Channels of the G/D layers at `resolution` px: config F is width 64 (512 up to 64 px, then
    halving: 256 at 128, 128 at 256 ... 32 at 1024); `width` scales every layer."""
    return max(1, min(8 * width, 512 * width // resolution))


def fir_kernel(gain: float = 1.0) -> torch.Tensor:
    """The separable [1, 3, 3, 1] filter as a normalised 4x4 kernel times `gain`."""
    k = torch.tensor(FIR)
    k = torch.outer(k, k)
    return k / k.sum() * gain


def fir_filter(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int], up: int = 1, down: int = 1) -> torch.Tensor:
    """Upsample by zero insertion, pad (before, after) on both axes, convolve with `kernel` per channel,
    keep every `down`-th pixel. The filter is symmetric, so correlation equals convolution."""
    n, c, h, w = x.shape
    if up > 1:
        x = F.conv_transpose2d(x, x.new_ones(c, 1, 1, 1), stride=up, groups=c,
                               output_padding=up - 1)  # zero insertion: [h, w] -> [h*up, w*up]
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.to(x.dtype)[None, None].expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate; optional bias-then-leaky-ReLU (times sqrt(2))."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_dim), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale)
        out = out + self.bias * self.lr_mul
        return F.leaky_relu(out, LEAK) * math.sqrt(2) if self.activate else out


class BiasLeakyReLU(nn.Module):
    """Per-channel bias, then leaky ReLU times sqrt(2) (the reference's fused bias+activation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, *([1] * (x.dim() - 2))), LEAK) * math.sqrt(2)


class MappingNetwork(nn.Module):
    """z [N, latent] -> w [N, latent]: pixel norm, then `MAPPING_LAYERS` slow (lr x0.01) linears."""

    def __init__(self, latent_dim: int, layers: int = MAPPING_LAYERS):
        super().__init__()
        self.layers = nn.ModuleList(EqualLinear(latent_dim, latent_dim, lr_mul=MAPPING_LR_MUL, activate=True)
                                    for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = layer(x)
        return x


class ModulatedConv2d(nn.Module):
    """Conv whose input channels are scaled per sample by an affine map of w (the "style"), then,
    with `demodulate`, whose outputs are rescaled to unit expected variance. `up`: a transposed
    stride-2 conv followed by the FIR blur (as in the paper). Weight [out, in, k, k] (the reference
    stores it as [1, out, in, k, k]; 4-D lets it run channels-last)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.modulation = EqualLinear(w_dim, c_in, bias_init=1.0)  # the style affine: starts at identity scale
        self.scale, self.demodulate, self.up, self.padding = 1 / math.sqrt(c_in * kernel ** 2), demodulate, up, kernel // 2
        if up:
            self.register_buffer("blur", fir_kernel(gain=4.0), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.modulation(w)                 # [N, in]
        weight = self.weight * self.scale          # [out, in, k, k]
        x = x * style[:, :, None, None].to(x.dtype)
        if self.up:
            x = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
            x = fir_filter(x, self.blur, pad=(1, 1))
        else:
            x = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        if self.demodulate:
            # sum over (in, kh, kw) of (w * s)^2 = s^2 @ sum_k w^2, per sample and output channel
            demod = torch.rsqrt(style.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8)  # [N, out]
            x = x * demod[:, :, None, None].to(x.dtype)
        return x


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise times a learned strength (`weight`, starts at 0)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class StyledConv(nn.Module):
    """Modulated conv, noise, bias and activation at one resolution; `noise_const` is the fixed noise
    map used with `noise_mode="const"` (reproducible images, the reference's `randomize_noise=False`)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.noise = NoiseInjection()
        self.activate = BiasLeakyReLU(c_out)
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        x = self.conv(x, w)
        if noise_mode == "const":
            noise = self.noise_const.to(x.dtype)
        else:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return self.activate(self.noise(x, noise))


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to image channels, plus the upsampled skip from below."""

    def __init__(self, c_in: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("upsample", fir_kernel(gain=4.0), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + fir_filter(skip, self.upsample, pad=(2, 1), up=2)
        return out


class InputBlock(nn.Module):
    """The 4x4 block: learned constant, one styled conv, to_rgb. Uses w slots 0 (conv) and 1 (rgb)."""

    w_slots = 2

    def __init__(self, c: int, channels: int, w_dim: int):
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, c, 4, 4))
        self.conv = StyledConv(c, c, w_dim, 4)
        self.to_rgb = ToRGB(c, channels, w_dim)

    def forward(self, x, skip, ws: torch.Tensor, noise_mode: str):
        x = self.const.to(ws.dtype).repeat(ws.shape[0], 1, 1, 1)  # a copy: a view of a leaf would still "require grad" under no_grad
        x = self.conv(x, ws[:, 0], noise_mode)
        return x, self.to_rgb(x, ws[:, 1], None)


class SynthesisBlock(nn.Module):
    """Doubles the resolution: up-conv, conv, to_rgb added to the upsampled skip. Uses 3 w slots."""

    w_slots = 3

    def __init__(self, c_in: int, c_out: int, channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.conv0 = StyledConv(c_in, c_out, w_dim, resolution, up=True)
        self.conv1 = StyledConv(c_out, c_out, w_dim, resolution)
        self.to_rgb = ToRGB(c_out, channels, w_dim)

    def forward(self, x, skip, ws: torch.Tensor, noise_mode: str):
        x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, 1], noise_mode)
        return x, self.to_rgb(x, ws[:, 2], skip)


class ImageHead(nn.Module):
    """The summed RGB skip is the image; clamped to [-1, 1] only in eval mode (see the module doc).
    With `tanh` (the `stylegan2-tanh` family) the image is tanh(skip) in every mode instead."""

    def __init__(self, tanh: bool = False):
        super().__init__()
        self.tanh = tanh

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        if self.tanh:
            return torch.tanh(skip)
        return skip if self.training else skip.clamp(-1, 1)


class StyleGAN2Generator(Generator):
    """`Generator` whose blocks pass (feature map, RGB skip, per-layer w) instead of one tensor.

    `forward(z, return_features=False, noise_mode="random", return_ws=False)`; `noise_mode="const"`
    uses the stored noise maps. In training mode, and only when features are not requested, a batch
    mixes two latents with probability `mixing_prob` at a random layer (style-mixing regularisation).
    """

    def __init__(self, blocks, head, latent_dim, image_shape, mixing_prob: float = MIXING_PROB):
        super().__init__(blocks, head, latent_dim, image_shape)
        self.num_ws = sum(b.w_slots - 1 for b in self.blocks[1:]) + 1  # to_rgb shares w with the next conv
        self.mixing_prob = mixing_prob

    def _ws(self, z: torch.Tensor, mix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.blocks[0](z)
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if mix and self.mixing_prob > 0:
            # Tensor ops only (no Python randomness), so torch.compile sees one graph.
            w2 = self.blocks[0](torch.randn_like(z)).unsqueeze(1)
            cutoff = torch.randint(1, self.num_ws, (), device=z.device)
            cutoff = torch.where(torch.rand((), device=z.device) < self.mixing_prob, cutoff, self.num_ws)
            layer = torch.arange(self.num_ws, device=z.device).view(1, -1, 1)
            ws = torch.where(layer < cutoff, ws, w2)
        return w, ws

    def _synthesis_ws(self, ws: torch.Tensor, index: int) -> torch.Tensor:
        """The w slots of synthesis block `index` (1 = the 4x4 block): consecutive, to_rgb sharing the
        next block's first slot, as in the paper's w+ layout."""
        start = 0 if index == 1 else 2 * index - 3
        return ws[:, start:start + self.blocks[index].w_slots]

    def forward(self, z: torch.Tensor, return_features: bool = False, noise_mode: str = "random",
                return_ws: bool = False):
        """`return_ws=True`: (image, ws [N, num_ws, latent]), the per-layer w the image was made from
        (what path-length regularisation differentiates with respect to, ganlib.losses); a leaf that
        requires grad when the mapping network is frozen (scale_shift trains the style affines only)."""
        w, ws = self._ws(z, mix=self.training and not return_features)
        if return_ws and not ws.requires_grad:
            ws = ws.detach().requires_grad_()
        features = [w]
        x = skip = None
        for i in range(1, len(self.blocks)):
            x, skip = self.blocks[i](x, skip, self._synthesis_ws(ws, i), noise_mode)
            features.append(x)
        image = self.head(skip)
        if return_ws:
            return image, ws
        return (image, features) if return_features else image

    def features_through(self, blocks: nn.ModuleList, z: torch.Tensor) -> torch.Tensor:
        """The feature after the last of `blocks` (a prefix of `self.blocks` or a copy of one), no mixing."""
        w = blocks[0](z)
        if len(blocks) == 1:
            return w
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        x = skip = None
        for i in range(1, len(blocks)):
            x, skip = blocks[i](x, skip, self._synthesis_ws(ws, i), "random")
        return x


class ConvLayer(nn.Sequential):
    """D's conv: [FIR blur when `down`], equalised conv (stride 2 when `down`), [bias + leaky ReLU].
    Positions match the reference's, so state-dict indices line up (the blur has no saved state)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, down: bool = False, activate: bool = True):
        layers: list[nn.Module] = []
        if down:
            layers.append(Blur(pad=((4 - 2 + kernel - 1 + 1) // 2, (4 - 2 + kernel - 1) // 2)))
        layers.append(EqualConv2d(c_in, c_out, kernel, stride=2 if down else 1, padding=0 if down else kernel // 2))
        if activate:
            layers.append(BiasLeakyReLU(c_out))
        super().__init__(*layers)


class Blur(nn.Module):
    """The FIR low-pass before a stride-2 conv (anti-aliasing)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad
        self.register_buffer("kernel", fir_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fir_filter(x, self.kernel, self.pad)


class EqualConv2d(nn.Module):
    """Bias-free conv with equalised learning rate (the bias lives in the following activation)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.scale, self.stride, self.padding = 1 / math.sqrt(c_in * kernel ** 2), stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, (self.weight * self.scale).to(x.dtype), stride=self.stride, padding=self.padding)


class ResBlock(nn.Module):
    """conv3x3, down-conv3x3, plus a 1x1 down-sampled skip; the sum scaled by 1/sqrt(2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = ConvLayer(c_in, c_in, 3)
        self.conv2 = ConvLayer(c_in, c_out, 3, down=True)
        self.skip = ConvLayer(c_in, c_out, 1, down=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class DiscriminatorHead(nn.Module):
    """Minibatch stddev (one extra channel), 3x3 conv, linear + activation, linear -> logits [N]."""

    def __init__(self, c: int, c_final: int):
        super().__init__()
        self.conv = ConvLayer(c + 1, c_final, 3)
        self.fc = EqualLinear(c_final * 16, c_final, activate=True)
        self.out = EqualLinear(c_final, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = max(g for g in range(1, MBSTD_GROUP + 1) if n % g == 0)
        # std over each group of samples (sample i with i + n/group ...), averaged over features and pixels
        std = torch.sqrt(x.float().view(group, -1, c, h, w).var(0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))
        std = std.to(x.dtype).view(-1, 1, 1, 1).repeat(group, 1, h, w)
        x = self.conv(torch.cat([x, std], dim=1))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


def build(cfg: NetConfig, tanh: bool = False) -> tuple[StyleGAN2Generator, Discriminator]:
    """Build the StyleGAN2 pair with the paper's init (N(0, 1) weights, style biases 1, noise strength 0);
    `tanh`: G's image is tanh of the summed skip (FAMILY_TANH)."""
    levels = int(math.log2(cfg.size))  # 2**levels px
    ch = {2 ** r: channels_at(2 ** r, cfg.width) for r in range(2, levels + 1)}
    w_dim = cfg.latent_dim
    depth = MAPPING_LAYERS if cfg.latent_dim >= FULL_LATENT else SMALL_MAPPING_LAYERS
    g_blocks: list[nn.Module] = [MappingNetwork(cfg.latent_dim, depth), InputBlock(ch[4], cfg.channels, w_dim)]
    g_blocks += [SynthesisBlock(ch[2 ** (r - 1)], ch[2 ** r], cfg.channels, w_dim, 2 ** r) for r in range(3, levels + 1)]
    shape = (cfg.channels, cfg.size, cfg.size)
    G = StyleGAN2Generator(g_blocks, ImageHead(tanh), cfg.latent_dim, shape)

    d_blocks: list[nn.Module] = [ConvLayer(cfg.channels, ch[cfg.size], 1)]
    d_blocks += [ResBlock(ch[2 ** r], ch[2 ** (r - 1)]) for r in range(levels, 2, -1)]
    D = Discriminator(d_blocks, DiscriminatorHead(ch[4], ch[4]), shape)
    return G, D


def style_params(G: nn.Module) -> list[nn.Parameter]:
    """The style affine parameters (every modulation's weight and bias): what scale_shift adapts on
    this normalisation-free generator, the analogue of BatchNorm's scale and shift (see docs/stylegan2.md)."""
    return [p for m in G.modules() if isinstance(m, ModulatedConv2d) for p in m.modulation.parameters()]


FAMILY = NetFamily(
    name="stylegan2",
    sizes=SIZES,
    build=build,
    spatial_d_features=True,
    description="StyleGAN2 config F: mapping net, modulated convs, skip G, residual D; 32..1024 px",
    g_affine_params=style_params,
)

# The paper's G has a linear output, and D sees it unclamped. On digits, whose background is
# saturated at exactly -1, D then separates fakes by their out-of-range pixels long before their
# shapes, and a small G's FID stalls (docs/stylegan2.md, the stylegan2-small calibration). A tanh on
# the image, as DCGAN has, bounds G's output to the data's range; everything else is unchanged. Not
# for rosinality checkpoints (ganlib.nets.rosinality loads `stylegan2` only).
FAMILY_TANH = dataclasses.replace(
    FAMILY,
    name="stylegan2-tanh",
    build=functools.partial(build, tanh=True),
    description="StyleGAN2 with a tanh on G's image, for saturated-background data such as digits; 32..1024 px",
)
