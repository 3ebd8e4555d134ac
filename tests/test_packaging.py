"""pyproject.toml: the wheel holds ganlib and bench only, with the one version and the declared floors."""

from __future__ import annotations

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
