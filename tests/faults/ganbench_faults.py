"""Failures injected into `bench run`'s cells at run time, for the tests only (never in bench/).

GANBENCH_FAULT="<cell-id glob>=<kind>[@rank][;...]" makes the matching cells fail on every process
(or on process `rank` alone): `nan` trains with learning rates of 1e30 (weights and losses
overflow), `option` passes a strategy option that does not exist, `oom` raises a CUDA
OutOfMemoryError, `kill` SIGKILLs the process mid-cell (a worker that dies).

The cells run in worker processes that `bench run` launches, where a test cannot monkeypatch:
sitecustomize.py beside this file (tests/conftest.py puts the folder on PYTHONPATH) arms the
wrapper in every Python process started with GANBENCH_FAULT set; conftest arms it in the test
process too. Armed, it wraps `bench.cell._run` (one cell's work, inside run_cell's failure
handling) as soon as bench.cell is imported.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.abc
import os
import signal
import sys

FAULT_ENV = "GANBENCH_FAULT"
FAULTS = ("nan", "option", "oom", "kill")
_MODULE = "bench.cell"


def fault_for(cell_id: str, rank: int) -> str | None:
    """The failure GANBENCH_FAULT injects into `cell_id` on process `rank` (first matching
    `glob=kind` or `glob=kind@rank`; without @rank on every process), or None."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        pattern, _, kind = spec.partition("=")
        kind, _, only_rank = kind.partition("@")
        if kind not in FAULTS or (only_rank and not only_rank.isdigit()):
            raise ValueError(f"{FAULT_ENV}={spec!r}: the kind must be one of {', '.join(FAULTS)}, "
                             "optionally followed by @<rank>")
        if fnmatch.fnmatchcase(cell_id, pattern) and (not only_rank or int(only_rank) == rank):
            return kind
    return None


class _Skewed:
    """The cell's matrix, except that its transfer config carries the fault (the source's does not)."""

    def __init__(self, matrix, fault: str):
        self._matrix, self._fault = matrix, fault

    def __getattr__(self, name):
        return getattr(self._matrix, name)

    def train_config(self, cell, **overrides):
        if self._fault == "nan":
            overrides["lr_d"] = overrides["lr_g"] = 1e30  # Adam steps of 1e30: weights and losses overflow
        if self._fault == "option":
            overrides["strategy_options"] = {**overrides.get("strategy_options", cell.strategy.options),
                                             "no_such_option": 1}
        return self._matrix.train_config(cell, **overrides)


def _faulty(run):
    """`bench.cell._run` with the fault of its cell, if any, injected first."""
    @functools.wraps(run)
    def faulty_run(accelerator, matrix, cell, *args, **kwargs):
        fault = fault_for(cell.id, accelerator.process_index)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "oom":
            import torch

            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({FAULT_ENV})")
        if fault in ("nan", "option"):
            matrix = _Skewed(matrix, fault)
        return run(accelerator, matrix, cell, *args, **kwargs)

    faulty_run.injects_faults = True
    return faulty_run


def _install(module) -> None:
    if not getattr(module._run, "injects_faults", False):
        module._run = _faulty(module._run)


class _ArmOnImport(importlib.abc.MetaPathFinder):
    """Finds bench.cell as the other finders would, then wraps its `_run` once the module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_install(module, exec_module=exec_module):
                    exec_module(module)
                    _install(module)

                spec.loader.exec_module = exec_and_install
                return spec
        return None


def arm() -> None:
    """Inject GANBENCH_FAULT's failures into bench.cell in this process, now or when it is imported."""
    if _MODULE in sys.modules:
        _install(sys.modules[_MODULE])
    elif not any(isinstance(f, _ArmOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ArmOnImport())
