"""Scheduled curation on one run root: weekly reruns over a growing corpus retrain from the base into
versioned outputs, a tick with nothing new does nothing, and one writer holds a root at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spice_ray.config import load_config
from spice_ray.executor import LocalExecutor
from spice_ray.lease import LEASE_FILE, Lease, LeaseHeld
from spice_ray.pipeline import list_runs, run_pipeline
from spice_ray.storage import Store


def _config(root: Path, corpus: Path, *extra: str):
    return load_config(None, [
        f"run.root={root}", "run.executor=local", f"corpus.paths=[{corpus}]", "sketch.dim=32", "sketch.batch_size=16",
        "model.proxy=builtin:tiny-llama", "model.target=builtin:tiny-llama",  # untrained built-ins: no pre-training wait
        "sketch.fidelity_sample=0", "select.fraction=0.1", "train.max_steps=3", "train.micro_batch_size=2",
        "eval.demo_size=24", *extra,
    ])


def _corpus(path: Path, n: int = 120) -> Path:
    from spice_ray.corpus.demo import write_demo_corpus

    write_demo_corpus(path, n=n, seed=1)
    return path


def _grow(corpus: Path, n: int, start: int = 0) -> None:
    rows = [{"instruction": f"Name a prime number larger than {1000 + 7 * i}.", "output": f"{1009 + 7 * i} is one to check."}
            for i in range(start, start + n)]
    with (corpus / f"grown-{start}.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


class NoWork(LocalExecutor):
    """An executor that fails the test if any stage asks it for work."""

    def call(self, *a, **k):
        raise AssertionError("a no-op tick ran a task")

    def map_batches(self, *a, **k):
        raise AssertionError("a no-op tick started sketch workers")

    def train(self, *a, **k):
        raise AssertionError("a no-op tick started a training worker")


def test_weekly_runs_retrain_from_the_base_into_versioned_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    root, corpus = tmp_path / "root", _corpus(tmp_path / "corpus")
    cfg = _config(root, corpus)
    week1 = run_pipeline(cfg)
    model1 = Path(week1["train"].result["model"])
    weights1 = (model1 / "model.safetensors").read_bytes()

    _grow(corpus, 12)  # week 2: 10% new records
    week2 = run_pipeline(cfg)
    ingested = week2["ingest"].result
    assert (ingested["files_read"], ingested["files_reused"]) == (1, len(ingested["files"]) - 1)  # the new file only
    assert week2["sketch"].result["n_computed"] == 12
    train2 = week2["train"].result
    assert not week2["train"].skipped and train2["resumed_from_step"] is None  # from the base, not week 1's checkpoint
    model2 = Path(train2["model"])
    assert model2 != model1 and (model2 / "model.safetensors").read_bytes() != weights1
    assert (model1 / "model.safetensors").read_bytes() == weights1  # week 1's model is untouched
    assert Path(week2["eval"].result["results_file"]) != Path(week1["eval"].result["results_file"])

    week3 = run_pipeline(cfg, executor=NoWork())  # nothing new: no task, no worker
    assert all(o.skipped for o in week3.values())
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "noop" and not (root / LEASE_FILE).exists()

    runs = list_runs(root)
    assert [r["state"] for r in runs] == ["succeeded", "succeeded"]
    assert [r["model"] for r in runs] == [str(model1), str(model2)]
    for r in runs:
        AutoModelForCausalLM.from_pretrained(r["model"])  # every run's model stays readable
        entry = root / "history" / r["run"]
        assert (entry / "driver.log").read_text() and (entry / "eval_results.json").exists()
        assert json.loads((entry / "status.json").read_text())["state"] == "succeeded"
    latest = json.loads((root / "latest.json").read_text())
    assert root / latest["train"] == model2 and latest["run"].endswith(runs[-1]["run"])


def test_a_changed_config_trains_fresh_and_a_target_change_reruns_train_and_eval_only(tmp_path):
    root, corpus = tmp_path / "root", _corpus(tmp_path / "corpus")
    first = run_pipeline(_config(root, corpus))
    smaller = run_pipeline(_config(root, corpus, "select.fraction=0.05"))
    assert [s for s, o in smaller.items() if not o.skipped] == ["select", "train", "eval"]
    assert smaller["train"].result["resumed_from_step"] is None
    assert smaller["train"].result["model"] != first["train"].result["model"]

    other_target = run_pipeline(_config(root, corpus, "select.fraction=0.05", "model.target=builtin:tiny-qwen2"))
    assert [s for s, o in other_target.items() if not o.skipped] == ["models", "train", "eval"]
    assert other_target["train"].result["resumed_from_step"] is None

    # the target's LoRA is the target's: train and eval again; the proxy's LoRA: sketch again
    target_lora = ("select.fraction=0.05", "model.target=builtin:tiny-qwen2", "model.target_lora.r=4")
    assert [s for s, o in run_pipeline(_config(root, corpus, *target_lora)).items() if not o.skipped] == ["train", "eval"]
    proxy_lora = run_pipeline(_config(root, corpus, *target_lora, "model.proxy_lora.r=4"))
    assert [s for s, o in proxy_lora.items() if not o.skipped][:2] == ["sketch", "select"]
    assert proxy_lora["models"].skipped and proxy_lora["ingest"].skipped


def test_a_second_writer_fails_fast_and_the_first_finishes(tmp_path):
    root, corpus = tmp_path / "root", _corpus(tmp_path / "corpus")
    cfg = _config(root, corpus)
    outcome: dict = {}
    first = threading.Thread(target=lambda: outcome.update(run_pipeline(cfg)))
    first.start()
    deadline = time.time() + 60
    while not (root / LEASE_FILE).exists() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    with pytest.raises(LeaseHeld, match="is held by run"):
        run_pipeline(cfg)
    assert time.time() - t0 < 5
    first.join(timeout=300)
    assert outcome["eval"].result["sets"] and not (root / LEASE_FILE).exists()


def test_a_dead_drivers_lease_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "root"))
    code = f"import time; from spice_ray.lease import Lease; from spice_ray.storage import Store; Lease(Store({str(store.root)!r})).acquire(); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld):
        Lease(store, settle=0).acquire()  # alive: held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    taken = Lease(store, settle=0).acquire()  # dead process on this host: taken over at once
    assert json.loads(store.read_text(LEASE_FILE))["run_id"] == taken.run_id
    taken.release()

    # a lease from another host: live while its heartbeat is fresh, stale after its ttl
    other = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "heartbeat": time.time(), "ttl": 120}
    store.write_text(LEASE_FILE, json.dumps(other))
    with pytest.raises(LeaseHeld, match="another-host"):
        Lease(store, settle=0).acquire()
    store.write_text(LEASE_FILE, json.dumps(other | {"heartbeat": time.time() - 121}))
    Lease(store, settle=0).acquire().release()
    assert not store.exists(LEASE_FILE)


def test_cli_exit_code_3_when_the_root_is_held(tmp_path):
    from typer.testing import CliRunner

    from spice_ray.cli import app

    store = Store(str(tmp_path / "root"))
    with Lease(store, settle=0):
        result = CliRunner().invoke(app, ["run", "--root", str(tmp_path / "root"), "--executor", "local"])
    assert result.exit_code == 3 and "is held by run" in result.output


def test_a_failed_run_leaves_its_status_and_traceback(tmp_path):
    from spice_ray.corpus.ingest import IngestError

    root = tmp_path / "root"
    cfg = _config(root, tmp_path / "missing-corpus")
    with pytest.raises(IngestError):
        run_pipeline(cfg)
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "failed" and "IngestError" in status["error"] and not (root / LEASE_FILE).exists()
    entry = root / status["entry"]
    assert "Traceback" in (entry / "driver.log").read_text() and json.loads((entry / "run.json").read_text())["state"] == "failed"
