"""What a new user sees (issue 22): ``spice-ray demo`` in a pseudo-terminal 100 columns wide, run the
way a fresh clone runs it (not through make: no RAY_AUTH_MODE in the environment), shows stage lines,
tables and sentences, and no line of Ray's or any other framework's, and no cut cell; the root's
status.json then says succeeded (the comparison's inner pipeline call did not overwrite it), and
``spice-ray runs ROOT`` through a pipe prints whole values.

Starts its own local Ray and runs the whole demo (minutes on 2 cores)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
COLUMNS, ROWS = 100, 40
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
FRAMEWORK = ("WARNING", "core_worker", "authentication_token", "Token authentication", "Progress bars disabled",
             "INFO spice_ray", "Traceback", "(pid=", "raylet")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPICE_", "PYTEST_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               COLUMNS=str(COLUMNS), LINES=str(ROWS), TERM="xterm-256color")
    return env


def _run_in_pty(args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """``args`` with a pseudo-terminal of COLUMNS × ROWS as stdin, stdout and stderr; (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=_env(), start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            pytest.fail(f"{' '.join(args)} ran past {timeout} s")
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def _screen_lines(raw: str) -> list[str]:
    """The text a person read: escape sequences removed, a line redrawn after a carriage return
    counts as its last drawing (the progress bar redraws itself in place)."""
    text = ANSI.sub("", raw).replace("\r\n", "\n")
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_demo_in_a_100_column_terminal(tmp_path):
    root = tmp_path / "demo"
    code, raw = _run_in_pty([sys.executable, "-m", "spice_ray", "demo", "--root", str(root)], tmp_path, timeout=1500)
    lines = _screen_lines(raw)
    shown = "\n".join(lines)
    assert code == 0, shown
    framework = [line for line in lines if any(word in line for word in FRAMEWORK)]
    assert not framework, "framework lines on the terminal:\n" + "\n".join(framework)
    assert "…" not in shown, shown  # no cut cell
    assert "|---|" not in shown and "┏" in shown  # the comparison as a rendered table, not raw Markdown
    assert "over 3 seeds" in shown and ("excludes zero" in shown or "includes zero" in shown), shown
    assert "finished earlier, skipped" not in shown  # the comparison's inner call says nothing

    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "succeeded", status
    latest = json.loads((root / "latest.json").read_text())
    assert latest["run"] == status["entry"] and latest.get("train")

    piped = subprocess.run([sys.executable, "-m", "spice_ray", "runs", str(root)], capture_output=True, text=True,
                           cwd=tmp_path, env=_env(), timeout=120, check=True).stdout
    header, *rows = piped.strip().splitlines()
    assert header.split("\t")[:2] == ["run", "state"] and "…" not in piped
    entries = sorted(p.name for p in (root / "history").iterdir())
    assert [r.split("\t")[0] for r in rows] == entries  # whole run names
    assert rows[0].split("\t")[1] == "succeeded"
    assert json.loads(subprocess.run([sys.executable, "-m", "spice_ray", "runs", str(root), "--json"], capture_output=True,
                                     text=True, cwd=tmp_path, env=_env(), timeout=120, check=True).stdout)
