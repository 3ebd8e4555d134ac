"""Print pip constraints that pin every dependency in pyproject.toml to its declared lower bound.

scripts/check_floors.sh installs exactly these and runs the quick tests: that is how we know each
">=" floor is true rather than a guess. A requirement without a ">=" bound is an error here, so a
new dependency cannot slip in unfloored. `--pin NAME==VERSION` overrides one floor (torch: only the
build on disk may be installed, never a multi-GB download of the floor release).

Usage: python scripts/floor_constraints.py [--extras test,export] [--pin torch==2.14.1 ...] [--pyproject PATH]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")
_FLOOR = re.compile(r">=\s*([^,\s]+)")


def canonical(name: str) -> str:
    """PEP 503 name: what pip compares, so `Jinja2` and `jinja2` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The runtime requirement strings, then those of each named extra (unknown extra: ValueError)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extra(s) {unknown}; pyproject has {sorted(optional)}")
    return list(project["dependencies"]) + [r for extra in extras for r in optional[extra]]


def floors(reqs: list[str]) -> dict[str, str]:
    """{canonical name: lower bound} for each requirement; ValueError names any without a ">=" bound."""
    out: dict[str, str] = {}
    missing = []
    for req in reqs:
        match = _REQUIREMENT.match(req)
        floor = _FLOOR.search(match.group(2)) if match else None
        if floor is None:
            missing.append(req)
            continue
        out[canonical(match.group(1))] = floor.group(1)
    if missing:
        raise ValueError(f"requirement(s) without a '>=' lower bound: {missing}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="the file to read (default: this repo's)")
    parser.add_argument("--extras", default="", help="comma-separated optional extras to include (e.g. test,export)")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                        help="use this exact version instead of the floor (repeatable)")
    args = parser.parse_args(argv)
    try:
        pins = floors(requirements(args.pyproject, [e for e in args.extras.split(",") if e]))
        for pin in args.pin:
            name, sep, version = pin.partition("==")
            if not sep or not version:
                raise ValueError(f"--pin {pin!r}: expected NAME==VERSION")
            pins[canonical(name)] = version
    except ValueError as err:
        print(f"floor_constraints: {err}", file=sys.stderr)
        return 2
    for name, version in pins.items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
