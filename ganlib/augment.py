"""Differentiable augmentations applied to every image D sees (real and fake), by name.

The few-shot remedy for an over-fitting discriminator: D never sees an un-augmented image, and G's
gradient flows back through the augmentation of its fakes, so the augmentation does not leak into
the generated distribution as long as it is invertible in distribution (Zhao et al. 2020,
Karras et al. 2020). Registered here:

* `none`: the identity.
* `diffaugment`: DiffAugment's `color,translation,cutout` policy (Zhao et al. 2020), every op on
  every image with its own random parameters, real and fake alike.
* `ada`: a differentiable subset of ADA's pipeline (Karras et al. 2020): xflip, integer translation
  with reflection, brightness, contrast, saturation, each applied per image with probability `p`;
  `p` follows the over-fitting heuristic r_t = E[sign(D(real))] toward `target`.

Random parameters come from a per-process generator (`Trainer` seeds it from the run seed and the
rank, and checkpoints it): each process augments its own images, as each draws its own data and
latents; what every process must agree on (the policy, ADA's `p`) is identical on all of them.
Images are [N, C, H, W] floats in [-1, 1]; outputs keep the input's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ganlib.errors import UserError
from ganlib.options import typed_options
from ganlib.registry import Registry

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (identity on one process)


@dataclass
class AugmentOptions:
    """Base class of each augmentation's options (fields documented where defined)."""


class Augment:
    """The identity: D sees the images as they are."""

    name: ClassVar[str] = "none"
    OptionsType: ClassVar[type[AugmentOptions]] = AugmentOptions
    description: ClassVar[str] = "no augmentation"

    def __init__(self, options: AugmentOptions):
        self.options = options

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "Augment":
        """Build from option values (YAML or `--augment-opt name=value`); UserError on bad ones."""
        augment = cls(typed_options("augment", cls.name, cls.OptionsType, options))
        augment.validate()
        return augment

    def validate(self) -> None:
        """Check option values (UserError on bad ones)."""

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def to(self, device: torch.device) -> "Augment":
        """Move any state to the training device (before the first step)."""
        return self

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`images` as D should see them; differentiable with respect to `images`."""
        return images

    def observe(self, real_logits: torch.Tensor) -> None:
        """Record D's logits on this step's (augmented) reals; no host sync."""

    def end_step(self, step: int, reduce_sum: Reduce) -> None:
        """After step `step` (0-based); every process calls it, in step."""

    def logs(self) -> dict[str, torch.Tensor]:
        """Device scalars to log with the losses (namespaced `aug/...`)."""
        return {}

    def state_dict(self, reduce_sum: Reduce) -> dict[str, float]:
        """State a resumed run needs, summed over processes where it is per process; all processes call it."""
        return {}

    def load_state_dict(self, state: dict[str, float], is_main: bool) -> None:
        """Restore `state_dict`'s output (per-process sums go to the main process only)."""


# --- DiffAugment ----------------------------------------------------------------------------------

@dataclass
class DiffAugmentOptions(AugmentOptions):
    translation: float = 0.125  # max shift as a fraction of the image side (DiffAugment's ratio)
    cutout: float = 0.5         # side of the zeroed square as a fraction of the image side


class DiffAugment(Augment):
    """`color,translation,cutout`: brightness, saturation, contrast, then shift, then cutout.

    As the official code: every image gets its own random parameters and every op is always on;
    brightness adds U(-0.5, 0.5), saturation scales the deviation from the channel mean by U(0, 2),
    contrast the deviation from the image mean by U(0.5, 1.5); translation shifts by a whole number
    of pixels up to `translation` of the side, filling with 0; cutout zeroes a square of side
    `cutout`, centred anywhere in the image (clipped at the border).
    """

    name = "diffaugment"
    OptionsType = DiffAugmentOptions
    description = "DiffAugment color,translation,cutout (Zhao et al. 2020)"

    def validate(self) -> None:
        o = self.options
        if not (0 <= o.translation < 1 and 0 <= o.cutout < 1):
            raise UserError(f"diffaugment translation={o.translation} and cutout={o.cutout} must be in [0, 1)")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images
        n = x.shape[0]
        x = x + (_uniform(n, generator, x) - 0.5)                                     # brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_uniform(n, generator, x) * 2) + mean                      # saturation
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (_uniform(n, generator, x) + 0.5) + mean                    # contrast
        h, w = x.shape[-2:]
        sy, sx = int(h * self.options.translation + 0.5), int(w * self.options.translation + 0.5)
        dy = torch.randint(-sy, sy + 1, (n,), generator=generator, device=x.device)
        dx = torch.randint(-sx, sx + 1, (n,), generator=generator, device=x.device)
        x = _shift(x, dy, dx, reflect=False)
        ch, cw = int(h * self.options.cutout + 0.5), int(w * self.options.cutout + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (n,), generator=generator, device=x.device) - ch // 2
        cx = torch.randint(0, w + (1 - cw % 2), (n,), generator=generator, device=x.device) - cw // 2
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        hole = ((rows >= cy.view(n, 1, 1)) & (rows < (cy + ch).view(n, 1, 1)) &
                (cols >= cx.view(n, 1, 1)) & (cols < (cx + cw).view(n, 1, 1)))
        return x * (~hole).unsqueeze(1).to(x.dtype)


# --- ADA ------------------------------------------------------------------------------------------

@dataclass
class ADAOptions(AugmentOptions):
    target: float = 0.6       # r_t = E[sign(D(real))] that p steers toward (ADA's ada_target)
    interval: int = 4         # steps between adjustments of p (ADA's ada_interval)
    ramp_kimg: float = 10.0   # thousands of real images over which p can go 0 -> 1 (ADA: 500, for 25M-image runs)
    p_init: float = 0.0       # probability at step 0
    translation: float = 0.125  # max integer shift as a fraction of the side (ADA's xint_max)
    brightness: float = 0.2   # std of the added brightness (ADA's brightness_std)
    contrast: float = 0.5     # std of log2 of the contrast factor (ADA's contrast_std)
    saturation: float = 1.0   # std of log2 of the saturation factor, RGB only (ADA's saturation_std)


class ADA(Augment):
    """xflip, integer translation (reflect), brightness, contrast, saturation, each with probability p.

    The differentiable subset of ADA's `bgc` pipeline that needs no resampling filter: the
    fractional geometry (scale, rotation, anisotropy, fractional shift), rotate90, luma flip and
    hue are left out. Colour ops act around 0, mid-grey in [-1, 1], as ADA's colour matrix does.
    Every `interval` steps p moves by sign(r_t - target) * images / (ramp_kimg * 1000), where
    images counts the reals seen in the interval on all processes and r_t is their mean logit
    sign, both summed over processes, so p is the same everywhere.
    """

    name = "ada"
    OptionsType = ADAOptions
    description = "adaptive augmentation toward r_t = target (Karras et al. 2020), differentiable subset"

    def __init__(self, options: ADAOptions):
        super().__init__(options)
        self.p = torch.tensor(float(options.p_init))
        self._stats = torch.zeros(3)  # sum of logit signs, number of logits, number of images

    def validate(self) -> None:
        o = self.options
        if not (0 < o.target < 1 and o.interval >= 1 and o.ramp_kimg > 0 and 0 <= o.p_init <= 1
                and 0 <= o.translation < 0.5 and min(o.brightness, o.contrast, o.saturation) >= 0):
            raise UserError(f"ada needs 0 < target < 1, interval >= 1, ramp_kimg > 0, 0 <= p_init <= 1, "
                            f"0 <= translation < 0.5 and non-negative stds; got {self.options_dict()}")

    def to(self, device: torch.device) -> "ADA":
        self.p, self._stats = self.p.to(device), self._stats.to(device)
        return self

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o, x = self.options, images
        n, c, h, w = x.shape

        def on() -> torch.Tensor:  # per image: does this op apply (probability p)?
            return (torch.rand(n, generator=generator, device=x.device) < self.p).view(n, 1, 1, 1)

        flip = on() & (torch.rand(n, 1, 1, 1, generator=generator, device=x.device) < 0.5)
        x = torch.where(flip, x.flip(-1), x)
        use = on().view(n)
        sy, sx = round(h * o.translation), round(w * o.translation)
        dy = torch.randint(-sy, sy + 1, (n,), generator=generator, device=x.device) * use
        dx = torch.randint(-sx, sx + 1, (n,), generator=generator, device=x.device) * use
        x = _shift(x, dy, dx, reflect=True)
        x = x + torch.where(on(), _normal(n, generator, x) * o.brightness, 0)
        x = x * torch.where(on(), torch.exp2(_normal(n, generator, x) * o.contrast), 1)
        if c == 3:
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * torch.where(on(), torch.exp2(_normal(n, generator, x) * o.saturation), 1) + mean
        return x

    def observe(self, real_logits: torch.Tensor) -> None:
        logits = real_logits.detach().float()
        self._stats = self._stats + torch.stack([logits.sign().sum(), torch.tensor(float(logits.numel()),
                                                 device=logits.device), torch.tensor(float(logits.shape[0]),
                                                 device=logits.device)])

    def end_step(self, step: int, reduce_sum: Reduce) -> None:
        if (step + 1) % self.options.interval:
            return
        stats = reduce_sum(self._stats)
        r_t = stats[0] / stats[1].clamp(min=1)
        delta = torch.sign(r_t - self.options.target) * stats[2] / (self.options.ramp_kimg * 1000)
        self.p = (self.p + delta).clamp(0.0, 1.0)
        self._stats = torch.zeros_like(self._stats)

    def logs(self) -> dict[str, torch.Tensor]:
        return {"aug/p": self.p}

    def state_dict(self, reduce_sum: Reduce) -> dict[str, float]:
        stats = reduce_sum(self._stats).tolist()
        return {"p": float(self.p), "sign_sum": stats[0], "logits": stats[1], "images": stats[2]}

    def load_state_dict(self, state: dict[str, float], is_main: bool) -> None:
        self.p = torch.tensor(state["p"], device=self.p.device)
        sums = [state["sign_sum"], state["logits"], state["images"]] if is_main else [0.0, 0.0, 0.0]
        self._stats = torch.tensor(sums, device=self._stats.device)


# --- shared pieces --------------------------------------------------------------------------------

def _uniform(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=generator, device=like.device).to(like.dtype)


def _normal(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, generator=generator, device=like.device).to(like.dtype)


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, reflect: bool) -> torch.Tensor:
    """out[i, :, r, c] = x[i, :, r + dy_i, c + dx_i]; outside the image 0, or the mirrored pixel."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy.view(n, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx.view(n, 1, 1)
    if reflect:  # shifts are under half the side, so one reflection reaches every index
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1), cols.clamp(0, w - 1)].permute(0, 3, 1, 2)
    return out if reflect else out * inside.unsqueeze(1).to(x.dtype)


AUGMENTS: Registry[type[Augment]] = Registry("augment")
for _cls in (Augment, DiffAugment, ADA):
    AUGMENTS.register(_cls.name, _cls)


def build_augment(name: str, options: dict[str, Any] | None = None) -> Augment:
    """Look an augmentation up by name and build it from option values (UserError on bad ones)."""
    return AUGMENTS.get(name).from_options(options)
