"""Stage keys computed directly (issue #21): ``pipeline.stage_key`` over hand-made upstream results,
no stage run. A key is a sha256 of what the stage declares in ``stages.STAGES``: the config values it
``reads``, what it ``needs`` of upstream results (an artifact's content digest, or a field's value)
and its ``inputs`` (files outside the root). So a change reruns the stages that read it and, through
the digests, the stages downstream of an artifact whose bytes changed; a field no stage reads changes
no key. Whole runs that skip and recompute by these keys: tests/e2e/test_pipeline.py.

The hand-made world: ``models`` reports fingerprints of the named models (every built-in shares one
tokenizer, so a built-in target of another family keeps the tokenizer's fingerprint); every other
stage writes its artifacts under ``stage_rel(stage, key)`` with a digest that changes with its key (a
rerun under a new key writes new bytes) unless the test says it wrote the same bytes. Nothing is
written but the run root's empty directory under tmp_path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from spice_ray.config import Config, load_config
from spice_ray.pipeline import stage_key, stage_rel
from spice_ray.stages import STAGE_NAMES, STAGES
from spice_ray.storage import Store

# What each stage's result points to inside its directory (a trailing "/": a directory of files).
ARTIFACTS = {
    "ingest": {"records": "records.parquet", "quarantine": "quarantine.parquet"},
    "sketch": {"sketches": "sketches/"},
    "select": {"selection": "selection.parquet"},
    "train": {"model": "model/"},
    "eval": {"results_file": "results.json"},
}
DOWNSTREAM_OF_SKETCH = {"sketch", "select", "train", "eval"}


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def models_result(cfg: Config) -> dict[str, Any]:
    """What ``stages.run_models`` reports, with fingerprints made up from the model names."""
    m = cfg.model

    def tokenizer(model: str) -> str:
        return m.tokenizer or ("builtin:tokenizer" if model.startswith("builtin:") else model)

    return {
        "proxy": m.proxy, "target": m.target, "tokenizer": m.tokenizer or m.target, "proxy_tokenizer": m.tokenizer or m.proxy,
        "proxy_fingerprint": _sha("weights", m.proxy, str(m.init_seed)),
        "target_fingerprint": _sha("weights", m.target, str(m.init_seed)),
        "tokenizer_fingerprint": _sha("tokenizer", tokenizer(m.target)),
        "proxy_tokenizer_fingerprint": _sha("tokenizer", tokenizer(m.proxy)),
        "trust_remote_code": m.trust_remote_code,
    }


def manifest(stage_name: str, key: str, cfg: Config, store: Store, same_bytes: frozenset[str]) -> dict[str, Any]:
    """A finished stage's manifest as ``pipeline.run_stage`` writes it: key, result, artifact digests."""
    if stage_name == "models":
        return {"key": key, "result": models_result(cfg), "outputs": {}}
    stage = next(s for s in STAGES if s.name == stage_name)
    rel_dir = stage_rel(stage, key)
    content = "same bytes" if stage_name in same_bytes else key
    result: dict[str, Any] = {"holdout": None} if stage_name == "ingest" else {}
    outputs = {}
    for field_name, name in ARTIFACTS[stage_name].items():
        rel = f"{rel_dir}/{name.rstrip('/')}"
        result[field_name] = store.uri(rel)
        file_rel = f"{rel}/part-00000" if name.endswith("/") else rel
        outputs[file_rel] = {"bytes": 1000, "sha256": _sha(stage_name, field_name, content)}
    return {"key": key, "result": result, "outputs": outputs}


def keys(cfg: Config, store: Store, *, same_bytes: frozenset[str] = frozenset()) -> dict[str, str]:
    """Every stage's key, in order, each over the manifests of the stages before it (as
    ``pipeline._run_stages`` computes them). ``same_bytes``: stages whose rerun wrote the same bytes."""
    manifests: dict[str, dict[str, Any]] = {}
    out = {}
    for stage in STAGES:
        out[stage.name] = stage_key(stage, cfg, {up: manifests[up] for up in stage.upstream}, store)
        manifests[stage.name] = manifest(stage.name, out[stage.name], cfg, store, same_bytes)
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "root"))


@pytest.fixture
def base(store: Store) -> dict[str, str]:
    return keys(Config(), store)


def test_every_stage_has_a_key_and_all_differ(base):
    assert tuple(base) == STAGE_NAMES
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in base.values())
    assert len(set(base.values())) == len(base)


def test_keys_are_deterministic(store, tmp_path, base):
    assert keys(Config(), store) == base
    assert keys(load_config(None, []), store) == base  # the defaults, however they are built
    a = keys(load_config(None, ["sketch.dim=128", "select.lam=0.5", "train.lr=0.001"]), store)
    b = keys(load_config(None, ["train.lr=0.001", "select.lam=0.5", "sketch.dim=128"]), store)
    assert a == b  # the order of the overrides does not matter
    assert keys(Config(), Store(str(tmp_path / "elsewhere"))) == base  # nor where the root is


def test_model_target_changes_train_and_eval_keys_only(store, base):
    after = keys(load_config(None, ["model.target=builtin:tiny-qwen2-pretrained"]), store)
    assert changed(base, after) == {"models", "train", "eval"}
    assert [after[s] for s in ("ingest", "sketch", "select")] == [base[s] for s in ("ingest", "sketch", "select")]


@pytest.mark.parametrize("override", ["sketch.dim=128", "sketch.seed=1", "sketch.loss=all", "sketch.warmup_fraction=0.1",
                                      "sketch.dtype=float16", "model.proxy_lora.r=4"])
def test_a_sketch_field_changes_sketch_and_everything_downstream(store, base, override):
    after = keys(load_config(None, [override]), store)
    assert changed(base, after) == DOWNSTREAM_OF_SKETCH


def test_a_sketch_rerun_that_writes_the_same_bytes_stops_there(store):
    """sketch.num_workers is in the sketch section, so the sketch stage reruns; its sketches come back
    bit for bit the same (the cache, the determinism), so select, train and eval keep their keys."""
    same = frozenset({"sketch"})
    before = keys(Config(), store, same_bytes=same)
    assert changed(before, keys(load_config(None, ["sketch.num_workers=4"]), store, same_bytes=same)) == {"sketch"}
    assert changed(before, keys(load_config(None, ["sketch.num_workers=4"]), store)) == DOWNSTREAM_OF_SKETCH  # other bytes


def test_with_a_warm_up_the_train_section_keys_the_sketch(store):
    """A warm-up fine-tunes the proxy with the train section's settings before sketching, so the
    sketch key covers the train section then (``stages.sketch_inputs``), and only then."""
    warm = ["sketch.warmup_fraction=0.1"]
    before = keys(load_config(None, warm), store)
    assert changed(before, keys(load_config(None, [*warm, "train.lr=0.001"]), store)) == DOWNSTREAM_OF_SKETCH
    assert changed(keys(Config(), store), keys(load_config(None, ["train.lr=0.001"]), store)) == {"train", "eval"}


@pytest.mark.parametrize("overrides", [
    ["run.lease_ttl_s=30"],
    ["run.executor=local"],
    ["run.stages=[ingest, sketch]"],
    ["run.ray_address=127.0.0.1:6379"],
    ["run.root=/somewhere/else"],
    ["run.executor=local", "run.lease_ttl_s=5", "run.stages=[ingest]"],
], ids=" ".join)
def test_fields_no_stage_reads_change_no_key(store, base, overrides):
    assert keys(load_config(None, overrides), store) == base


@pytest.mark.parametrize(("override", "expected"), [
    ("corpus.demo_seed=3", {"ingest", *DOWNSTREAM_OF_SKETCH}),
    ("corpus.max_tokens=512", {"ingest", *DOWNSTREAM_OF_SKETCH}),
    ("model.proxy=builtin:tiny-qwen2-pretrained", {"models", *DOWNSTREAM_OF_SKETCH}),
    ("select.lam=0.5", {"select", "train", "eval"}),
    ("train.lr=0.001", {"train", "eval"}),
    ("model.target_lora.r=4", {"train", "eval"}),
    ("eval.batch_size=4", {"eval"}),
])
def test_a_change_reruns_its_readers_and_what_their_bytes_feed(store, base, override, expected):
    assert changed(base, keys(load_config(None, [override]), store)) == expected


def test_a_rewritten_input_file_changes_the_key_of_the_stage_that_reads_it(store, tmp_path):
    """select.target is an input file outside the root: its path, size and mtime are in the select key."""
    target = tmp_path / "target.txt"
    target.write_text("uid-1\n")
    cfg = load_config(None, [f"select.target={target}"])
    before = keys(cfg, store)
    assert keys(cfg, store) == before
    target.write_text("uid-1\nuid-2\n")
    assert changed(before, keys(cfg, store)) == {"select", "train", "eval"}
