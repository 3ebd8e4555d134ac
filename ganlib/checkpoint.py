"""Checkpoints without pickle: weights in safetensors, optimiser state loadable with weights_only.

Layout of one checkpoint directory (assembled in a temporary sibling, then renamed into place, so
a killed run never leaves a half-written checkpoint):
    generator.safetensors, discriminator.safetensors, <extra>.safetensors   model state dicts
    optim.pt                   {name: optimizer.state_dict()}, fp16's GradScaler too (weights_only load)
    rng-rank{i}.safetensors    every random state of process i (CPU, CUDA, data, latents)
    meta.json                  step, fingerprint, config, processes, precision, progress (written last)
While the new directory replaces the old one, the old one waits as a hidden `.<name>.old` sibling;
`find_checkpoint` resumes from it if the run was killed in that instant.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ganlib.errors import UserError

META = "meta.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and os.replace (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(path: Path, module: torch.nn.Module) -> None:
    """Save a module's state dict (parameters and buffers) as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_weights(path: Path, module: torch.nn.Module, what: str = "weights") -> None:
    """Load safetensors weights into `module`; a corrupt or mismatched file is a UserError."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{what} file {path} is unreadable or corrupt ({err}); delete it and rerun") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected {unexpected[:3]}") \
            or f"shape mismatch at {wrong[:3]}"
        raise UserError(f"{what} file {path} does not match this network ({detail}); "
                        "use a checkpoint made with the same --net/--size/--width/channels")
    module.load_state_dict(state)


def rng_state(extra_generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """Collect every random state this process uses into tensors (for a bitwise resume)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    for name, gen in extra_generators.items():
        state[f"gen/{name}"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], extra_generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state` collected (the generators must be the same ones, by name)."""
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    for name, gen in extra_generators.items():
        gen.set_state(state[f"gen/{name}"])


def begin_checkpoint(ckpt_dir: Path) -> Path:
    """Main process: create an empty temporary sibling of `ckpt_dir` for the pieces to land in."""
    tmp = Path(ckpt_dir).with_name(f".{Path(ckpt_dir).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int, state: dict[str, torch.Tensor]) -> None:
    """Every process: write its own random state into the checkpoint being assembled."""
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(Path(tmp) / f"rng-rank{rank}.safetensors"))


def finish_checkpoint(tmp: Path, ckpt_dir: Path, *, step: int, meta: dict,
                      modules: dict[str, torch.nn.Module], optimizers: dict) -> None:
    """Main process, after every rank wrote its RNG: add weights and optimisers, then rename into place.

    `optimizers` maps names to anything with state_dict() of plain tensors and numbers (optimisers,
    a GradScaler); `meta` is JSON, stored in meta.json with `step`.
    """
    for name, module in modules.items():
        save_weights(tmp / f"{name}.safetensors", module)
    torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optim.pt")
    atomic_write_text(tmp / META, json.dumps({**meta, "step": step}, indent=1, sort_keys=True))
    # At every instant `ckpt_dir` or `old` holds a complete checkpoint (find_checkpoint looks at both):
    # a stale `old` is removed only while `ckpt_dir` exists, the live `old` only once `tmp` is in place.
    old = Path(ckpt_dir).with_name(f".{Path(ckpt_dir).name}.old")
    if Path(ckpt_dir).exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint to resume from: `ckpt_dir`, else the previous one that
    `finish_checkpoint` had set aside when the run was killed mid-swap, else None. Writes nothing."""
    for candidate in (Path(ckpt_dir), Path(ckpt_dir).with_name(f".{Path(ckpt_dir).name}.old")):
        if (candidate / META).exists():
            return candidate
    return None


def read_meta(ckpt_dir: Path) -> dict:
    """Read a checkpoint's meta.json; absent or broken -> UserError."""
    try:
        return json.loads((Path(ckpt_dir) / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {ckpt_dir} is incomplete or corrupt ({err.__class__.__name__}); "
                        "delete it or start without --resume") from None


def load_optimizers(ckpt_dir: Path, optimizers: dict) -> None:
    """Restore optimiser states saved by finish_checkpoint (weights_only: no arbitrary unpickling)."""
    try:
        states = torch.load(Path(ckpt_dir) / "optim.pt", map_location="cpu", weights_only=True)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
    except Exception as err:  # torch raises several types for corrupt or mismatched files
        raise UserError(f"optimiser state in {ckpt_dir} is unreadable or does not match this run "
                        f"({err.__class__.__name__}); delete the checkpoint or start without --resume") from None


def load_rng(ckpt_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    """Process `rank`'s random state from a checkpoint (UserError when absent or corrupt)."""
    path = Path(ckpt_dir) / f"rng-rank{rank}.safetensors"
    if not path.exists():
        raise UserError(f"checkpoint {ckpt_dir} has no random state for process {rank}; "
                        "resume with the same number of processes it was written with")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"random state file {path} is unreadable or corrupt ({err}); "
                        "delete the checkpoint or start without --resume") from None
