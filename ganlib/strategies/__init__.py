"""Transfer strategies by name: each is a small class steering the one training loop."""

from __future__ import annotations

from typing import Any

from ganlib.registry import Registry
from ganlib.strategies.base import GStepContext, Options, SetupContext, StepPlan, Strategy
from ganlib.strategies.regularized import CDC, EWC, MineGAN
from ganlib.strategies.simple import Finetune, FreezeD, ScaleShift, Scratch, TwoPhase

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _cls in (Scratch, Finetune, FreezeD, TwoPhase, ScaleShift, EWC, MineGAN, CDC):
    STRATEGIES.register(_cls.name, _cls)


def build_strategy(name: str, options: dict[str, Any] | None = None) -> Strategy:
    """Look a strategy up by name and build it from option values (UserError on bad ones)."""
    return STRATEGIES.get(name).from_options(options)


__all__ = ["STRATEGIES", "build_strategy", "Strategy", "StepPlan", "SetupContext", "GStepContext", "Options"]
