"""A real Ray head on 127.0.0.1: the smoke config through `ray job submit` and `spice-ray submit`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.submit import submission_id

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` in its own process group and temp dir (so it never becomes the default
    cluster of this machine); torn down by killing that group. Every agent port is a free one: the
    test session's own Ray already holds the defaults (52365 and friends), and a head whose job agent
    cannot bind answers every submit with "No available agent"."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live here
    dash = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2", "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    # The job's `python` is the head's: put this venv first, as a cluster image would have it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"ray head did not come up (exit {proc.poll()})")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


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


def test_ray_job_submit_then_spice_ray_submit(ray_head, tmp_path):
    root = tmp_path / "smoke"
    overrides = [f"run.root={root}", "corpus.demo_size=120", "train.max_steps=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_head}
    job_id = "smoke-ray-job-submit"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head, "--submission-id", job_id, "--no-wait",
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
    assert wait_for(ray_head, job_id) == "SUCCEEDED"
    for stage in ("models", "ingest", "sketch", "select", "train"):
        assert (root / stage / "_SUCCESS").exists(), stage
    selection = pq.read_table(root / "select" / "selection.parquet")
    kept = json.loads((root / "ingest" / "manifest.json").read_text())["result"]["n_kept"]
    assert selection.num_rows == round(0.1 * kept)
    assert (root / "train" / "model" / "config.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")}

    # The same run through spice-ray submit: a stable id, a job that finds every stage done.
    cli = [str(BIN / "spice-ray"), "submit", "jobs/smoke.yaml", "--address", ray_head, *sum([["--set", o] for o in overrides], [])]
    out = subprocess.run(cli, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    expected_id = submission_id(load_config(REPO / "jobs" / "smoke.yaml", overrides))
    assert f"{expected_id}: submitted" in out and "ray job logs" in out
    assert wait_for(ray_head, expected_id) == "SUCCEEDED"
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/manifest.json")} == mtimes  # no stage redone
    # Submitting again does not start a second job.
    again = subprocess.run(cli, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    assert f"{expected_id}: already succeeded" in again
