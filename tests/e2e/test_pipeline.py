"""End to end on local Ray: the pipeline, its artifacts, a rerun that does no work, and the local
executor (everything in this process, no Ray) writing the same artifacts bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.pipeline import STAGES, list_runs, run_pipeline
from spice_ray.select import logdet_of, read_sketches


def small_config(root, **extra):
    overrides = [
        f"run.root={root}",
        "corpus.demo_size=120",
        "sketch.dim=64",
        "sketch.batch_size=8",
        "select.fraction=0.1",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.num_workers=1",  # the default; 2-worker DeepSpeed runs are in tests/integration/test_train_ray.py
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    """The whole pipeline on the session's Ray, over a demo corpus outside the root."""
    from spice_ray.corpus.demo import write_demo_corpus

    corpus = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(corpus, n=120, seed=0)
    root = tmp_path_factory.mktemp("run")
    cfg = small_config(root, **{"corpus.paths": f"[{corpus}]"})
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
    # the selection saw the sketches scaled by their loss tokens (select.scale) with α resolved from them (auto)
    from spice_ray.select.io import read_sketch_column
    from spice_ray.select.prepare import resolve_alpha, scale_sketches

    scaled = scale_sketches(sketches, read_sketch_column(str(root / "sketch" / "sketches"), "n_loss_tokens"), cfg.select.scale)
    assert summary["alpha"] == pytest.approx(resolve_alpha(scaled, cfg.select.alpha))
    assert summary["logdet"] == pytest.approx(logdet_of(scaled, picked, alpha=summary["alpha"]), rel=1e-6)

    train = outcomes["train"].manifest["result"]
    assert train["steps"] == 3 and np.isfinite(train["loss"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(train["model"])
    assert model.config.num_hidden_layers == 2


def _digests(root, stage: str) -> dict[str, str]:
    """sha256 of every artifact a stage's manifest lists, by its path inside the stage directory."""
    from spice_ray.testing import stage_digests

    return stage_digests(root, stage)


def _metrics(root):
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    return [json.loads(line) for line in (root / manifest["dir"] / "metrics.jsonl").read_text().splitlines()]


def test_the_local_executor_writes_identical_artifacts(finished_run, tmp_path):
    from spice_ray.executor import LocalExecutor

    cfg, ray_root, ray_run = finished_run
    local_cfg = cfg.model_copy(deep=True)
    local_cfg.run.root, local_cfg.run.executor = str(tmp_path / "local"), "local"
    local = run_pipeline(local_cfg, executor=LocalExecutor())
    assert list(local) == list(STAGES)
    assert local["train"].result["executor"] == "local" and ray_run["train"].result["executor"] == "ray"
    for stage in ("ingest", "sketch", "select", "train"):
        # train: the export and its rows; checkpoints differ in layout (Ray Train vs local)
        keep = (lambda rel: rel.startswith(("model/", "rows.parquet"))) if stage == "train" else (lambda rel: True)
        a = {k: v for k, v in _digests(tmp_path / "local", stage).items() if keep(k)}
        b = {k: v for k, v in _digests(ray_root, stage).items() if keep(k)}
        assert a and a == b, stage
    # the models are the same, so are the losses they train to and the eval numbers
    assert [m["loss"] for m in _metrics(tmp_path / "local")] == [m["loss"] for m in _metrics(ray_root)]
    assert local["eval"].result["sets"] == ray_run["eval"].result["sets"]


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


def test_grown_corpus_sketches_only_new_records_and_selects_over_the_union(tmp_path):
    """Scheduled curation: run, add 10% new records, rerun. Only the new records are sketched, the
    selection runs over the union, and it equals a from-scratch run over the grown corpus. In process
    (the cache rules are the executor's business only in who writes the parts: Ray workers' parts
    are tested in tests/integration/test_sketch_stage.py)."""
    from spice_ray.corpus.demo import write_demo_corpus

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n=200, seed=1)
    stages = "[ingest,sketch,select]"
    cfg = small_config(tmp_path / "run", **{"corpus.paths": f"[{corpus}]", "run.stages": stages, "run.executor": "local"})
    first = run_pipeline(cfg)
    n_old = first["ingest"].manifest["result"]["n_kept"]
    assert first["sketch"].manifest["result"]["n_computed"] == n_old
    old_uids, old_sketches = read_sketches(str(tmp_path / "run" / "sketch" / "sketches"))

    n_new = round(0.1 * n_old)
    rows = [{"instruction": f"Name a prime number larger than {1000 + 7 * i}.", "output": f"{1009 + 7 * i} is one to check."}
            for i in range(n_new)]
    (corpus / "grown.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = run_pipeline(cfg)
    assert not second["ingest"].skipped and second["models"].skipped
    assert second["ingest"].manifest["result"]["n_kept"] == n_old + n_new
    sketch = second["sketch"].manifest["result"]
    assert (sketch["n_computed"], sketch["n_cached"], sketch["n_sketches"]) == (n_new, n_old, n_old + n_new)
    assert second["select"].manifest["result"]["n_candidates"] == n_old + n_new
    uids, sketches = read_sketches(str(tmp_path / "run" / "sketch" / "sketches"))
    keep = np.isin(uids, old_uids)
    assert np.array_equal(uids[keep], old_uids) and np.array_equal(sketches[keep], old_sketches)  # reused as is

    # the same grown corpus from scratch (its own cache): the same sketches and the same selection
    fresh_cfg = small_config(tmp_path / "fresh", **{"corpus.paths": f"[{corpus}]", "run.stages": stages, "run.executor": "local"})
    fresh = run_pipeline(fresh_cfg)
    assert fresh["sketch"].manifest["result"]["n_computed"] == n_old + n_new
    fresh_uids, fresh_sketches = read_sketches(str(tmp_path / "fresh" / "sketch" / "sketches"))
    assert np.array_equal(fresh_uids, uids) and np.array_equal(fresh_sketches, sketches)
    got = pq.read_table(tmp_path / "run" / "select" / "selection.parquet")
    want = pq.read_table(tmp_path / "fresh" / "select" / "selection.parquet")
    assert got.column("uid").to_pylist() == want.column("uid").to_pylist()
    assert [r["sketched"] for r in list_runs(tmp_path / "run")] == [n_old, n_new]
