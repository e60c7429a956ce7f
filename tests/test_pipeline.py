"""End to end on local Ray: the demo pipeline, its artifacts, and a rerun that does no work."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.pipeline import STAGES, list_runs, run_pipeline
from spice_ray.select import logdet_of, read_sketches

pytestmark = pytest.mark.slow


def small_config(root, **extra):
    overrides = [
        f"run.root={root}",
        "corpus.demo_size=120",
        "sketch.dim=64",
        "sketch.batch_size=8",
        "select.fraction=0.1",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.num_workers=2",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = small_config(root)
    outcomes = run_pipeline(cfg)
    return cfg, root, outcomes


def test_pipeline_writes_every_artifact(finished_run):
    cfg, root, outcomes = finished_run
    assert list(outcomes) == list(STAGES)
    assert not any(o.skipped for o in outcomes.values())
    for stage in STAGES:
        manifest = json.loads((root / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["seconds"] >= 0
        assert (root / stage / "_SUCCESS").read_text().strip() == manifest["key"]
        assert manifest["versions"]["torch"].startswith("2.")

    ingest = outcomes["ingest"].manifest["result"]
    assert ingest["n_in"] == ingest["n_kept"] + ingest["n_quarantined"]
    records = pq.read_table(root / "ingest" / "records.parquet")
    assert records.num_rows == ingest["n_kept"]

    uids, sketches = read_sketches(str(root / "sketch" / "sketches"))
    assert sorted(uids.tolist()) == sorted(records.column("uid").to_pylist())
    assert sketches.shape == (ingest["n_kept"], 64) and np.isfinite(sketches).all()

    selection = pq.read_table(root / "select" / "selection.parquet").to_pandas()
    summary = outcomes["select"].manifest["result"]
    assert len(selection) == summary["k_selected"] == round(0.1 * ingest["n_kept"])
    assert selection["rank"].tolist() == list(range(len(selection)))
    index = {u: i for i, u in enumerate(uids)}
    picked = [index[u] for u in selection["uid"]]
    assert summary["logdet"] == pytest.approx(logdet_of(sketches, picked, alpha=cfg.select.alpha), rel=1e-6)

    train = outcomes["train"].manifest["result"]
    assert train["steps"] == 3 and np.isfinite(train["loss"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(train["model"])
    assert model.config.num_hidden_layers == 2


def test_second_run_does_no_work(finished_run):
    cfg, root, _ = finished_run
    before = {s: (root / s / "manifest.json").stat().st_mtime_ns for s in STAGES}
    outcomes = run_pipeline(cfg)
    assert all(o.skipped for o in outcomes.values())
    assert {s: (root / s / "manifest.json").stat().st_mtime_ns for s in STAGES} == before


def test_changed_select_config_reruns_select_and_train_only(finished_run, tmp_path):
    cfg, root, _ = finished_run
    changed = cfg.model_copy(deep=True)
    changed.select.lam = 0.0
    changed.run.stages = ["ingest", "sketch", "select"]
    outcomes = run_pipeline(changed)
    assert outcomes["models"].skipped and outcomes["ingest"].skipped and outcomes["sketch"].skipped
    assert not outcomes["select"].skipped
    assert outcomes["select"].manifest["result"]["method"] == "spice"
    # every invocation that did work is in the history, with its own selection
    runs = list_runs(root)
    assert [r["redone"] for r in runs] == [list(STAGES), ["select"]]
    assert runs[0]["selected"] == runs[1]["selected"] and runs[0]["records"] == runs[1]["records"]
    history = sorted((root / "history").iterdir())
    assert all((h / "selection.parquet").exists() for h in history)
