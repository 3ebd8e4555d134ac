"""The small interface through which a transfer strategy steers the one training loop.

A strategy never forks the loop. It decides (1) which parameters are trainable at all (permanent
freezing happens before optimisers and DDP are built, so frozen tensors get no optimiser state and
no gradient all-reduce), (2) per step, which phases run (D step, G step), whether G's own body
trains in the G step and whether G's BatchNorm uses the source statistics, (3) how latents are
mapped before G (MineGAN's miner), (4) how D scores images (CDC's patch-level head) and (5) extra
G loss terms, logged as `loss/G/<name>`.

Extra modules (MineGAN's miner, CDC's patch head) are declared by the strategy in `setup`; from
then on the loop owns them: it trains, prepares (Accelerate) and saves them, and hands the prepared
ones, by name, to every hook that runs them (`extras`). A hook runs only those: under DDP the
modules as declared would skip the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ganlib.options import typed_options


@dataclass(frozen=True)
class StepPlan:
    """What runs in one training step."""

    train_d: bool = True  # run the D phase
    train_g: bool = True  # run the G phase
    g_body: bool = True   # in the G phase, G's own weights train (False: only G-side extras, e.g. a miner)
    g_source_stats: bool = False  # G's BatchNorm layers normalise with the running (source) statistics and
                                  # leave them as they are, as in eval mode (ganlib.train.source_norm_stats)


@dataclass
class SetupContext:
    """What a strategy may use while it sets itself up (before optimisers and DDP exist)."""

    G: nn.Module
    D: nn.Module
    family: Any                  # ganlib.nets.NetFamily
    loss: Any                    # ganlib.losses.GANLoss
    device: torch.device
    seed: int
    total_steps: int
    batch_size: int
    num_images: int = 0          # training images on this process (the target set); 0 = unknown


@dataclass
class GStepContext:
    """What the G phase hands to `g_extra_losses`."""

    step: int
    z: torch.Tensor                                  # latents fed to G (after `map_latent`)
    fake: torch.Tensor                               # G(z), float in [-1, 1]
    g_features: list[torch.Tensor] | None = None     # per-block activations when `wants_g_features`
    G: nn.Module | None = None                       # the (possibly DDP-wrapped) generator
    extras: Mapping[str, nn.Module] = field(default_factory=dict)  # the prepared extra modules, by name


@dataclass
class Options:
    """Base class of each strategy's options dataclass (fields documented where defined)."""


class Strategy:
    """Base strategy: everything trains, every step runs both phases, no extra loss (= finetune)."""

    name: ClassVar[str] = "base"
    loads_source: ClassVar[bool] = True
    wants_g_features: ClassVar[bool] = False
    OptionsType: ClassVar[type[Options]] = Options
    paper: ClassVar[str] = ""

    def __init__(self, options: Options):
        self.options = options
        # Declared in `setup`, read by the loop, never run by the hooks (they get the prepared ones).
        self.extra_g_modules: dict[str, nn.Module] = {}  # trained by G's optimiser, saved as <name>.safetensors
        self.extra_d_modules: dict[str, nn.Module] = {}  # trained by D's optimiser, saved likewise
        self._total_steps = 0

    # -- configuration time ------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "Strategy":
        """Build from a dict of option values; unknown options or bad values are a UserError."""
        strategy = cls(typed_options("strategy", cls.name, cls.OptionsType, options))
        strategy.validate()
        return strategy

    def validate(self) -> None:
        """Check option values that need no network (UserError on bad ones)."""

    def check(self, family, G: nn.Module, D: nn.Module) -> None:
        """Check the strategy fits this network (UserError otherwise); called before any training."""

    def setup(self, ctx: SetupContext) -> None:
        """Freeze parameters and declare extra modules; source weights are already loaded."""
        self._total_steps = ctx.total_steps

    def options_dict(self) -> dict[str, Any]:
        """Every option with its value, defaults included (for records and logs)."""
        return dataclasses.asdict(self.options)

    # -- every step ----------------------------------------------------------------------------
    def plan(self, step: int) -> StepPlan:
        """Which phases run at `step` (0-based) and whether G's own weights train in the G phase."""
        return StepPlan()

    def map_latent(self, z: torch.Tensor, step: int | None, extras: Mapping[str, nn.Module]) -> torch.Tensor:
        """Latents G receives for `z` at `step` (None: evaluation and sample grids); `extras`: the
        prepared extra modules."""
        return z

    def discriminate(self, D: nn.Module, images: torch.Tensor, step: int,
                     extras: Mapping[str, nn.Module]) -> torch.Tensor:
        """D's logits for `images` (shape [N] or [N, P] for patch-level scores); D and `extras` as prepared."""
        return D(images)

    def g_extra_losses(self, ctx: GStepContext) -> dict[str, torch.Tensor]:
        """Extra scalar G losses, already weighted, by short name (logged as `loss/G/<name>`)."""
        return {}


def freeze(module: nn.Module, prefixes: tuple[str, ...] | None = None) -> None:
    """Permanently freeze `module`'s parameters, or only those whose names start with a prefix."""
    for name, p in module.named_parameters():
        if prefixes is None or name.startswith(prefixes):
            p.requires_grad_(False)
