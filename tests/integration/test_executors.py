"""The local executor (everything in this process, no Ray) and the Ray executor run the same stages
and write the same artifacts, bit for bit, on CPU."""

from __future__ import annotations

import json

import pytest

from spice_ray.config import load_config
from spice_ray.executor import LocalExecutor
from spice_ray.pipeline import STAGES, run_pipeline

pytestmark = pytest.mark.ray


def _config(root, executor: str, corpus):
    return load_config(None, [
        f"run.root={root}", f"run.executor={executor}", f"corpus.paths=[{corpus}]", "sketch.dim=64", "sketch.batch_size=8",
        "select.fraction=0.1", "train.max_steps=4", "train.micro_batch_size=2", "train.num_workers=1",
    ])


def _digests(root, stage: str) -> dict[str, str]:
    """sha256 of every artifact a stage's manifest lists, by its path inside the stage directory."""
    manifest = json.loads((root / stage / "manifest.json").read_text())
    prefix = manifest["dir"] + "/"
    return {rel[len(prefix):]: d["sha256"] for rel, d in manifest["outputs"].items()}


def test_local_and_ray_executors_write_identical_artifacts(ray_session, tmp_path):
    from spice_ray.corpus.demo import write_demo_corpus

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n=120, seed=0)
    local = run_pipeline(_config(tmp_path / "local", "local", corpus), executor=LocalExecutor())
    ray_run = run_pipeline(_config(tmp_path / "ray", "ray", corpus))
    assert list(local) == list(ray_run) == list(STAGES)
    assert local["train"].result["executor"] == "local" and ray_run["train"].result["executor"] == "ray"
    for stage in ("ingest", "sketch", "select", "train"):
        if stage == "train":  # the export and the metrics; checkpoints differ in layout (Ray Train vs local)
            keep = lambda rel: rel.startswith(("model/", "rows.parquet"))  # noqa: E731
        else:
            keep = lambda rel: True  # noqa: E731
        a = {k: v for k, v in _digests(tmp_path / "local", stage).items() if keep(k)}
        b = {k: v for k, v in _digests(tmp_path / "ray", stage).items() if keep(k)}
        assert a and a == b, stage
    # the models are the same, so are the losses they train to and the eval numbers
    assert [m["loss"] for m in _metrics(tmp_path / "local")] == [m["loss"] for m in _metrics(tmp_path / "ray")]
    assert local["eval"].result["sets"] == ray_run["eval"].result["sets"]


def _metrics(root):
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    return [json.loads(line) for line in (root / manifest["dir"] / "metrics.jsonl").read_text().splitlines()]

