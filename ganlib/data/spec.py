"""`DataSpec`: which images to load, written as one line (`mnist5k:classes=0-4:n=25:seed=1`) or a YAML dict.

The text form is the user's interface (CLI, matrix YAML, results records); `str(spec)` gives the
canonical text and `spec.slug` a short id-safe form for cell ids and file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from ganlib.data.sources import DATASETS, FOLDER
from ganlib.errors import UserError

EXPECTED_FORM = "NAME[:classes=0-4|0,2,4][:n=25][:seed=0][:split=train|test] or folder:PATH[:n=10][:seed=0]"
_KEYS = ("classes", "n", "seed", "split")
_OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Names a set of training images: a dataset, an optional class selection and few-shot subset.

    Validated on construction (unknown dataset, split or a bad value is a UserError), so code past
    the config edge can trust it. `classes` is kept sorted and without duplicates.
    """

    name: str                                   # registry key in DATASETS, or "folder"
    path: str | None = None                     # image folder (name == "folder" only)
    classes: tuple[int, ...] | None = None      # labels to keep; None = all
    n: int | None = None                        # few-shot subset size after class selection; None = all
    seed: int = 0                               # seed of the few-shot subset choice (not of training)
    split: str = "train"                        # "train" or "test" (embedded datasets: "train" only)

    def __post_init__(self):
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(sorted(set(self.classes))))
        where = f"dataset spec {self._text()!r}"
        if self.name == FOLDER:
            if not self.path:
                raise UserError(f"{where} has no folder path; expected folder:PATH, e.g. folder:data/faces:n=10")
            splits = ("train",)
        else:
            if self.name not in DATASETS:
                known = ", ".join(DATASETS.names() + [f"{FOLDER}:PATH"])
                raise UserError(f"unknown dataset {self.name!r} in {where}; known: {known}")
            if self.path is not None:
                raise UserError(f"{where}: only folder datasets take a path; expected {EXPECTED_FORM}")
            splits = DATASETS.get(self.name).splits
        if self.split not in splits:
            raise UserError(f"{where}: split {self.split!r} not available; {self.name} has split(s) {', '.join(splits)}")
        if self.classes is not None and (not self.classes or min(self.classes) < 0):
            raise UserError(f"{where}: classes must be non-empty and >= 0, e.g. classes=0-4")
        if self.n is not None and self.n < 1:
            raise UserError(f"{where}: n must be >= 1 (the few-shot subset size), got {self.n}")
        if self.seed < 0:
            raise UserError(f"{where}: seed must be >= 0, got {self.seed}")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | DataSpec) -> DataSpec:
        """Build a spec from its text form, a YAML dict with the field names as keys, or a spec."""
        if isinstance(value, DataSpec):
            return value
        if isinstance(value, dict):
            return cls._from_dict(value)
        if isinstance(value, str):
            return cls._from_text(value)
        raise UserError(f"dataset spec must be text or a mapping, got {value!r}; expected {EXPECTED_FORM}")

    @classmethod
    def _from_text(cls, text: str) -> DataSpec:
        parts = text.strip().split(":")
        name, rest = parts[0], parts[1:]
        if not name:
            raise UserError(f"bad dataset spec {text!r}: no dataset name; expected {EXPECTED_FORM}")
        path_parts: list[str] = []
        options: dict[str, Any] = {}
        for part in rest:
            match = _OPTION.match(part)
            if match is None:
                # Before the first option, non-option parts belong to a folder path (which may hold ':').
                if options or name != FOLDER:
                    raise UserError(f"bad part {part!r} in dataset spec {text!r}; expected key=value, {EXPECTED_FORM}")
                path_parts.append(part)
                continue
            key, raw = match.groups()
            if key not in _KEYS:
                raise UserError(f"unknown key {key!r} in dataset spec {text!r}; expected one of {', '.join(_KEYS)}: {EXPECTED_FORM}")
            if key in options:
                raise UserError(f"key {key!r} given twice in dataset spec {text!r}")
            options[key] = _parse_value(key, raw, repr(text))
        path = ":".join(path_parts) if path_parts else None
        return cls(name=name, path=path, **options)

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> DataSpec:
        unknown = sorted(set(data) - {"name", "path", *_KEYS})
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(map(repr, unknown))} in dataset spec {data!r}; expected name, path, {', '.join(_KEYS)}")
        if not isinstance(data.get("name"), str):
            raise UserError(f"dataset spec {data!r} needs a text 'name'; expected e.g. {{name: mnist5k, classes: 0-4, n: 25}}")
        path = data.get("path")
        if path is not None and not isinstance(path, str):
            raise UserError(f"dataset spec {data!r}: path must be text, got {path!r}")
        options = {}
        for key in _KEYS:
            value = data.get(key)
            if value is None:
                continue
            if key in ("n", "seed") and (isinstance(value, bool) or not isinstance(value, (int, str))):
                raise UserError(f"bad {key} {value!r} in dataset spec {data!r}; expected an integer, e.g. {key}: 25")
            if key == "split" and not isinstance(value, str):
                raise UserError(f"bad split {value!r} in dataset spec {data!r}; expected train or test")
            options[key] = _parse_value(key, value, repr(data))
        return cls(name=data["name"], path=path, **options)

    def _text(self) -> str:
        parts = [self.name] + ([self.path] if self.path is not None else [])
        if self.classes is not None:
            parts.append(f"classes={compact_ranges(self.classes, ',')}")
        if self.n is not None:
            parts.append(f"n={self.n}")
        if self.seed != 0:
            parts.append(f"seed={self.seed}")
        if self.split != "train":
            parts.append(f"split={self.split}")
        return ":".join(parts)

    def __str__(self) -> str:
        """Canonical text form: defaults omitted, classes as compact ranges; parse(str(s)) == s."""
        return self._text()

    @property
    def channels(self) -> int:
        """Channels these images have natively: the dataset's own; folders of images are taken as RGB."""
        return 3 if self.name == FOLDER else DATASETS.get(self.name).channels

    @property
    def slug(self) -> str:
        """Short id- and filename-safe form, e.g. `mnist5k-c0-4-n25` (folders: name + path hash)."""
        if self.name == FOLDER:
            base = re.sub(r"[^A-Za-z0-9]+", "_", self.path.rstrip("/\\").split("/")[-1]).strip("_") or "root"
            digest = hashlib.sha1(self.path.encode()).hexdigest()[:6]
            parts = [f"folder_{base}_{digest}"]
        else:
            parts = [self.name]
        if self.classes is not None:
            parts.append("c" + compact_ranges(self.classes, "_"))
        if self.n is not None:
            parts.append(f"n{self.n}")
        if self.seed != 0:
            parts.append(f"seed{self.seed}")
        if self.split != "train":
            parts.append(self.split)
        return "-".join(parts)


def _parse_value(key: str, raw: Any, where: str) -> Any:
    """Turn one option's value (text, or a YAML int/list for classes) into the field's type."""
    if key == "split":
        return str(raw)
    if key == "classes":
        if isinstance(raw, bool):
            raise UserError(f"bad classes {raw!r} in dataset spec {where}; expected e.g. classes=0-4 or classes=0,2,4")
        if isinstance(raw, int):
            return (raw,)
        if isinstance(raw, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
                raise UserError(f"bad classes {raw!r} in dataset spec {where}; expected a list of integers, e.g. [0, 2, 4]")
            return tuple(raw)
        return _parse_ranges(str(raw), where)
    try:
        return int(str(raw).strip())
    except ValueError:
        raise UserError(f"bad {key} {raw!r} in dataset spec {where}; expected an integer, e.g. {key}=25") from None


def _parse_ranges(text: str, where: str) -> tuple[int, ...]:
    """'0-2,5,7-9' -> (0, 1, 2, 5, 7, 8, 9)."""
    out: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise UserError(f"bad classes {text!r} in dataset spec {where}; expected e.g. classes=0-4 or classes=0,2,4")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        out.extend(range(lo, hi + 1))
    return tuple(out)


def compact_ranges(values: tuple[int, ...], sep: str) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2{sep}5{sep}7-8': every run of consecutive values becomes lo-hi."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return sep.join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
