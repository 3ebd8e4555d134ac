"""Strategies defined purely by what trains when: scratch, finetune, freeze_d, two_phase, scale_shift."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ganlib.errors import UserError
from ganlib.strategies.base import Options, SetupContext, StepPlan, Strategy, freeze


class Scratch(Strategy):
    """G and D from random init on the target: the baseline every transfer must beat."""

    name = "scratch"
    loads_source = False
    paper = "baseline"


class Finetune(Strategy):
    """All of G and D from the source weights (TransferGAN, Wang et al. 2018)."""

    name = "finetune"
    paper = "TransferGAN, Wang et al. 2018"


@dataclass
class FreezeDOptions(Options):
    layers: int = 1  # how many D blocks, from the input side, stay frozen (FreezeD freezes the lower layers);
                     # 1: our D's have only 3-4 blocks; one keeps the low-level filters, 2-3 adapt (docs)


class FreezeD(Strategy):
    """All of G; D except its first k blocks (FreezeD, Mo et al. 2020)."""

    name = "freeze_d"
    OptionsType = FreezeDOptions
    paper = "FreezeD, Mo et al. 2020"

    def validate(self) -> None:
        if self.options.layers < 1:
            raise UserError(f"freeze_d layers={self.options.layers} must be >= 1")

    def check(self, family, G: nn.Module, D: nn.Module) -> None:
        n = len(D.blocks)
        if self.options.layers >= n:
            raise UserError(f"freeze_d layers={self.options.layers} but {family.name} D has {n} blocks; "
                            f"use layers between 1 and {n - 1}")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        freeze(ctx.D, tuple(f"blocks.{i}." for i in range(self.options.layers)))


@dataclass
class TwoPhaseOptions(Options):
    split: float = 0.5  # fraction of the transfer steps in phase 1 (D only); the rest is phase 2 (G only)


class TwoPhase(Strategy):
    """Phase 1: D adapts to the target with G frozen; phase 2: G trains against the frozen D."""

    name = "two_phase"
    OptionsType = TwoPhaseOptions
    paper = "baseline: D adapts first, then G against the fixed D (no single paper)"

    def validate(self) -> None:
        if not 0.0 < self.options.split < 1.0:
            raise UserError(f"two_phase split={self.options.split} must be strictly between 0 and 1")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        if ctx.total_steps < 2:
            raise UserError(f"two_phase needs steps >= 2 (one per phase), got steps={ctx.total_steps}")

    def boundary(self) -> int:
        """First step of phase 2 (0-based): round(split * steps), kept inside [1, steps - 1]."""
        return max(1, min(self._total_steps - 1, round(self.options.split * self._total_steps)))

    def plan(self, step: int) -> StepPlan:
        if step < self.boundary():
            return StepPlan(train_d=True, train_g=False)
        return StepPlan(train_d=False, train_g=True)


class ScaleShift(Strategy):
    """In G only the affine scale/shift of normalisation layers; all of D (Noguchi & Harada 2019).

    G's BatchNorm layers keep normalising with the source running statistics and never update them
    (as the official code, which adapts only scale and shift); so every G tensor but the affines,
    buffers included, stays bitwise the source's.
    """

    name = "scale_shift"
    paper = "batch statistics adaptation, Noguchi & Harada 2019 (trained adversarially here, see docs)"

    def check(self, family, G: nn.Module, D: nn.Module) -> None:
        if not _adapted_params(family, G):
            raise UserError(f"scale_shift needs a generator with affine normalisation layers; {family.name} has none")

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        keep = {id(p) for p in _adapted_params(ctx.family, ctx.G)}
        for p in ctx.G.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)

    def plan(self, step: int) -> StepPlan:
        return StepPlan(g_source_stats=True)


_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm)


def _adapted_params(family, G: nn.Module) -> list[nn.Parameter]:
    """What scale_shift trains in G: the family's stand-in for normalisation affines when it names one
    (StyleGAN2's style affines, see docs/stylegan2.md), else G's affine normalisation layers."""
    return family.g_affine_params(G) if family.g_affine_params is not None else _norm_affine_params(G)


def _norm_affine_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for m in module.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)]
