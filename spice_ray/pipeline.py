"""The pipeline: stages under one run root, completion markers, manifests and resume.

    <root>/config.yaml            the resolved config of the latest invocation
    <root>/models/                built-in models materialized once (HF layout)
    <root>/ingest/                records.parquet, quarantine.parquet (demo_corpus/ when corpus.paths is empty)
    <root>/sketch/sketches/       sketch parquet files
    <root>/select/                selection.parquet, summary.json
    <root>/train/                 Ray Train storage (checkpoints) and model/ (Hugging Face format)

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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from spice_ray.config import Config, dump_config

logger = logging.getLogger(__name__)

STAGES = ("models", "ingest", "sketch", "select", "train")
MARKER = "_SUCCESS"
MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path`` and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("spice-ray", "torch", "ray", "transformers", "deepspeed", "peft", "numpy", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@dataclass
class RunRoot:
    """A run's directory. Paths are absolute, so Ray workers on this machine read the same files."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        return self.path / stage

    def marker_key(self, stage: str) -> str | None:
        marker = self.stage_dir(stage) / MARKER
        return marker.read_text().strip() if marker.exists() else None

    def manifest(self, stage: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(stage) / MANIFEST).read_text())


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
    }[stage]
    parts = [stage, cfg.fingerprint(*sections), *upstream_keys]
    if stage == "sketch":
        parts.append(str(cfg.corpus.max_tokens))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def run_stage(
    root: RunRoot,
    stage: str,
    key: str,
    cfg: Config,
    body: Callable[[Path], dict[str, Any]],
    inputs: dict[str, Any],
) -> StageOutcome:
    """Run ``body(stage_dir)`` unless the stage's marker already holds ``key``.

    ``body`` returns the stage's counts/outputs; this writes the manifest and then the marker.
    """
    out_dir = root.stage_dir(stage)
    if root.marker_key(stage) == key:
        logger.info("%s: finished earlier, skipped", stage)
        return StageOutcome(stage, skipped=True, manifest=root.manifest(stage))
    if out_dir.exists():
        if (out_dir / MARKER).exists():
            logger.warning("%s: config or inputs changed since it finished; recomputing", stage)
            (out_dir / MARKER).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    logger.info("%s: started", stage)
    result = body(out_dir)
    finished = time.time()
    manifest = {
        "stage": stage,
        "key": key,
        "inputs": inputs,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "result": result,
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "finished": datetime.fromtimestamp(finished, UTC).isoformat(),
        "seconds": round(finished - started, 3),
    }
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    write_text_atomic(out_dir / MARKER, key + "\n")
    logger.info("%s: done in %.1fs", stage, finished - started)
    return StageOutcome(stage, skipped=False, manifest=manifest)


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, ignore_reinit_error=True)


def resolve_model(spec: str, root: RunRoot, role: str, seed: int) -> str:
    """A built-in is written into the run root once; a local path or hub id passes through."""
    from spice_ray.models import is_builtin, materialize_builtin

    if is_builtin(spec):
        return str(materialize_builtin(spec, root.stage_dir("models") / spec.removeprefix("builtin:"), seed=seed))
    local = Path(spec).expanduser()
    return str(local.resolve()) if local.exists() else spec


def run_pipeline(cfg: Config, *, stages: list[str] | None = None) -> dict[str, StageOutcome]:
    """Run the configured stages in order under ``cfg.run.root``; returns each stage's outcome."""
    from spice_ray.models import model_fingerprint

    root = RunRoot(Path(cfg.run.root))
    write_text_atomic(root.path / "config.yaml", dump_config(cfg))
    wanted = list(stages or cfg.run.stages)
    outcomes: dict[str, StageOutcome] = {}

    # models: materialize built-ins; record fingerprints (they key every downstream stage).
    def models_body(out_dir: Path) -> dict[str, Any]:
        proxy = resolve_model(cfg.model.proxy, root, "proxy", cfg.model.init_seed)
        target = resolve_model(cfg.model.target, root, "target", cfg.model.init_seed)
        tokenizer = cfg.model.tokenizer or target
        return {
            "proxy": proxy,
            "target": target,
            "tokenizer": resolve_model(tokenizer, root, "tokenizer", cfg.model.init_seed),
            "proxy_tokenizer": resolve_model(cfg.model.tokenizer or proxy, root, "tokenizer", cfg.model.init_seed),
            "proxy_fingerprint": model_fingerprint(proxy),
            "target_fingerprint": model_fingerprint(target),
            "trust_remote_code": cfg.model.trust_remote_code,
        }

    models_key = _stage_key(cfg, "models", [])
    outcomes["models"] = run_stage(root, "models", models_key, cfg, models_body, {"proxy": cfg.model.proxy, "target": cfg.model.target})
    models = outcomes["models"].manifest["result"]
    models_key_full = hashlib.sha256((models_key + models["proxy_fingerprint"] + models["target_fingerprint"]).encode()).hexdigest()

    # ingest
    def ingest_body(out_dir: Path) -> dict[str, Any]:
        from spice_ray.corpus.ingest import ingest
        from spice_ray.models import load_tokenizer

        tokenizer = load_tokenizer(models["tokenizer"], trust_remote_code=cfg.model.trust_remote_code)
        result = ingest(cfg.corpus, tokenizer, out_dir)  # no corpus.paths: the demo corpus
        return {
            "records": result.records_path,
            "quarantine": result.quarantine_path,
            "n_in": result.n_in,
            "n_kept": result.n_kept,
            "n_quarantined": result.n_quarantined,
            "reasons": result.reasons,
            "sources": result.sources,
            "files": result.files,
        }

    ingest_key = _stage_key(cfg, "ingest", [models_key_full, _corpus_inputs_key(cfg)])
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

        sketch_extra.append(digest_path(Path(cfg.sketch.optimizer_state).expanduser()))
    sketch_key = _stage_key(cfg, "sketch", [models_key_full, ingest_key, *sketch_extra])
    if "sketch" in wanted:
        ingest_result = _require(root, "ingest", ingest_key)

        def sketch_body(out_dir: Path) -> dict[str, Any]:
            from spice_ray.sketch.stage import run_sketch_stage

            init_ray(cfg.run.ray_address)
            counts = run_sketch_stage(
                cfg,
                records_path=ingest_result["records"],
                model_path=models["proxy"],
                tokenizer_path=models["proxy_tokenizer"],
                out_dir=str(out_dir),
                cache_dir=str(Path(cfg.sketch.cache_dir).expanduser() if cfg.sketch.cache_dir else root.path / "cache" / "sketches"),
                model_fingerprint=models["proxy_fingerprint"],
            )
            return {"sketches": str(out_dir / "sketches"), **counts}

        outcomes["sketch"] = run_stage(root, "sketch", sketch_key, cfg, sketch_body, {"records": ingest_result["records"], "proxy": models["proxy_fingerprint"]})

    # select
    select_key = _stage_key(cfg, "select", [sketch_key])
    if "select" in wanted:
        sketch_result = _require(root, "sketch", sketch_key)

        def select_body(out_dir: Path) -> dict[str, Any]:
            from spice_ray.select.actor import run_select_stage

            init_ray(cfg.run.ray_address)
            summary = run_select_stage(sketch_result["sketches"], str(out_dir), cfg.select)
            return {"selection": str(out_dir / "selection.parquet"), **summary}

        outcomes["select"] = run_stage(root, "select", select_key, cfg, select_body, {"sketches": sketch_result["sketches"]})

    # train
    train_key = _stage_key(cfg, "train", [select_key, ingest_key])
    if "train" in wanted:
        ingest_result = _require(root, "ingest", ingest_key)
        select_result = _require(root, "select", select_key)

        def train_body(out_dir: Path) -> dict[str, Any]:
            from spice_ray.train import run_train_stage

            init_ray(cfg.run.ray_address)
            return run_train_stage(
                cfg,
                records_path=ingest_result["records"],
                selection_path=select_result["selection"],
                model_path=models["target"],
                tokenizer_path=models["tokenizer"],
                out_dir=str(out_dir),
                max_tokens=cfg.corpus.max_tokens,
            )

        outcomes["train"] = run_stage(root, "train", train_key, cfg, train_body, {"selection": select_result["selection"], "target": models["target_fingerprint"]})
    if any(not o.skipped for o in outcomes.values()):
        record_history(root, outcomes)
    return outcomes


HISTORY = "history"


def record_history(root: RunRoot, outcomes: dict[str, StageOutcome]) -> Path:
    """Keep this invocation's stage results and selection under ``history/<time>-<key>/``.

    A scheduled curation reruns the same root over a grown corpus; the history keeps every run's
    selection and counts so runs can be listed (``spice-ray runs``) and compared.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    last = outcomes[list(outcomes)[-1]].manifest.get("key", "")[:8]
    entry = root.path / HISTORY / f"{stamp}-{last}"
    entry.mkdir(parents=True, exist_ok=True)
    record = {
        "finished": datetime.now(UTC).isoformat(),
        "stages": {
            name: {"key": o.manifest.get("key"), "skipped": o.skipped, "seconds": o.manifest.get("seconds"), "result": o.manifest.get("result")}
            for name, o in outcomes.items()
        },
    }
    if "select" in outcomes:
        select_dir = root.stage_dir("select")
        for name in ("selection.parquet", "summary.json"):
            if (select_dir / name).exists():
                shutil.copy2(select_dir / name, entry / name)
    write_text_atomic(entry / "run.json", json.dumps(record, indent=2, sort_keys=True, default=str))
    return entry


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per recorded invocation of a run root, oldest first."""
    rows = []
    for entry in sorted((Path(root) / HISTORY).glob("*/run.json")):
        stages = json.loads(entry.read_text())["stages"]
        ingest = (stages.get("ingest") or {}).get("result") or {}
        sketch = (stages.get("sketch") or {}).get("result") or {}
        select = (stages.get("select") or {}).get("result") or {}
        rows.append(
            {
                "run": entry.parent.name,
                "records": ingest.get("n_kept"),
                "quarantined": ingest.get("n_quarantined"),
                "sketched": sketch.get("n_computed", sketch.get("n_sketches")),
                "selected": select.get("k_selected"),
                "method": select.get("method"),
                "logdet": select.get("logdet"),
                "mean_conflict": select.get("mean_conflict"),
                "redone": [name for name, s in stages.items() if not s["skipped"]],
            }
        )
    return rows


def _corpus_inputs_key(cfg: Config) -> str:
    """A key over the corpus files' names, sizes and mtimes (content hashes go in the manifest)."""
    h = hashlib.sha256()
    for p in cfg.corpus.paths:
        path = Path(p).expanduser()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _require(root: RunRoot, stage: str, key: str) -> dict[str, Any]:
    if root.marker_key(stage) != key:
        raise RuntimeError(f"stage {stage!r} has not finished for this config under {root.path}; run it first")
    return root.manifest(stage)["result"]
