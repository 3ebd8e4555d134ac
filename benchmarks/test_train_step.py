"""One D+G training step (`Trainer.step`) per network family and per strategy family, fp32 and bf16.

The cases are listed in benchmarks/cases.py; a round is STEPS_PER_ROUND[net] consecutive steps. bf16
runs under Accelerate's autocast (an Accelerator made with mixed_precision bf16). Sources for the
transfer strategies are tiny checkpoints trained once per session. Each benchmark reports images/s
and the model FLOPs of one step (matmuls and convolutions, forward and backward, counted by
torch.utils.flop_counter on a warm-up step).
"""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cases import BATCH, ROUNDS, SHAPES, STEP_CASES, STEPS_PER_ROUND
from benchmarks.timing import measure
from ganlib.config import TrainConfig


@pytest.mark.parametrize("case", STEP_CASES, ids=[c.id for c in STEP_CASES])
def test_train_step(benchmark, case, tmp_path, fresh_accelerator, source_checkpoint):
    from ganlib.train import Trainer

    size, width = SHAPES[case.net]
    cfg = TrainConfig(net=case.net, size=size, width=width, data="mnist5k", batch=BATCH, steps=10**6,
                      strategy=case.strategy, strategy_options=dict(case.options),
                      source=source_checkpoint(case.net, size, width), mixed_precision=case.precision,
                      out=str(tmp_path), progress=False)
    trainer = Trainer(cfg, fresh_accelerator(case.precision))
    steps = iter(range(10**6))
    with FlopCounterMode(display=False) as counter:  # also a warm-up step
        trainer.step(next(steps))
    flops = counter.get_total_flops()
    per_round = STEPS_PER_ROUND[case.net]

    def train_steps() -> None:
        for _ in range(per_round):
            trainer.step(next(steps))

    median = measure(benchmark, train_steps, images_per_call=BATCH * per_round, rounds=ROUNDS[case.net],
                     net=case.net, size=size, width=width, batch=BATCH, steps_per_round=per_round,
                     strategy=case.strategy, strategy_options=dict(case.options), precision=case.precision)
    benchmark.extra_info.update({"flops_per_step": flops, "achieved_tflops": flops * per_round / median / 1e12})
