"""The environment block every record carries: versions, devices, commit, host."""

from __future__ import annotations

import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the ganbench checkout this code runs from (None when not a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(accelerator) -> dict:
    """Versions and devices of this process group (call on any process; cheap)."""
    device = accelerator.device
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(device)] * accelerator.num_processes
    else:
        names = [_cpu_name()] * accelerator.num_processes
    return {
        **_versions(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "devices": names,
        "device_count": accelerator.num_processes,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "mixed_precision": accelerator.mixed_precision,
    }


def host_environment() -> dict:
    """Versions and the devices this machine has, for records of cells that never ran here (skipped).

    No process group exists, so there is no precision or process count: those are None. GPUs are
    counted, not named: naming them would create a CUDA context in `bench run`, holding GPU memory
    for the whole matrix.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        **_versions(),
        "cuda": torch.version.cuda if gpus else None,
        "devices": [f"cuda:{i}" for i in range(gpus)] or [_cpu_name()],
        "device_count": gpus or 1,
        "num_processes": None,
        "distributed_type": None,
        "mixed_precision": None,
    }


def _versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "accelerate": _version("accelerate"),
        "torch_fidelity": _version("torch-fidelity"),
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
    }
