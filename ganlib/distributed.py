"""Distributed and device concerns in one place: the Accelerator, gathers, a clean shutdown."""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DynamoBackend, InitProcessGroupKwargs, broadcast_object_list

from ganlib.cache import use_compile_cache
from ganlib.errors import UserError


TIMEOUT_ENV = "GANBENCH_COLLECTIVE_TIMEOUT_S"  # seconds a collective waits for a peer before it raises


def collective_timeout(default_s: float | None = None) -> float | None:
    """Seconds a collective may wait: $GANBENCH_COLLECTIVE_TIMEOUT_S, else `default_s` (None: torch's 30 min)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def make_accelerator(mixed_precision: str = "", compile: bool = False,
                     timeout_s: float | None = None) -> Accelerator:
    """An Accelerator for this process; precision from the argument or from `accelerate launch`.

    compile: have `prepare` torch.compile the networks (inductor); False leaves it to the launch
    config (a setup's `dynamo_config`). fp16 on a CPU is refused: the numbers would lie.
    timeout_s: how long a collective waits for a peer (a rank that failed alone leaves the others
    waiting); $GANBENCH_COLLECTIVE_TIMEOUT_S overrides it; None keeps torch's 30 minutes.
    """
    timeout_s = collective_timeout(timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))] if timeout_s else []
    accelerator = Accelerator(mixed_precision=mixed_precision or None, dynamo_backend="inductor" if compile else None,
                              kwargs_handlers=handlers)
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


_EXCHANGES = [0]  # exchanges so far in this process (the same count on every rank: each key is used once)


def exchange_objects(accelerator: Accelerator, obj: Any, timeout_s: float) -> list[Any]:
    """Every process's JSON-able `obj`, in rank order (None for a rank that gave none within `timeout_s`).

    Goes through the process group's key-value store, not a collective: a rank that failed alone
    has skipped collectives its peers are blocked in, so the collectives no longer line up. Each
    process writes its key and waits for the others' (a peer stuck in a collective arrives once
    that collective times out). Call it on every process, the same number of times.
    """
    if accelerator.num_processes == 1:
        return [obj]
    store = dist.distributed_c10d._get_default_store()
    _EXCHANGES[0] += 1
    prefix = f"ganbench/exchange/{_EXCHANGES[0]}/"
    store.set(prefix + str(accelerator.process_index), json.dumps(obj))
    values: list[Any] = []
    deadline = time.monotonic() + timeout_s
    for rank in range(accelerator.num_processes):
        left = datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))
        try:
            store.wait([prefix + str(rank)], left)
            values.append(json.loads(store.get(prefix + str(rank))))
        except (RuntimeError, dist.DistStoreError):  # the store's timeout: that rank never reported
            values.append(None)
    return values


def regroup(accelerator: Accelerator, timeout_s: float | None) -> None:
    """Replace the default process group with a fresh one (same ranks and backend); every process.

    After one rank failed alone, its peers' collectives timed out mid-sequence and the old group's
    sequence numbers disagree between ranks: the next collective would hang or fail. The new group
    rendezvouses under a fresh prefix of the same store.
    """
    if accelerator.num_processes == 1:
        return
    backend, store = dist.get_backend(), dist.distributed_c10d._get_default_store()
    _EXCHANGES[0] += 1
    dist.destroy_process_group()
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, store=dist.PrefixStore(f"ganbench/regroup/{_EXCHANGES[0]}/", store),
                            rank=accelerator.process_index, world_size=accelerator.num_processes, **kwargs)


def shutdown(accelerator: Accelerator) -> None:
    """Leave the process group cleanly (gloo can abort at interpreter exit otherwise)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
