"""The selection report rendered by a real browser: headless Chromium (a subprocess) loads the
self-contained index.html of a synthetic run root, dumps its DOM and takes a screenshot. Skipped
where no Chromium is on PATH. The report's content checks are in tests/unit/test_report.py."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from spice_ray.report import write_report
from spice_ray.testing import make_report_run as make_run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Path]:
    root = make_run(tmp_path_factory.mktemp("runs") / "full")
    return root, write_report(root)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


def test_renders_in_headless_chromium(full_run, tmp_path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not on PATH (apt-get install chromium) — headless render check skipped")
    _, index = full_run
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", index.as_uri()],
                             capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>SPICE report: full</title>" in dom.stdout
    assert "Source mix" in dom.stdout
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                              "--window-size=1280,1600", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
