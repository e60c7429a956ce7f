"""Run-root storage and secrets through real pipeline runs (the models and ingest stages, local
executor, no Ray): a secret in a URI stops a run before anything is written, and a damaged artifact
is detected and recomputed. The storage helpers themselves: tests/unit/test_storage.py."""

from __future__ import annotations

import pytest

from spice_ray.config import load_config
from spice_ray.pipeline import run_pipeline


def test_credentials_in_a_uri_are_refused_and_written_nowhere(tmp_path):
    """A secret in a URI stops the run before anything is written, with one line that does not
    repeat it; the redacted config.yaml of a run still masks secret-named keys."""
    from typer.testing import CliRunner

    from spice_ray.cli import app
    from spice_ray.config import ConfigError, redact

    root = tmp_path / "run"
    cases = (("run.ray_address", "http://me:hunter2@127.0.0.1:1"), ("corpus.paths", "[s3://AKIA:hunter2@bucket/c]"),
             ("model.proxy", "s3://b/m?token=hunter2"))
    for key, value in cases:
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"run.root={root}", f"{key}={value}"])
        assert "hunter2" not in str(err.value) and key in str(err.value)
    result = CliRunner().invoke(app, ["run", "--root", str(root), "--set", "corpus.paths=[s3://AKIA:hunter2@bucket/c]"])
    assert result.exit_code == 2 and "hunter2" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert not root.exists()
    cfg = load_config(None, [f"run.root={root}", "corpus.demo_size=20"])
    run_pipeline(cfg, stages=["ingest"])  # models + ingest: no Ray needed
    assert '"trust_remote_code": false' in (root / "models" / "manifest.json").read_text()
    assert redact({"hf_token": "hunter2", "tokenizer": "path/tok"}) == {"hf_token": "***", "tokenizer": "path/tok"}


def test_corrupted_artifact_is_detected_and_recomputed(tmp_path, caplog):
    cfg = load_config(None, [f"run.root={tmp_path / 'run'}", "corpus.demo_size=30"])
    first = run_pipeline(cfg, stages=["ingest"])["ingest"]
    records = tmp_path / "run" / "ingest" / "records.parquet"
    outputs = first.manifest["outputs"]
    assert outputs["ingest/records.parquet"]["bytes"] == records.stat().st_size
    good = records.read_bytes()
    assert run_pipeline(cfg, stages=["ingest"])["ingest"].skipped  # intact: skipped

    records.write_bytes(good[: len(good) // 2])  # a truncated artifact, as a crash or a bad copy leaves
    with caplog.at_level("WARNING"):
        again = run_pipeline(cfg, stages=["ingest"])["ingest"]
    assert not again.skipped and "records.parquet is" in caplog.text
    assert records.read_bytes() == good  # recomputed, identical

    records.unlink()  # a missing one too
    assert not run_pipeline(cfg, stages=["ingest"])["ingest"].skipped and records.exists()
