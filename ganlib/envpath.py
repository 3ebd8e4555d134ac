"""Paths that name environment variables (`$GANBENCH_STYLEGAN2_FFHQ`, `${DATA}/babies`), expanded at use.

A matrix names its files through variables so one preset serves every machine; specs and records
keep the text as written (cell ids and cache keys do not change with where the files lie), and the
path is expanded where a file is opened. An unset variable is an error naming it, never the empty
string that `os.path.expandvars` would leave in place of a silent wrong path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ganlib.errors import UserError

_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def unset_variables(text: str) -> list[str]:
    """The variables `text` names that are not set (or set to nothing), in order of appearance."""
    names = [m.group(1) or m.group(2) for m in _VARIABLE.finditer(text)]
    return list(dict.fromkeys(n for n in names if not os.environ.get(n)))


def expand_path(text: str, what: str) -> Path:
    """`text` with `~` and every `$VAR` / `${VAR}` expanded; UserError naming `what` and the unset variable."""
    missing = unset_variables(text)
    if missing:
        raise UserError(f"{what} {text!r} names ${missing[0]}, which is not set; set it to the path "
                        f"(export {missing[0]}=...)")
    expanded = _VARIABLE.sub(lambda m: os.environ[m.group(1) or m.group(2)], text)
    return Path(expanded).expanduser()
