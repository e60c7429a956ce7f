"""Shared fixtures: one session-scoped local Ray, the real-data location, a tiny built-in model,
and ``ray_head`` (a separate ``ray start --head`` for tests that need a real cluster)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set before Ray is imported anywhere: keep Ray local, quiet and on loopback.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPICE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K"


def shared_data_or_skip() -> Path:
    if not any(SHARED_DATA.glob("*.jsonl")):
        pytest.skip(f"real corpus not found at {SHARED_DATA} (set SPICE_SHARED to the shared/ folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, 512 MiB object store, dashboard on)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=True,
            ignore_reinit_error=True,
            log_to_driver=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_executor(ray_session):
    """The Ray executor on the session's Ray."""
    from spice_ray.ray_executor import RayExecutor

    return RayExecutor(verbose=True)


@pytest.fixture
def local_executor():
    from spice_ray.executor import LocalExecutor

    return LocalExecutor()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Llama (with its tokenizer), materialized once per test session."""
    from spice_ray.models import materialize_builtin

    return materialize_builtin("builtin:tiny-llama", tmp_path_factory.mktemp("models") / "tiny-llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """``ray start --head`` on 127.0.0.1 in its own process group and temp dir (so it never becomes
    this machine's default cluster), with ``env`` added to its environment (its workers inherit
    it, as a pod's would); yields ``(dashboard URL, GCS address)`` and kills the group after.

    Every port is a free one: the test session's own Ray holds the defaults (52365 and friends),
    and a head whose job agent cannot bind answers every job submit with "No available agent".
    """
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live here
    dash, gcs = free_port(), free_port()
    cmd = [
        str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2", "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    # A job's `python` is the head's: put this venv first, as a cluster image would have it.
    full_env = {
        **os.environ, **(env or {}),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(cmd, env=full_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ray head did not come up (exit {proc.poll()})")
                time.sleep(1)
        yield address, f"127.0.0.1:{gcs}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
