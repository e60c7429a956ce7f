"""The pipeline: stages under one run root, completion markers, manifests and resume.

    <root>/config.yaml            the resolved config of the latest invocation
    <root>/models/                built-in models materialized once (HF layout)
    <root>/ingest/                records.parquet, quarantine.parquet (demo_corpus/ when corpus.paths is empty)
    <root>/sketch/sketches/       sketch parquet files
    <root>/select/                selection.parquet, summary.json
    <root>/train/                 Ray Train storage (checkpoints) and model/ (Hugging Face format)
    <root>/eval/                  results.json: held-out loss / perplexity, base vs fine-tuned

Each stage directory holds ``manifest.json`` (inputs and their hashes, config, versions, counts,
timings) and, once the stage has finished, ``_SUCCESS`` holding the stage's key. The key is a
sha256 of the config sections the stage reads and of its upstream stages' keys; a rerun skips a
stage whose marker holds the same key and recomputes it (and so everything downstream) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from spice_ray.config import Config, dump_config, redact
from spice_ray.storage import Store, ensure_local, files_key

logger = logging.getLogger(__name__)

STAGES = ("models", "ingest", "sketch", "select", "train", "eval")
MARKER = "_SUCCESS"
MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("spice-ray", "torch", "ray", "transformers", "deepspeed", "peft", "numpy", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


class RunRoot:
    """A run's root: a local directory (absolute, so Ray workers on this machine read the same
    files) or an object-store URI, through :class:`spice_ray.storage.Store`."""

    def __init__(self, root: str | Path) -> None:
        self.store = Store(str(root))

    @property
    def uri(self) -> str:
        return self.store.uri()

    def stage_uri(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.store.uri(stage)

    def marker_key(self, stage: str) -> str | None:
        rel = f"{stage}/{MARKER}"
        return self.store.read_text(rel).strip() if self.store.exists(rel) else None

    def manifest(self, stage: str) -> dict[str, Any]:
        return json.loads(self.store.read_text(f"{stage}/{MANIFEST}"))


@dataclass
class StageDirs:
    """Where a stage writes: ``uri`` under the run root (what Ray workers write to directly), and
    ``local``, a local directory for driver-side files: the stage directory itself for a local
    root, else a staging directory uploaded to ``uri`` when the stage succeeds."""

    uri: str
    local: Path


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    manifest: dict[str, Any] = field(default_factory=dict)


def _stage_key(cfg: Config, stage: str, upstream_keys: list[str]) -> str:
    sections = {
        "models": ("model",),
        "ingest": ("corpus",),
        "sketch": ("model", "sketch"),
        "select": ("select",),
        "train": ("model", "train"),
        "eval": ("eval",),
    }[stage]
    parts = [stage, cfg.fingerprint(*sections), *upstream_keys]
    if stage in ("sketch", "eval"):
        parts.append(str(cfg.corpus.max_tokens))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


HASH_LIMIT = 512 * 1024**2  # files above this are checked by size only (hashing would re-read them)


def _sha256(store: Store, rel: str) -> str:
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path(rel)) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_digests(store: Store, stage: str, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file a stage's result points to inside the stage directory."""
    prefix = store.uri(stage) + "/"
    out: dict[str, dict[str, Any]] = {}
    for value in result.values():
        if not (isinstance(value, str) and value.startswith(prefix)):
            continue
        info = store.fs.get_file_info(store.path(f"{stage}/{value[len(prefix):]}"))
        infos = [info] if info.type == pafs.FileType.File else []
        if info.type == pafs.FileType.Directory:
            infos = [i for i in store.fs.get_file_info(pafs.FileSelector(info.path, recursive=True)) if i.type == pafs.FileType.File]
        for i in infos:
            rel = i.path[len(store.path()) + 1 :]
            out[rel] = {"bytes": i.size, "sha256": _sha256(store, rel) if i.size <= HASH_LIMIT else None}
    return dict(sorted(out.items()))


def verify_artifacts(store: Store, outputs: dict[str, dict[str, Any]]) -> list[str]:
    """The recorded artifacts that are missing, resized or changed (empty: all intact)."""
    damaged = []
    for rel, want in outputs.items():
        info = store.fs.get_file_info(store.path(rel))
        if info.type != pafs.FileType.File:
            damaged.append(f"{rel} missing")
        elif info.size != want["bytes"]:
            damaged.append(f"{rel} is {info.size} bytes, expected {want['bytes']}")
        elif want.get("sha256") and _sha256(store, rel) != want["sha256"]:
            damaged.append(f"{rel} content changed")
    return damaged


def run_stage(
    root: RunRoot,
    stage: str,
    key: str,
    cfg: Config,
    body: Callable[[StageDirs], dict[str, Any]],
    inputs: dict[str, Any],
) -> StageOutcome:
    """Run ``body(dirs)`` unless the stage's marker already holds ``key``.

    ``body`` returns the stage's counts/outputs; this writes the manifest and then the marker (the
    commit point: a stage without its marker is never trusted downstream).
    """
    if root.marker_key(stage) == key:
        manifest = root.manifest(stage)
        damaged = verify_artifacts(root.store, manifest.get("outputs", {}))
        if not damaged:
            logger.info("%s: finished earlier, skipped", stage)
            return StageOutcome(stage, skipped=True, manifest=manifest)
        logger.warning("%s: artifacts missing or corrupted (%s); recomputing", stage, "; ".join(damaged))
    elif root.marker_key(stage) is not None:
        logger.warning("%s: config or inputs changed since it finished; recomputing", stage)
    root.store.delete(f"{stage}/{MARKER}")
    started = time.time()
    logger.info("%s: started", stage)
    with tempfile.TemporaryDirectory(prefix=f"spice-{stage}-") as staging:
        local = Path(root.store.path(stage)) if root.store.is_local else Path(staging)
        local.mkdir(parents=True, exist_ok=True)
        result = body(StageDirs(uri=root.stage_uri(stage), local=local))
        if not root.store.is_local and any(Path(staging).iterdir()):
            root.store.upload_dir(staging, stage, replace=False)
    finished = time.time()
    manifest = {
        "stage": stage,
        "key": key,
        "inputs": inputs,
        "config": redact(cfg.model_dump(mode="json")),
        "versions": versions(),
        "result": result,
        "outputs": artifact_digests(root.store, stage, result),
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "finished": datetime.fromtimestamp(finished, UTC).isoformat(),
        "seconds": round(finished - started, 3),
    }
    root.store.write_text(f"{stage}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True, default=str))
    root.store.write_text(f"{stage}/{MARKER}", key + "\n")
    logger.info("%s: done in %.1fs", stage, finished - started)
    return StageOutcome(stage, skipped=False, manifest=manifest)


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None and "RAY_ADDRESS" not in os.environ:
        # a local single-machine Ray (the demo): keep it on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address=address, ignore_reinit_error=True)


def resolve_model(spec: str, dirs: StageDirs, seed: int) -> tuple[str, str]:
    """(URI every worker loads, local path to fingerprint). A built-in is written into the run
    root's models/ once; a local path, remote URI or hub id passes through."""
    from spice_ray.models import is_builtin, materialize_builtin

    if is_builtin(spec):
        name = spec.removeprefix("builtin:")
        local = materialize_builtin(spec, dirs.local / name, seed=seed)
        return f"{dirs.uri}/{name}", str(local)
    local = Path(spec).expanduser()
    resolved = str(local.resolve()) if local.exists() else spec
    return resolved, resolved


def run_pipeline(cfg: Config, *, stages: list[str] | None = None) -> dict[str, StageOutcome]:
    """Run the configured stages in order under ``cfg.run.root``; returns each stage's outcome."""
    from spice_ray.models import model_fingerprint

    root = RunRoot(cfg.run.root)
    root.store.write_text("config.yaml", dump_config(cfg, redacted=True))
    wanted = list(stages or cfg.run.stages)
    outcomes: dict[str, StageOutcome] = {}

    # models: materialize built-ins; record fingerprints (they key every downstream stage).
    def models_body(dirs: StageDirs) -> dict[str, Any]:
        proxy, proxy_local = resolve_model(cfg.model.proxy, dirs, cfg.model.init_seed)
        target, target_local = resolve_model(cfg.model.target, dirs, cfg.model.init_seed)
        tokenizer = resolve_model(cfg.model.tokenizer, dirs, cfg.model.init_seed)[0] if cfg.model.tokenizer else None
        return {
            "proxy": proxy,
            "target": target,
            "tokenizer": tokenizer or target,
            "proxy_tokenizer": tokenizer or proxy,
            "proxy_fingerprint": model_fingerprint(proxy_local),
            "target_fingerprint": model_fingerprint(target_local),
            "trust_remote_code": cfg.model.trust_remote_code,
        }

    models_key = _stage_key(cfg, "models", [])
    outcomes["models"] = run_stage(root, "models", models_key, cfg, models_body, {"proxy": cfg.model.proxy, "target": cfg.model.target})
    models = outcomes["models"].manifest["result"]
    models_key_full = hashlib.sha256((models_key + models["proxy_fingerprint"] + models["target_fingerprint"]).encode()).hexdigest()

    # ingest
    def ingest_body(dirs: StageDirs) -> dict[str, Any]:
        from spice_ray.corpus.ingest import QUARANTINE_FILE, RECORDS_FILE, ingest
        from spice_ray.models import load_tokenizer

        tokenizer = load_tokenizer(ensure_local(models["tokenizer"]), trust_remote_code=cfg.model.trust_remote_code)
        result = ingest(cfg.corpus, tokenizer, dirs.local)  # no corpus.paths: the demo corpus
        return {
            "records": f"{dirs.uri}/{RECORDS_FILE}",
            "quarantine": f"{dirs.uri}/{QUARANTINE_FILE}",
            "n_in": result.n_in,
            "n_kept": result.n_kept,
            "n_quarantined": result.n_quarantined,
            "reasons": result.reasons,
            "sources": result.sources,
            "files": result.files,
        }

    ingest_key = _stage_key(cfg, "ingest", [models_key_full, files_key(cfg.corpus.paths)])
    if "ingest" in wanted:
        outcomes["ingest"] = run_stage(root, "ingest", ingest_key, cfg, ingest_body, {"paths": cfg.corpus.paths or ["<demo>"]})

    # sketch
    # A warm-up trains with the train section's settings; an optimizer_state checkpoint is keyed by
    # its content. The sketch cache (cache_dir) is keyed by the sketch spec, so a rerun over a grown
    # corpus sketches only the new records; the manifest result holds the spec, the projection spec,
    # n_cached / n_computed and the fidelity report.
    sketch_extra = [cfg.fingerprint("train")] if cfg.sketch.warmup_fraction > 0 else []
    if cfg.sketch.optimizer_state:
        from spice_ray.sketch.stage import digest_path

        sketch_extra.append(digest_path(Path(ensure_local(cfg.sketch.optimizer_state)).expanduser()))
    sketch_key = _stage_key(cfg, "sketch", [models_key_full, ingest_key, *sketch_extra])
    if "sketch" in wanted:
        ingest_result = _require(root, "ingest", ingest_key)

        def sketch_body(dirs: StageDirs) -> dict[str, Any]:
            from spice_ray.sketch.stage import run_sketch_stage

            init_ray(cfg.run.ray_address)
            counts = run_sketch_stage(
                cfg,
                records_path=ingest_result["records"],
                model_path=models["proxy"],
                tokenizer_path=models["proxy_tokenizer"],
                out_dir=dirs.uri,
                cache_dir=cfg.sketch.cache_dir or root.store.uri("cache/sketches"),
                model_fingerprint=models["proxy_fingerprint"],
            )
            return {"sketches": f"{dirs.uri}/sketches", **counts}

        outcomes["sketch"] = run_stage(root, "sketch", sketch_key, cfg, sketch_body, {"records": ingest_result["records"], "proxy": models["proxy_fingerprint"]})

    # select
    select_key = _stage_key(cfg, "select", [sketch_key, *([files_key([cfg.select.target])] if cfg.select.target else [])])
    if "select" in wanted:
        sketch_result = _require(root, "sketch", sketch_key)

        def select_body(dirs: StageDirs) -> dict[str, Any]:
            from spice_ray.select.actor import run_select_stage

            init_ray(cfg.run.ray_address)
            summary = run_select_stage(sketch_result["sketches"], dirs.uri, cfg.select)
            return {"selection": f"{dirs.uri}/selection.parquet", **summary}

        outcomes["select"] = run_stage(root, "select", select_key, cfg, select_body, {"sketches": sketch_result["sketches"]})

    # train
    train_key = _stage_key(cfg, "train", [select_key, ingest_key])
    if "train" in wanted:
        ingest_result = _require(root, "ingest", ingest_key)
        select_result = _require(root, "select", select_key)

        def train_body(dirs: StageDirs) -> dict[str, Any]:
            from spice_ray.train import run_train_stage

            init_ray(cfg.run.ray_address)
            return run_train_stage(
                cfg,
                records_path=ingest_result["records"],
                selection_path=select_result["selection"],
                model_path=models["target"],
                tokenizer_path=models["tokenizer"],
                out_dir=dirs.uri,
                max_tokens=cfg.corpus.max_tokens,
            )

        outcomes["train"] = run_stage(root, "train", train_key, cfg, train_body, {"selection": select_result["selection"], "target": models["target_fingerprint"]})

    # eval: held-out loss / perplexity of the base and the fine-tuned target (spice_ray.evaluate)
    eval_key = _stage_key(cfg, "eval", [train_key, models_key_full, files_key(cfg.eval.paths)])
    if "eval" in wanted:
        train_result = _require(root, "train", train_key)
        select_result = _require(root, "select", select_key)

        def eval_body(dirs: StageDirs) -> dict[str, Any]:
            from spice_ray.evaluate import RESULTS_FILE, run_eval_stage

            init_ray(cfg.run.ray_address)
            return {"results_file": f"{dirs.uri}/{RESULTS_FILE}"} | run_eval_stage(
                cfg,
                out_dir=str(dirs.local),
                base_model=models["target"],
                tuned_model=train_result["model"],
                tokenizer_path=models["tokenizer"],
                selection_path=select_result["selection"],
            )

        outcomes["eval"] = run_stage(root, "eval", eval_key, cfg, eval_body, {"model": train_result["model"], "paths": cfg.eval.paths or ["<demo>"]})
    if any(not o.skipped for o in outcomes.values()):
        record_history(root, outcomes)
    return outcomes


HISTORY = "history"


def record_history(root: RunRoot, outcomes: dict[str, StageOutcome]) -> str:
    """Keep this invocation's stage results and selection under ``history/<time>-<key>/``.

    A scheduled curation reruns the same root over a grown corpus; the history keeps every run's
    selection and counts so runs can be listed (``spice-ray runs``) and compared.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    last = outcomes[list(outcomes)[-1]].manifest.get("key", "")[:8]
    entry = f"{HISTORY}/{stamp}-{last}"
    record = {
        "finished": datetime.now(UTC).isoformat(),
        "stages": {
            name: {"key": o.manifest.get("key"), "skipped": o.skipped, "seconds": o.manifest.get("seconds"), "result": o.manifest.get("result")}
            for name, o in outcomes.items()
        },
    }
    store = root.store
    for name in ("selection.parquet", "summary.json"):
        if "select" in outcomes and store.exists(f"select/{name}"):
            store.copy(f"select/{name}", f"{entry}/{name}")
    store.write_text(f"{entry}/run.json", json.dumps(record, indent=2, sort_keys=True, default=str))
    return store.uri(entry)


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per recorded invocation of a run root, oldest first."""
    store = Store(str(root))
    if not store.exists(HISTORY):
        return []
    entries = sorted(i.path for i in store.fs.get_file_info(pafs.FileSelector(store.path(HISTORY))) if i.type == pafs.FileType.Directory)
    rows = []
    for entry in entries:
        name = entry.rsplit("/", 1)[-1]
        if not store.exists(f"{HISTORY}/{name}/run.json"):
            continue
        stages = json.loads(store.read_text(f"{HISTORY}/{name}/run.json"))["stages"]
        ingest = (stages.get("ingest") or {}).get("result") or {}
        sketch = (stages.get("sketch") or {}).get("result") or {}
        select = (stages.get("select") or {}).get("result") or {}
        rows.append(
            {
                "run": name,
                "records": ingest.get("n_kept"),
                "quarantined": ingest.get("n_quarantined"),
                "sketched": sketch.get("n_computed", sketch.get("n_sketches")),
                "selected": select.get("k_selected"),
                "method": select.get("method"),
                "logdet": select.get("logdet"),
                "mean_conflict": select.get("mean_conflict"),
                "redone": [stage for stage in STAGES if stage in stages and not stages[stage]["skipped"]],
            }
        )
    return rows


def _require(root: RunRoot, stage: str, key: str) -> dict[str, Any]:
    if root.marker_key(stage) != key:
        raise RuntimeError(f"stage {stage!r} has not finished for this config under {root.uri}; run it first")
    return root.manifest(stage)["result"]
