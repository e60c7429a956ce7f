"""The bench's inner pipeline call (``run_pipeline(..., record=False)``) leaves the root's
status.json, latest.json and config.yaml to the user's own runs, and a failed inner call does not
mark the root failed: whole pipeline runs (stand-in stages, the local executor, no Ray). What the
terminal shows: tests/unit/test_terminal_output.py."""

from __future__ import annotations

import json
import logging

import pytest


def _fake_stages():
    from spice_ray.stages import Stage

    def make(name: str, field: str):
        def run(ctx):
            (ctx.dirs.local / "out.txt").write_text(f"{name} {ctx.cfg.corpus.demo_size}")
            return {field: f"{ctx.dirs.uri}/out.txt"}
        return run

    fields = {"models": "tokenizer_fingerprint", "ingest": "records", "sketch": "sketches", "select": "selection",
              "train": "model", "eval": "results_file"}
    needs = {"models": (), "ingest": ("models.tokenizer_fingerprint",), "sketch": ("ingest.records",),
             "select": ("sketch.sketches",), "train": ("select.selection",), "eval": ("train.model",)}
    reads = {"models": ("model.proxy",), "ingest": ("corpus",), "sketch": ("sketch",), "select": ("select",),
             "train": ("train",), "eval": ("eval",)}
    # each writes corpus.demo_size (not in its key: ``sees``), so a changed corpus changes every artifact
    return tuple(Stage(n, reads=reads[n], sees=("corpus.demo_size",), run=make(n, f), needs=needs[n]) for n, f in fields.items())


def test_an_inner_call_leaves_status_latest_and_config_to_the_users_run(tmp_path, monkeypatch, caplog):
    from spice_ray import pipeline
    from spice_ray.config import load_config
    from spice_ray.executor import LocalExecutor

    monkeypatch.setattr(pipeline, "STAGE_DEFS", _fake_stages())
    root = tmp_path / "root"
    cfg = load_config(None, [f"run.root={root}", "run.lease_ttl_s=30"])
    pipeline.run_pipeline(cfg, executor=LocalExecutor())
    before = {f: (root / f).read_text() for f in ("status.json", "latest.json", "config.yaml")}
    assert json.loads(before["status.json"])["state"] == "succeeded"

    changed = load_config(None, [f"run.root={root}", "run.lease_ttl_s=30", "corpus.demo_size=7"])
    with caplog.at_level(logging.DEBUG, logger="spice_ray.pipeline"):
        outcomes = pipeline.run_pipeline(changed, stages=["ingest", "sketch"], executor=LocalExecutor(), record=False)
        pipeline.run_pipeline(changed, stages=["ingest", "sketch"], executor=LocalExecutor(), record=False)  # a no-op
    assert not outcomes["ingest"].skipped  # it did work
    assert {f: (root / f).read_text() for f in before} == before
    runs = pipeline.list_runs(root)
    assert [r["inner"] for r in runs] == [False, True] and runs[1]["redone"] == ["ingest", "sketch"]
    assert json.loads((root / "history" / runs[1]["run"] / "status.json").read_text())["state"] == "succeeded"
    skipped = [r for r in caplog.records if "finished earlier" in r.getMessage()]
    assert skipped and all(r.levelno == logging.DEBUG for r in skipped)  # the inner no-op says nothing on the terminal

    pipeline.run_pipeline(cfg, executor=LocalExecutor())  # the user's next real run: recorded
    assert json.loads((root / "status.json").read_text())["run"] != json.loads(before["status.json"])["run"]


def test_a_failed_inner_call_does_not_mark_the_root_failed(tmp_path, monkeypatch):
    from spice_ray import pipeline
    from spice_ray.config import load_config
    from spice_ray.executor import LocalExecutor
    from spice_ray.stages import Stage

    monkeypatch.setattr(pipeline, "STAGE_DEFS", _fake_stages())
    root = tmp_path / "root"
    cfg = load_config(None, [f"run.root={root}", "run.lease_ttl_s=30"])
    pipeline.run_pipeline(cfg, executor=LocalExecutor())
    status = (root / "status.json").read_text()

    def boom(ctx):
        raise RuntimeError("boom")

    stages = tuple(Stage(s.name, reads=s.reads, run=boom, needs=s.needs) if s.name == "ingest" else s for s in _fake_stages())
    monkeypatch.setattr(pipeline, "STAGE_DEFS", stages)
    changed = load_config(None, [f"run.root={root}", "run.lease_ttl_s=30", "corpus.demo_size=9"])
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_pipeline(changed, stages=["ingest"], executor=LocalExecutor(), record=False)
    assert (root / "status.json").read_text() == status
    assert pipeline.list_runs(root)[-1]["state"] == "failed"
