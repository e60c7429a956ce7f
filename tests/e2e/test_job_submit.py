"""A real Ray head on 127.0.0.1: the smoke config through `ray job submit` and `spice-ray submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.submit import submission_id
from spice_ray.testing import ray_head

pytestmark = [pytest.mark.ray, pytest.mark.drill]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head_address():
    with ray_head() as (address, _):
        yield address


def wait_for(address: str, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            if status != "SUCCEEDED":
                print(client.get_job_logs(job_id)[-5000:])
            return status
        time.sleep(3)
    raise TimeoutError(job_id)


def test_ray_job_submit_then_spice_ray_submit(head_address, tmp_path):
    root = tmp_path / "smoke"
    overrides = [f"run.root={root}", "corpus.demo_size=120", "train.max_steps=2", "train.num_workers=1"]
    env = {**os.environ, "RAY_ADDRESS": head_address}
    job_id = "smoke-ray-job-submit"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", head_address, "--submission-id", job_id, "--no-wait",
        "--runtime-env", "jobs/runtime_env.yaml", "--",
        "python", "-m", "spice_ray", "run", "--config", "jobs/smoke.yaml", *sum([["--set", o] for o in overrides], []),
    ]
    # A head that answers /api/version may not have its job agent up yet: retry while it starts.
    for _ in range(12):
        done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            break
        time.sleep(10)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert wait_for(head_address, job_id) == "SUCCEEDED"
    for stage in ("models", "ingest", "sketch", "select", "train"):
        assert (root / stage / "_SUCCESS").exists(), stage
    selection = pq.read_table(root / "select" / "selection.parquet")
    kept = json.loads((root / "ingest" / "manifest.json").read_text())["result"]["n_kept"]
    assert selection.num_rows == round(0.1 * kept)
    train_dir = json.loads((root / "train" / "manifest.json").read_text())["dir"]
    assert (root / train_dir / "model" / "config.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")}

    # The same run through spice-ray submit: a stable id, a job that finds every stage done.
    cli = [str(BIN / "spice-ray"), "submit", "jobs/smoke.yaml", "--address", head_address, *sum([["--set", o] for o in overrides], [])]
    out = subprocess.run(cli, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    expected_id = submission_id(load_config(REPO / "jobs" / "smoke.yaml", overrides))
    assert f"{expected_id}: submitted" in out and "ray job logs" in out
    assert wait_for(head_address, expected_id) == "SUCCEEDED"
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")} == mtimes  # no stage redone
    # Submitting again does not start a second job.
    again = subprocess.run(cli, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    assert f"{expected_id}: already succeeded" in again
