"""The HTML report renders in a real browser: headless Chromium opens it and takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from PIL import Image

from bench.report import write_report
from fakes import make_fake_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/test.sh installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    run_dir = tmp_path / "run"
    make_fake_run(run_dir)
    report = write_report(run_dir)
    shot = tmp_path / "report.png"
    # Background networking off: the page must need nothing from outside, and the machine has no network.
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
           report.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    # A rendered page with tables and plots has many colours; a blank or error page has a handful.
    colours = image.resize((320, 600)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200
