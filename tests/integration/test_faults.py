"""Faults and bad input (issue #7): processes killed partway through a stage, crashes mid-write,
corrupted artifacts, bad config values, and the security promises of README's "Failure behaviour".

Processes are killed for real, by pid, with SIGKILL: a sketch actor (found through the Ray state
API), and the driver (``python -m spice_ray run`` in a subprocess attached to the session's Ray,
as a job driver on a cluster is).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.pipeline import RunRoot, run_pipeline
from spice_ray.select import read_sketches

REPO = Path(__file__).resolve().parents[2]
SMALL = ["sketch.dim=64", "sketch.batch_size=8", "sketch.fidelity_sample=0"]


def small_config(root: Path, *extra: str):
    return load_config(None, [f"run.root={root}", "corpus.demo_size=120", *SMALL, "run.stages=[ingest,sketch,select]", *extra])


def sketches_by_uid(root: Path) -> dict[str, np.ndarray]:
    uids, G = read_sketches(str(root / "sketch" / "sketches"))
    return dict(zip(uids.tolist(), G))


def mtimes(root: Path, stages: tuple[str, ...]) -> dict[str, int]:
    return {f"{s}/{name}": (root / s / name).stat().st_mtime_ns for s in stages for name in ("manifest.json", "_SUCCESS")}


def _state_address() -> str:
    """This session's Ray (other Ray instances may run on the machine: never auto-detect)."""
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actors(class_part: str) -> list:
    from ray.util.state import list_actors

    actors = list_actors(address=_state_address(), filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [a for a in actors if class_part in a.class_name]


# --------------------------------------------------------------------------- a sketch actor is killed


@pytest.fixture(scope="module")
def reference_run(ray_session, tmp_path_factory):
    """An uninterrupted run (ingest, sketch, select) of the small config."""
    root = tmp_path_factory.mktemp("reference")
    cfg = small_config(root)
    outcomes = run_pipeline(cfg)
    return cfg, root, outcomes


def test_sketch_actor_killed_mid_stage_gives_the_same_sketches(reference_run, tmp_path):
    """kill -9 the SketchWorker actor once the stage has written its first part: Ray Data restarts
    the actor and retries its batches, and every record's sketch equals the unkilled run's, bit for bit."""
    _, ref_root, _ = reference_run
    root = tmp_path / "killed"
    cfg = small_config(root)
    stage_dir = root / "cache" / "sketches"  # each finished batch becomes a part of the sketch cache at once
    seen: dict = {}

    def killer() -> None:
        try:
            deadline = time.time() + 300
            while time.time() < deadline and "pid" not in seen:
                parts = list(stage_dir.rglob("*.parquet")) if stage_dir.exists() else []
                if parts:
                    for actor in alive_actors("SketchWorker"):
                        seen.update(pid=actor.pid, actor_id=actor.actor_id, parts=len(parts),
                                    marker=(root / "sketch" / "_SUCCESS").exists())
                        os.kill(actor.pid, signal.SIGKILL)
                        break
                time.sleep(0.02)
        except Exception as e:  # surfaced by the test below
            seen["error"] = repr(e)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcomes = run_pipeline(cfg)
    thread.join(timeout=10)

    assert "error" not in seen, seen.get("error")
    assert "pid" in seen, "the sketch actor was never found running"
    assert not seen["marker"]  # killed while the stage ran
    result = outcomes["sketch"].manifest["result"]
    cache_parts = list(Path(result["cache"], "parts").glob("*.parquet"))
    assert seen["parts"] < len(cache_parts), "killed only after every part was written"
    from ray.util.state import list_actors

    (actor,) = list_actors(address=_state_address(), filters=[("actor_id", "=", seen["actor_id"])], detail=True)
    assert actor.num_restarts >= 1  # Ray restarted it (Ray Data pools: max_restarts=-1)

    assert result["n_sketches"] == result["n_records"] == result["n_computed"]
    got, want = sketches_by_uid(root), sketches_by_uid(ref_root)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[u], want[u]) for u in want)
    assert pq.read_table(root / "select" / "selection.parquet").equals(pq.read_table(ref_root / "select" / "selection.parquet"))


# -------------------------------------------------------------- corrupted artifacts after a stage finished


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))  # same size: only the sha256 tells


def test_corrupted_sketch_and_selection_are_recomputed(reference_run, caplog):
    cfg, root, _ = reference_run
    before = sketches_by_uid(root)
    selection = pq.read_table(root / "select" / "selection.parquet")

    part = sorted((root / "sketch" / "sketches").glob("*.parquet"))[0]
    _flip_middle(part)
    with caplog.at_level("WARNING", logger="spice_ray.pipeline"):
        outcomes = run_pipeline(cfg)
    assert "sketch: artifacts missing or corrupted" in caplog.text and "content changed" in caplog.text
    assert outcomes["ingest"].skipped and not outcomes["sketch"].skipped
    assert outcomes["select"].skipped  # same key, its own outputs intact
    after = sketches_by_uid(root)
    assert after.keys() == before.keys() and all(np.array_equal(after[u], before[u]) for u in before)

    caplog.clear()
    sel = root / "select" / "selection.parquet"
    sel.write_bytes(sel.read_bytes()[:-100])  # truncated
    with caplog.at_level("WARNING", logger="spice_ray.pipeline"):
        outcomes = run_pipeline(cfg)
    assert "select: artifacts missing or corrupted" in caplog.text
    assert outcomes["sketch"].skipped and not outcomes["select"].skipped
    assert pq.read_table(sel).equals(selection)


# ------------------------------------------------------------------------------ the driver is killed


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, SPICE_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "spice_ray", "run", "--verbose", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, condition, log: Path, timeout: float = 300) -> None:
    """SIGKILL the driver as soon as ``condition()`` holds (polled every 10 ms)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver finished (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"kill point not reached in {timeout}s:\n{log.read_text()[-3000:]}")


def _running_selections() -> list[str]:
    """Processes running the selection task (Ray titles a worker ``ray::<task>`` while it runs one)."""
    done = subprocess.run(["pgrep", "-af", "ray::select_to_dir"], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


def _wait_for_no_selector(timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while _running_selections() and time.time() < deadline:
        time.sleep(0.2)
    assert not _running_selections(), "the selection task outlived its driver"


def _synthetic_corpus(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"instruction": f"Item {i}: add {i % 97} and {i // 97}.", "output": str(i % 97 + i // 97), "source": "synthetic"}) + "\n")


def _seed_sketch_cache(cfg, root: Path, seed: int = 0) -> int:
    """Put a (synthetic) sketch of every record into the sketch cache, as an earlier run would have:
    the sketch stage then computes nothing, and selection gets thousands of candidates cheaply."""
    from spice_ray.sketch.stage import sketch_spec, spec_hash
    from spice_ray.sketch.worker import sketch_schema

    models = RunRoot(root).manifest("models")["result"]
    spec, _ = sketch_spec(cfg, model_path=models["proxy"], tokenizer_path=models["proxy_tokenizer"],
                          model_fingerprint=models["proxy_fingerprint"], state_path=None)
    from spice_ray.sketch.cache import SketchCache

    records = pq.read_table(root / "ingest" / "records.parquet", columns=["uid", "n_tokens"])
    n, d = records.num_rows, cfg.sketch.dim
    G = (np.random.default_rng(seed).standard_normal((n, d)) * 0.1).astype(np.float32)
    schema = sketch_schema(d, "float32")
    table = pa.table(
        {
            "uid": records.column("uid"),
            "sketch": pa.FixedSizeListArray.from_arrays(pa.array(G.reshape(-1)), d),
            "loss": pa.array(np.zeros(n, np.float32)),
            "grad_norm": pa.array(np.linalg.norm(G, axis=1).astype(np.float32)),
            "n_tokens": records.column("n_tokens"),
            "n_loss_tokens": records.column("n_tokens"),
        },
        schema=schema,
    )
    SketchCache(str(Path(cfg.sketch.cache_dir) / spec_hash(spec))).add(table)
    return n


def test_driver_killed_between_stages_and_inside_select(ray_session, tmp_path):
    """SIGKILL ``spice-ray run`` right after sketch/_SUCCESS appears, rerun and SIGKILL it once the
    selection has checkpointed, then rerun to the end: no finished stage is redone, the selection
    resumes from its checkpoint, and the picks equal an uninterrupted selection's."""
    from spice_ray.select.stage import select_to_dir

    root, cache, corpus = tmp_path / "run", tmp_path / "cache", tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus, 4000)
    overrides = [
        f"run.root={root}", f"corpus.paths=[{corpus}]", f"sketch.cache_dir={cache}", *SMALL,
        "select.fraction=1.0", "run.stages=[ingest,sketch,select]", "select.checkpoint_every=500",
    ]
    cfg = load_config(None, overrides)
    run_pipeline(cfg, stages=["ingest"])  # models + ingest (no Ray)
    n = _seed_sketch_cache(cfg, root)
    args = [arg for o in overrides for arg in ("--set", o)]
    args += ["--set", f"run.ray_address={_state_address()}"]

    # 1. killed between stages: right after the sketch stage's marker appears
    log_a = tmp_path / "a.log"
    _kill_when(_driver(args, log_a), lambda: (root / "sketch" / "_SUCCESS").exists(), log_a)
    _wait_for_no_selector()
    picks_file = root / "select" / "_checkpoint" / "picks.json"
    assert not (root / "select" / "_SUCCESS").exists() and not picks_file.exists()
    done = mtimes(root, ("models", "ingest", "sketch"))
    assert RunRoot(root).marker_key("sketch") == RunRoot(root).manifest("sketch")["key"]

    # 2. the rerun skips them; killed inside select once a checkpoint is written
    log_b = tmp_path / "b.log"
    _kill_when(_driver(args, log_b), picks_file.exists, log_b)
    text_b = log_b.read_text()
    for stage in ("models", "ingest", "sketch"):
        assert f"{stage}: finished earlier, skipped" in text_b
        assert f"{stage}: started" not in text_b
    assert mtimes(root, ("models", "ingest", "sketch")) == done
    _wait_for_no_selector()  # the selector actor dies with its driver
    checkpoint = json.loads(picks_file.read_text())
    assert 0 < len(checkpoint["picks"]) < n and not checkpoint["complete"]
    assert not (root / "select" / "_SUCCESS").exists() and not (root / "select" / "selection.parquet").exists()

    # 3. the rerun finishes: earlier stages skipped, selection resumed from the checkpoint
    log_c = tmp_path / "c.log"
    proc = _driver(args, log_c)
    assert proc.wait(timeout=600) == 0, log_c.read_text()[-3000:]
    text_c = log_c.read_text()
    assert f"{len(checkpoint['picks'])} picks to replay" in text_c, text_c[-3000:]
    for stage in ("ingest", "sketch"):
        assert re.search(rf"^{stage}\s+skipped \(done earlier\)", text_c, re.M), text_c[-2000:]
    assert re.search(rf"^select\s+[\d.]+s\s+spice: {n} of {n} ", text_c, re.M), text_c[-2000:]
    assert mtimes(root, ("models", "ingest", "sketch")) == done
    assert not picks_file.exists()

    got = pq.read_table(root / "select" / "selection.parquet")
    uids, _ = read_sketches(str(root / "sketch" / "sketches"))
    assert got.column("uid").to_pylist()[: len(checkpoint["picks"])] == uids[checkpoint["picks"]].tolist()
    select_to_dir(str(root / "sketch" / "sketches"), str(tmp_path / "uninterrupted"), cfg.select)
    want = pq.read_table(tmp_path / "uninterrupted" / "selection.parquet")
    assert got.column("uid").to_pylist() == want.column("uid").to_pylist()
    assert got.equals(want)  # same gains, conflicts and trace too


# ------------------------------------------------------------------------------- atomic artifacts


def _crashing_writer(monkeypatch) -> list[str]:
    """Make every parquet writer (ingest's included) write half its first table, then fail (a full disk)."""
    real = pq.ParquetWriter
    crashed: list[str] = []

    class Crashing(real):  # type: ignore[misc, valid-type]
        def write_table(self, table, *args, **kwargs):
            super().write_table(table.slice(0, max(1, table.num_rows // 2)), *args, **kwargs)
            crashed.append("crashed")
            raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(pq, "ParquetWriter", Crashing)
    return crashed


def test_crash_mid_ingest_write_leaves_nothing_a_later_stage_trusts(tmp_path, monkeypatch):
    root = tmp_path / "run"
    cfg = load_config(None, [f"run.root={root}", "corpus.demo_size=40"])
    crashed = _crashing_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        run_pipeline(cfg, stages=["ingest"])
    assert crashed  # it did crash mid-write
    ingest_dir = root / "ingest"
    left = sorted(p.name for p in ingest_dir.iterdir())
    assert left == ["demo_corpus"], left  # no records/quarantine (not even half), no temp file, no manifest, no marker
    with pytest.raises(RuntimeError, match="has not finished"):
        run_pipeline(cfg, stages=["sketch"])  # nothing downstream trusts it

    monkeypatch.undo()
    first = run_pipeline(cfg, stages=["ingest"])["ingest"]
    assert not first.skipped and pq.read_table(ingest_dir / "records.parquet").num_rows == first.manifest["result"]["n_kept"]
    good = (ingest_dir / "records.parquet").read_bytes()

    # a rerun (changed config) that crashes mid-write: the old file stays whole but is no longer trusted
    changed = load_config(None, [f"run.root={root}", "corpus.demo_size=40", "corpus.max_tokens=512"])
    _crashing_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        run_pipeline(changed, stages=["ingest"])
    assert (ingest_dir / "records.parquet").read_bytes() == good
    assert not (ingest_dir / "_SUCCESS").exists()
    assert not [p for p in ingest_dir.iterdir() if p.name.startswith(".")]
    with pytest.raises(RuntimeError, match="has not finished"):
        run_pipeline(changed, stages=["sketch"])
    with pytest.raises(RuntimeError, match="has not finished"):
        run_pipeline(cfg, stages=["sketch"])  # not even for the config that wrote it
    monkeypatch.undo()
    assert not run_pipeline(changed, stages=["ingest"])["ingest"].skipped


# ----------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "select.lam=oops"], "select.lam"),
        (["--set", "sketch.dimm=3"], "sketch.dimm"),
        (["--set", "train.epochs=0"], "train.epochs"),
        (["--config", "{bad_yaml}"], "select.alpha"),
    ],
)
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, args, key):
    bad_yaml = tmp_path / "job.yaml"
    bad_yaml.write_text("select:\n  alpha: -1\n")
    root = tmp_path / "run"
    args = [a.format(bad_yaml=bad_yaml) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "spice_ray", "run", "--root", str(root), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="60"),
    )
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert out.startswith("error: invalid config: ") and key in out
    assert "\n" not in out, out  # one line, even on a narrow terminal
    assert not root.exists()  # stopped before any work


# --------------------------------------------------------------------------------------- security


def _spy(monkeypatch, cls) -> list[dict]:
    calls: list[dict] = []
    real = cls.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_only_when_configured(tmp_path, monkeypatch, tiny_model_dir, trust):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spice_ray.config import ModelConfig, SketchConfig
    from spice_ray.sketch.worker import build_model, layer_shapes

    tok_calls = _spy(monkeypatch, AutoTokenizer)
    model_calls = _spy(monkeypatch, AutoModelForCausalLM)
    config_calls = _spy(monkeypatch, AutoConfig)
    root = tmp_path / "run"
    overrides = [f"run.root={root}", "corpus.demo_size=20"] + (["model.trust_remote_code=true"] if trust else [])
    cfg = load_config(None, overrides)
    run_pipeline(cfg, stages=["ingest"])  # the tokenizer loads through the config
    mcfg = ModelConfig(trust_remote_code=trust)
    layer_shapes(str(tiny_model_dir), mcfg, SketchConfig())
    build_model(str(tiny_model_dir), mcfg, SketchConfig(), "cpu")

    assert tok_calls and model_calls and config_calls
    for call in tok_calls + model_calls + config_calls:
        assert call.get("trust_remote_code", False) is trust, call
    assert all(call.get("use_safetensors") is True for call in model_calls)
    assert RunRoot(root).manifest("models")["result"]["trust_remote_code"] is trust


def test_weights_load_from_safetensors_only(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import load_causal_lm

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix == ".json":
            (pickled / f.name).write_bytes(f.read_bytes())
    model = load_causal_lm(str(tiny_model_dir))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert not list(pickled.glob("*.safetensors"))

    with pytest.raises(OSError, match="safetensors"):
        load_causal_lm(str(pickled))
    # the directory itself is loadable by a loader that accepts pickles: the refusal is the policy
    assert AutoModelForCausalLM.from_pretrained(str(pickled)).config.num_hidden_layers == model.config.num_hidden_layers
