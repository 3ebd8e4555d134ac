"""Checks made before any compute: can the run write where it must, and is there room for it.

A read-only or full output directory used to surface at the final save, after all the training;
these checks move that failure to the first second, as one line naming the directory.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ganlib.errors import UserError


def check_writable(directory: Path, what: str, hint: str = "") -> None:
    """Create `directory` (and parents) if needed and write a scratch file in it; UserError if not possible.

    Writing is the only reliable test: permission bits say nothing for root, read-only mounts or quotas.
    """
    directory = Path(directory)
    try:
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ganbench-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise UserError(f"{what} {directory} is not writable ({reason})" + (f"; {hint}" if hint else "")) from None


def check_free_space(directory: Path, need_bytes: int, what: str) -> None:
    """UserError when the file system of `directory` has less than `need_bytes` free."""
    free = shutil.disk_usage(_existing_parent(Path(directory))).free
    if free < need_bytes:
        raise UserError(f"{what} {directory}: {free / 2**20:.0f} MiB free, the run needs about "
                        f"{need_bytes / 2**20:.0f} MiB; free some space or choose another directory")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent
