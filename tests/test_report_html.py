"""The HTML report in a real headless Chromium: ``snakemake --report`` on the tiny run, then its
HTML entries (the report as a page, the interactive heatmap) opened in the browser, nothing
fetched: the heatmap must render (Vega's SVG marks, the head menu) and the report's text must be
in the rendered page. Chromium is installed with apt when missing (as root), else skipped."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_ok, run_snakemake, tiny_run_config

from weight_geometry.interactive import CHART_ID

pytestmark = pytest.mark.workflow

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    """A Chromium binary, installed with apt when missing and this test runs as root."""
    found = _browser()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env,
                       capture_output=True, timeout=600)
        found = _browser()
    if found is None:
        pytest.skip("no Chromium: install it (apt-get install chromium) or run as root with apt")
    return found


def _dom(browser: str, page: Path) -> str:
    """The page's DOM after its scripts ran (5 s of virtual time), as Chromium serializes it."""
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _entries(report: str) -> dict[str, str]:
    """The HTML entries of a Snakemake report.html, by file name, decoded."""
    return {name: base64.b64decode(data).decode() for name, data in re.findall(
        r"data:text/html;charset=utf8;filename=([\w.]+);base64,([A-Za-z0-9+/=]+)", report)}


def test_report_html_renders_the_heatmap_and_the_text_in_chromium(tiny_run, tiny_checkpoint,
                                                                    chromium, tmp_path):
    target = tmp_path / "report.html"
    assert_ok(run_snakemake(tiny_run, "--report", str(target),
                            config=tiny_run_config(tiny_checkpoint)))
    entries = _entries(target.read_text())
    assert {"report.html", "similarity_interactive.html"} <= set(entries)
    for name, page in entries.items():
        assert "cdn.jsdelivr" not in page and "https://cdn" not in page, name  # all inlined
        (tmp_path / name).write_text(page)
    for name in ("report.html", "similarity_interactive.html"):
        dom = _dom(chromium, tmp_path / name)
        chart = dom[dom.index(f'id="{CHART_ID}"'):]
        assert 'class="marks"' in chart, f"{name}: the heatmap did not render"
        assert re.search(r"<option[^>]*>head 0</option>", chart), f"{name}: no head menu"
    dom = _dom(chromium, tmp_path / "report.html")
    text = re.sub(r"<script.*?</script>", "", dom, flags=re.S)
    for visible in ("Key findings", "Finding:", "Experiment 1: subspace overlap",
                    "Tests and multiplicity"):
        assert visible in text
    assert "<table>" in text and 'src="data:image/png;base64,' in text
