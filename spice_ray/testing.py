"""Helpers for spice-ray's own tests (and anyone testing code that runs it): a free loopback port,
a separate ``ray start --head`` on loopback with free ports for every agent, and the location of
the shared real data. Nothing here is imported by the library itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.config import Config, LoraConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPICE_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K"
PICO = SHARED / "models" / "pico-llama"


def shared_data_or_skip() -> Path:
    import pytest

    if not any(SHARED_DATA.glob("*.jsonl")):
        pytest.skip(f"real corpus not found at {SHARED_DATA} (set SPICE_SHARED to the shared/ folder)")
    return SHARED_DATA


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
                    raise RuntimeError(f"ray head did not come up (exit {proc.poll()})")
                time.sleep(1)
        yield address, f"127.0.0.1:{gcs}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # `ray start --block` often ignores SIGTERM for its whole grace period (30 s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ------------------------------------------------------------------------------- selection problems


def select_problem(seed: int, n: int = 40, d: int = 8, *, anti: int = 6, scale: float = 1.0) -> np.ndarray:
    """Random sketches around a shared mean direction, with some rows anti-aligned to it."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=d)
    mean /= np.linalg.norm(mean)
    G = 0.8 * mean + 0.6 * rng.normal(size=(n, d))
    flip = rng.choice(n, size=anti, replace=False)
    G[flip] = -1.5 * mean + 0.3 * rng.normal(size=(anti, d))
    return scale * G * rng.uniform(0.5, 1.5, size=(n, 1))


def write_sketches(path, uids: list[str], G: np.ndarray, *, fixed: bool = True) -> None:
    n, d = G.shape
    values = pa.array(G.reshape(-1), type=pa.float32() if G.dtype == np.float32 else pa.float16())
    sketch = pa.FixedSizeListArray.from_arrays(values, d) if fixed else pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * d + 1, d, dtype=np.int32)), values
    )
    table = pa.table(
        {
            "uid": pa.array(uids),
            "sketch": sketch,
            "loss": pa.array(np.ones(n, dtype=np.float32)),
            "grad_norm": pa.array(np.linalg.norm(G.astype(np.float64), axis=1).astype(np.float32)),
            "n_tokens": pa.array(np.full(n, 7, dtype=np.int32)),
        }
    )
    pq.write_table(table, path)


# ----------------------------------------------------------------------------------- train inputs

TOPICS = ["rivers", "bread", "stars", "trains", "music", "chess", "tea", "rain", "maps", "bees"]


def train_records(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        messages = [
            {"role": "user", "content": f"Tell me one fact about {topic} (question {i})."},
            {"role": "assistant", "content": f"Here is fact number {i} about {topic}: it is {i % 7 + 2} times nicer than you think."},
        ]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are brief."})
        uid = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        rows.append({"uid": uid, "source": f"src{i % 2}", "messages": messages, "n_tokens": 0, "file": "inline", "line": i})
    return rows


def write_train_inputs(tmp_path: Path, n: int = 40, n_selected: int = 32) -> tuple[str, str, list[dict]]:
    rows = train_records(n)
    records = tmp_path / "records"
    records.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), records / "part-0.parquet")
    picked = rows[::-1][:n_selected]  # not the records' order: the filter must go by uid
    selection = pa.table(
        {
            "uid": [r["uid"] for r in picked],
            "rank": list(range(len(picked))),
            "gain": [1.0 / (k + 1) for k in range(len(picked))],
            "conflict": [0.0] * len(picked),
            "score": [1.0 / (k + 1) for k in range(len(picked))],
        }
    )
    pq.write_table(selection, tmp_path / "selection.parquet")
    return str(records), str(tmp_path / "selection.parquet"), rows


def train_config(max_steps: int | None = None, **train) -> Config:
    values = dict(
        num_workers=2,
        cpus_per_worker=0.5,
        use_gpu=None,
        zero_stage=2,
        lora=True,
        epochs=1,
        max_steps=max_steps,
        micro_batch_size=2,
        grad_accum=1,
        lr=5e-3,
        checkpoint_every=2,
    )
    values.update(train)
    return Config(model=ModelConfig(target_lora=LoraConfig(r=4, alpha=8.0)), train=TrainConfig(**values))
