"""Typed option dataclasses from YAML or `--x-opt name=value` text: one strict parser for strategies and
augmentations, so "2.5 is no layer count" and "nan is no rate" mean the same everywhere."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from ganlib.errors import UserError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def typed_options(kind: str, name: str, options_type: type, values: dict[str, Any] | None) -> Any:
    """`options_type(**values)` with every value coerced to its field's type; a one-line UserError
    naming `kind` and `name` (e.g. strategy 'freeze_d') for an unknown option or a bad value."""
    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(options_type)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{kind} {name!r} has no option {unknown[0]!r}; options: {', '.join(known) or 'none'}")
    hints = typing.get_type_hints(options_type)
    return options_type(**{key: coerce(kind, name, key, value, hints[key]) for key, value in values.items()})


def coerce(kind: str, name: str, key: str, value: Any, typ: type) -> Any:
    """An option value as `typ`; strict where a plain cast would guess: 2.5 is not an int, "no" is a
    bool False, nan is no float, True is no number."""
    bad = UserError(f"{kind} {name!r} option {key}={value!r} is not a valid {typ.__name__}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if isinstance(value, bool):  # bool is an int subclass; True as a layer count is a mistake
        raise bad
    try:
        number = float(str(value).strip()) if typ in (int, float) else typ(value)
    except (TypeError, ValueError):
        raise bad from None
    if typ is float:
        if not math.isfinite(number):
            raise bad
        return number
    if typ is int:
        if not math.isfinite(number) or number != int(number):
            raise bad
        return int(number)
    return number
