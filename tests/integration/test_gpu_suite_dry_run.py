"""``benchmarks/gpu_suite.py --dry-run``: the GPU suite's code paths on CPU with tiny shapes (Ray Train +
DeepSpeed ZeRO-2 LoRA with a killed and resumed worker, ZeRO-3 full fine-tuning, the sketch worker
against a training step and the LESS-style loop, the block engine and its picks against numpy). The
table must hold every row, each with numbers and no NaN; the JSON every figure, finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.deepspeed, pytest.mark.ray, pytest.mark.drill]

REPO = Path(__file__).resolve().parents[2]
ROWS = ("lora7b", "full1p5b", "sketch", "select", "picks")


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of the markdown table (cells stripped), header and rule left out."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:] if not line.startswith("|---")]


def floats(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in floats(v)]
    if isinstance(value, list):
        return [x for v in value for x in floats(v)]
    return [value] if isinstance(value, float) else []


@pytest.mark.timeout(900)
def test_gpu_suite_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=840, check=False,
    )
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log

    rows = table_rows((out / "gpu_suite.md").read_text())
    assert len(rows) == len(ROWS), rows
    for label, setup, measured, goal, verdict, seconds in rows:
        assert any(ch.isdigit() for ch in measured), (label, measured)
        assert "nan" not in measured.lower() and not measured.startswith(("error", "not run")), (label, measured)
        assert verdict and float(seconds) >= 0, (label, verdict, seconds)
    assert "MFU = tokens/s × c × N" in (out / "gpu_suite.md").read_text()

    report = json.loads((out / "gpu_suite.json").read_text())
    assert [r["key"] for r in report["rows"]] == list(ROWS)
    by_key = {r["key"]: r["figures"] for r in report["rows"]}
    assert all(math.isfinite(x) for x in floats(by_key)), by_key
    for key in ("lora7b", "full1p5b"):
        assert by_key[key]["tokens_per_s"] > 0 and by_key[key]["mfu"] > 0
        assert by_key[key]["summary"]["steps"] == report["plan"]["steps"]
    assert by_key["lora7b"]["summary"]["resumed_from_step"] is not None  # killed after a checkpoint, resumed
    assert by_key["full1p5b"]["summary"]["zero_stage"] == 3
    assert by_key["sketch"]["samples_per_s"] > 0 and by_key["sketch"]["speedup_vs_less"] > 0
    assert by_key["picks"]["identical"] is True
