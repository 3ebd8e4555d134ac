"""The HTML report renders in a real browser: headless Chromium opens it and takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import pytest
import torch
from PIL import Image

from bench.report import write_report
from fakes import make_fake_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = (255, 255, 255)        # the report's background (templates/report.html: body)
TABLE_HEAD = (0xEE, 0xF2, 0xF7)  # its table headers' background (th)


def looks_rendered(image: Image.Image) -> str | None:
    """Why a screenshot is not a rendered report (None when it looks like one): mostly page
    background, table headers in their colour, and many other colours (plots, text, images)."""
    colours = image.resize((320, 600)).getcolors(maxcolors=320 * 600)
    counts = {colour: n for n, colour in colours}
    total = sum(counts.values())
    if counts.get(PAGE, 0) < 0.3 * total:
        return f"page background on {counts.get(PAGE, 0) / total:.0%} of the shot"
    if counts.get(TABLE_HEAD, 0) == 0:
        return "no table header"
    if len(counts) <= 200:
        return f"only {len(counts)} colours"
    return None


def test_the_render_check_refuses_noise_and_blank_pages():
    noise = torch.randint(0, 256, (600, 320, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert "background" in looks_rendered(Image.fromarray(noise.numpy()))
    assert looks_rendered(Image.new("RGB", (1280, 2400), PAGE)) == "no table header"


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:  # loud: a warning in the summary, not only a skip line
        warnings.warn("chromium not installed: the report was NOT rendered in a browser "
                      "(scripts/test.sh installs it)", stacklevel=1)
        pytest.skip("chromium not installed (scripts/test.sh installs it)")
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
    assert looks_rendered(image) is None, looks_rendered(image)
