"""pyproject.toml: the wheel holds ganlib and bench only, with the one version and the declared floors."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import ganlib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_ganlib_and_bench_only_with_the_package_version(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    [wheel] = tmp_path.glob("ganbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"ganlib", "bench"}  # no benchmarks/, tests/, scripts/
    assert "bench/templates/report.html" in names and "bench/presets/default.yaml" in names
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert meta["Version"] == ganlib.__version__
    requires = meta.get_all("Requires-Dist")
    for floor in ("wandb>=0.29", "accelerate>=1.3", "Jinja2>=3.1"):
        assert any(r.replace(" ", "").startswith(floor) for r in requires), (floor, requires)
    assert any("wandb-workspaces" in r and 'extra == "wandb-report"' in r for r in requires)


FLOORS = [sys.executable, str(REPO / "scripts" / "floor_constraints.py")]


def test_every_dependency_and_extra_has_a_floor_that_check_floors_pins():
    # scripts/check_floors.sh installs exactly these pins; a requirement without ">=" would go untested.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = sorted(project["optional-dependencies"])
    out = subprocess.run(FLOORS + ["--extras", ",".join(extras), "--pin", "torch==2.14.1"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.split()
    pins = dict(line.split("==") for line in out)
    declared = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in declared}
    assert set(pins) == names
    assert pins["torch"] == "2.14.1" and pins["wandb"] == "0.29" and pins["jinja2"] == "3.1"


def test_a_dependency_without_a_floor_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\ndependencies = ["numpy>=1.26", "tqdm", "scipy<2"]\n')
    proc = subprocess.run(FLOORS + ["--pyproject", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "'tqdm'" in proc.stderr and "'scipy<2'" in proc.stderr
    assert "numpy" not in proc.stderr
