"""What the suite measures: network shapes, the batch, and the training-step cases (one list)."""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH = 32                                                          # images per training step, every case
SHAPES = {"mlp": (28, 64), "dcgan": (28, 16), "resnet": (32, 16)}  # net -> (image side px, width)
STEPS_PER_ROUND = {"mlp": 4, "dcgan": 2, "resnet": 1}              # a round is >= ~20 ms of CPU: steadier ratios
ROUNDS = {"mlp": 60, "dcgan": 60, "resnet": 30}                     # timed rounds per case: ~1.5-4 s of CPU each
SAMPLE_BATCH = 64                                                   # latents per G call when sampling
SAMPLE_CALLS = 4                                                    # G calls per sampling round


@dataclass(frozen=True)
class StepCase:
    """One training-step benchmark: a network trained by a strategy in a precision."""

    net: str
    strategy: str = "finetune"
    precision: str = "no"                        # Accelerate mixed_precision: no | bf16
    options: dict = field(default_factory=dict)  # strategy options

    @property
    def id(self) -> str:
        """`dcgan28-finetune-fp32`: the benchmark's parameter id (and the gate's row name)."""
        size = SHAPES[self.net][0]
        return f"{self.net}{size}-{self.strategy}-{'fp32' if self.precision == 'no' else self.precision}"


# Network families with plain finetune in both precisions; strategy families on dcgan in fp32:
# frozen layers, a regulariser, an extra G-side module (MineGAN stage 2: miner, G and D all train),
# an extra D-side module with a feature loss.
STEP_CASES = [
    *(StepCase(net, precision=precision) for net in SHAPES for precision in ("no", "bf16")),
    StepCase("dcgan", "freeze_d", options={"layers": 2}),
    StepCase("dcgan", "ewc"),
    StepCase("dcgan", "minegan", options={"stage1_steps": 0}),
    StepCase("dcgan", "cdc"),
]
