"""Distributed and device concerns in one place: the Accelerator, gathers, a clean shutdown."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DynamoBackend, broadcast_object_list

from ganlib.cache import use_compile_cache
from ganlib.errors import UserError


def make_accelerator(mixed_precision: str = "", compile: bool = False) -> Accelerator:
    """An Accelerator for this process; precision from the argument or from `accelerate launch`.

    compile: have `prepare` torch.compile the networks (inductor); False leaves it to the launch
    config (a setup's `dynamo_config`). fp16 on a CPU is refused: the numbers would lie.
    """
    accelerator = Accelerator(mixed_precision=mixed_precision or None, dynamo_backend="inductor" if compile else None)
    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:  # compiling: keep the kernels for reruns
        use_compile_cache()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("fp16 mixed precision needs a GPU (on a CPU Accelerate would silently run fp32); "
                        "use bf16 or no on CPU")
    return accelerator


def unwrap(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers, so that its state_dict keys are the
    network's own (a compiled module's carry an `_orig_mod.` prefix that no source loader expects)."""
    return accelerator.unwrap_model(module, keep_torch_compile=False)


def gather_floats(accelerator: Accelerator, value: float) -> list[float]:
    """One float from every process, in rank order, on every process."""
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return accelerator.gather(t).cpu().tolist()


def broadcast_buffers(accelerator: Accelerator, modules: list[torch.nn.Module]) -> None:
    """Copy process 0's buffers (BatchNorm running statistics) to every process, in place.

    DDP keeps parameters identical, but each process updates running statistics from its own batch
    after DDP's broadcast at the start of a forward, so they differ between forwards. Call it, on
    every process, before anything reads them: checkpoints, evaluation, the final weights. Training
    in train mode never reads them, so this does not change the parameters' trajectory.
    """
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for buffer in unwrap(accelerator, module).buffers():
            dist.broadcast(buffer.data, src=0)


def broadcast_object(accelerator: Accelerator, obj: Any) -> Any:
    """The main process's `obj` on every process (picklable Python objects, from our own processes)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def shutdown(accelerator: Accelerator) -> None:
    """Leave the process group cleanly (gloo can abort at interpreter exit otherwise)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
