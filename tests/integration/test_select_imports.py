"""The selection library imports no Ray: checked in a fresh interpreter (a subprocess), since this
test session may already have imported Ray. The import graph itself (no cycles) is checked from the
source in tests/unit/test_structure.py."""

from __future__ import annotations

import sys


def test_library_does_not_import_ray() -> None:
    import subprocess

    code = "import sys, spice_ray.select; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
