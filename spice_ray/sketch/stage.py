"""The sketch stage: records → (cache lookup) → a pool of SketchWorkers (through the executor) → sketches.

Steps (``run_sketch_stage``):

1. Warm-up (``sketch.warmup_fraction > 0``): a seeded random slice of the records is written to
   ``<out>/warmup/selection.parquet`` and the proxy's LoRA is fine-tuned on it with the train
   stage's code (its settings, ``sketch.warmup_steps`` as max_steps); the sketches are then taken
   at that checkpoint (its LoRA weights and, for ``gradient=adam``, its moments). A finished
   warm-up with the same inputs is reused.
2. Spec: what a sketch depends on besides its record — proxy fingerprint, tokenizer, sketched
   parameters (LoRA config), checkpoint digest, projection spec (built from the model config on
   the meta device: no weights on the driver), loss spec (tokens, max_tokens, sgd/adam), dtype —
   hashed to ``spec_hash``.
3. Cache (``<cache_dir>/<spec_hash>/parts/``, :mod:`spice_ray.sketch.cache`): only records whose
   uid is not cached go to the workers, and every finished batch is written to the cache at once,
   so a killed run keeps its work. The stage's output ``<out>/sketches/`` is then the cached rows of
   the current records, sorted by uid: the same files whichever executor, worker count or cache
   history produced them.
4. Fidelity (``sketch.fidelity_sample``): a seeded sample of records is sketched once more with the
   exact per-sample vectors materialised, and the distortion of norms and inner products goes
   into the result (see ``worker.distortion``).

Nothing here imports Ray: the executor (:mod:`spice_ray.executor`) decides where workers run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray import progress
from spice_ray.config import Config
from spice_ray.executor import Executor, RecordBatches, Resources, read_record_batches, resources_of
from spice_ray.sketch.cache import SketchCache, publish
from spice_ray.sketch.projection import ProjectionSpec, stable_seed
from spice_ray.sketch.worker import SketchWorker, layer_shapes, sketch_schema
from spice_ray.storage import Store, ensure_local, is_remote

logger = logging.getLogger(__name__)

# Bump when the numbers a sketch holds change for the same spec (math, loss, projection code).
SKETCH_FORMAT = 4  # 3: every record padded to its own bucket width (worker.padded_width); 4: n_loss_tokens column


def digest_path(path: str | Path) -> str:
    """sha256 over a file, or over every file below a directory (relative names and contents)."""
    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _uri(base: str, *parts: str) -> str:
    """``base`` (a local path or a pyarrow-fs URI) joined with ``parts``; local paths are absolute."""
    base = base if is_remote(base) else str(Path(base).expanduser().resolve())
    return "/".join([base.rstrip("/"), *parts])


def _record_uids(records_path: str) -> list[str]:
    from spice_ray.storage import resolve_filesystem

    fs, path = resolve_filesystem(records_path)
    uids = pq.read_table(path, columns=["uid"], filesystem=fs).column("uid").to_pylist()
    if len(set(uids)) != len(uids):
        raise ValueError(f"the records at {records_path} hold duplicate uids")
    return uids


def sketch_spec(
    cfg: Config, *, model_path: str, tokenizer_path: str, model_fingerprint: str | None, state_path: str | None
) -> tuple[dict[str, Any], ProjectionSpec]:
    """Everything a record's sketch depends on besides the record, and the projection spec."""
    from spice_ray.models import model_fingerprint as fingerprint

    s, m = cfg.sketch, cfg.model
    projection = ProjectionSpec.for_shapes(layer_shapes(model_path, m, s), s.dim, s.seed)
    model_fp = model_fingerprint or fingerprint(model_path)
    same_tok = os.path.abspath(tokenizer_path) == os.path.abspath(model_path)
    spec = {
        "format": SKETCH_FORMAT,
        "model": model_fp,
        "tokenizer": None if same_tok else fingerprint(tokenizer_path),
        "parameters": s.parameters,
        "lora": {"r": m.proxy_lora.r, "alpha": m.proxy_lora.alpha, "target_modules": list(m.proxy_lora.target_modules),
                 "init_seed": m.init_seed}
        if s.parameters == "lora"
        else {"target_modules": list(m.proxy_lora.target_modules)},
        "state": digest_path(state_path) if state_path else None,
        "projection": projection.to_dict(),
        "loss": {"tokens": s.loss, "max_tokens": cfg.corpus.max_tokens, "gradient": s.gradient},
        "dtype": s.dtype,
        # batch padding changes the last bits of a sketch; record padding keeps the earlier spec hashes
        **({"padding": s.padding} if s.padding != "record" else {}),
    }
    return spec, projection


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def run_warmup(cfg: Config, executor: Executor, *, records_path: str, model_path: str, tokenizer_path: str, out_dir: str) -> dict[str, Any]:
    """Fine-tune the proxy's LoRA on a seeded random slice of the records; returns the checkpoint URI
    and counts. Reuses a finished warm-up of the same inputs under ``<out_dir>/warmup`` (a local
    directory or an object-store URI)."""
    from spice_ray.train import run_train_stage

    s = cfg.sketch
    store = Store(out_dir)
    uids = sorted(_record_uids(records_path))
    n = min(len(uids), max(cfg.train.num_workers, round(s.warmup_fraction * len(uids))))
    rng = np.random.default_rng(stable_seed(s.seed, "warmup"))
    picked = [uids[i] for i in sorted(rng.choice(len(uids), size=n, replace=False))]
    wcfg = cfg.model_copy(deep=True)
    wcfg.train.lora = True
    wcfg.model.target_lora = cfg.model.proxy_lora.model_copy()  # the warm-up trains the proxy's adapters
    # one worker, plain torch: its checkpoint is safetensors + JSON, read back without unpickling
    wcfg.train.num_workers, wcfg.train.engine, wcfg.train.offload = 1, "torch", False
    wcfg.train.max_steps = s.warmup_steps
    wcfg.train.epochs = 1 if s.warmup_steps is None else max(wcfg.train.epochs, 10**6)
    key = hashlib.sha256(
        json.dumps(
            {"model": wcfg.model.model_dump(mode="json"), "train": wcfg.train.model_dump(mode="json"), "proxy": model_path,
             "uids": hashlib.sha256("\n".join(picked).encode()).hexdigest(), "max_tokens": cfg.corpus.max_tokens},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    if store.is_done("warmup", key):
        logger.info("warm-up: reusing %s", store.uri("warmup"))
        return json.loads(store.read_text("warmup/warmup.json"))
    store.delete("warmup")
    selection = store.uri("warmup/selection.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"uid": pa.array(picked, pa.string()), "rank": pa.array(range(n), pa.int64())}), buf)
    store.write_bytes("warmup/selection.parquet", buf.getvalue())
    t0 = time.time()
    summary = run_train_stage(
        wcfg, executor, records_path=records_path, selection_path=selection, model_path=model_path,
        out_dir=store.uri("warmup/train"), max_tokens=cfg.corpus.max_tokens, tokenizer_path=tokenizer_path,
    )
    if not summary.get("checkpoint"):
        raise RuntimeError("the warm-up wrote no checkpoint")
    result = {
        "checkpoint": summary["checkpoint"],
        "n_records": n,
        "steps": summary["steps"],
        "loss": summary["loss"],
        "selection": selection,
        "seconds": round(time.time() - t0, 3),
    }
    store.write_text("warmup/warmup.json", json.dumps(result, indent=2))
    store.mark_done("warmup", key)
    return result


def run_sketch_stage(
    cfg: Config,
    executor: Executor,
    *,
    records_path: str,
    model_path: str,
    tokenizer_path: str,
    out_dir: str,
    cache_dir: str | None = None,
    model_fingerprint: str | None = None,
    resources: Resources | None = None,
) -> dict[str, Any]:
    """Sketch the records not in the cache; write ``out_dir/sketches/*.parquet`` holding exactly the
    records' sketches. ``cache_dir`` (or ``sketch.cache_dir``): the sketch cache; None: a cache
    under ``out_dir`` (``parts/``). Returns counts, the spec, the projection spec and the fidelity
    report for the manifest. ``resources``: each sketch actor's (default: ``resources_of(cfg.sketch)``)."""
    s = cfg.sketch
    t_start = time.time()
    resources = resources or resources_of(s)
    result: dict[str, Any] = {}
    state_path = s.optimizer_state
    if s.warmup_fraction > 0:
        warmup = run_warmup(cfg, executor, records_path=records_path, model_path=model_path, tokenizer_path=tokenizer_path, out_dir=out_dir)
        state_path = warmup["checkpoint"]
        result["warmup"] = warmup
    spec, projection = sketch_spec(
        cfg, model_path=model_path, tokenizer_path=tokenizer_path, model_fingerprint=model_fingerprint,
        state_path=ensure_local(state_path) if state_path else None,
    )
    key = spec_hash(spec)
    cache = SketchCache(_uri(cache_dir or s.cache_dir or _uri(out_dir, "cache"), key))
    cache.write_spec(spec)

    uids = _record_uids(records_path)
    current = frozenset(uids)
    todo = current - cache.uids()
    worker_kwargs = dict(
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        model_cfg=cfg.model.model_dump(),
        sketch_cfg=s.model_dump(),
        max_tokens=cfg.corpus.max_tokens,
        state_path=state_path,
        expected_projection=projection.digest(),
    )
    compute_seconds = _sketch_into_cache(executor, cache, records_path, todo, worker_kwargs, s.batch_size, resources)

    n_sketches = publish(cache.tables(current), sketch_schema(s.dim, s.dtype), Store(out_dir), "sketches")
    if n_sketches != len(uids):
        raise RuntimeError(f"sketch stage wrote {n_sketches} rows for {len(uids)} records")
    if s.fidelity_sample > 0 and uids:
        result["fidelity"] = _fidelity(executor, records_path, uids, worker_kwargs, s.fidelity_sample, s.seed, resources)
    logger.info("sketched %d records (%d cached), d=%d", len(uids), len(uids) - len(todo), s.dim)
    result.update(
        {
            "n_records": len(uids),
            "n_sketches": n_sketches,
            "n_cached": len(uids) - len(todo),
            "n_computed": len(todo),
            "compute_seconds": round(compute_seconds, 3),
            "records_per_second": round(len(todo) / compute_seconds, 3) if todo and compute_seconds > 0 else None,
            "seconds": round(time.time() - t_start, 3),
            "executor": executor.name,
            "num_workers": s.num_workers,
            "num_gpus_per_worker": executor.gpus(resources),
            "method": s.method,
            "gradient": s.gradient,
            "state": state_path,
            "spec_hash": key,
            "cache": cache.store.uri(),
            "projection": {k: v for k, v in projection.to_dict().items() if k != "layers"}
            | {"layers": [name for name, _, _ in projection.layers], "n_params": sum(o * i for _, o, i in projection.layers)},
        }
    )
    return result


def _sketch_into_cache(
    executor: Executor,
    cache: SketchCache,
    records_path: str,
    todo: frozenset[str],
    worker_kwargs: dict[str, Any],
    batch_size: int,
    resources: Resources,
) -> float:
    """Sketch the records ``todo`` on the executor's SketchWorkers, adding each finished batch to the
    cache as it arrives (a killed run keeps its finished batches); returns the seconds it took."""
    t_compute = time.time()
    if todo:
        batches = RecordBatches(records_path, ("uid", "messages", "n_tokens"), todo, batch_size)
        done = 0
        for table in executor.map_batches(SketchWorker, worker_kwargs, batches, resources):
            cache.add(table)  # persisted as it arrives: a killed run keeps its finished batches
            done += table.num_rows
            logger.info("sketch: %d / %d records", done, len(todo))
            progress.update("sketch (records)", done, len(todo))
    return time.time() - t_compute


def _fidelity(executor: Executor, records_path: str, uids: list[str], worker_kwargs: dict, k: int, seed: int, resources: Resources) -> dict:
    """Distortion of the sketches against exact per-sample gradients on a seeded sample of records."""
    ordered = sorted(uids)
    rng = np.random.default_rng(stable_seed(seed, "fidelity"))
    sample = frozenset(ordered[i] for i in rng.choice(len(ordered), size=min(k, len(ordered)), replace=False))
    batches = read_record_batches(RecordBatches(records_path, ("uid", "messages"), sample, len(sample)))
    table = pa.concat_tables(batches).sort_by("uid")
    return executor.call(_fidelity_task, worker_kwargs, table, resources=dataclasses.replace(resources, workers=1))


def _fidelity_task(worker_kwargs: dict, table: pa.Table) -> dict:
    return SketchWorker(**worker_kwargs).fidelity(table)
