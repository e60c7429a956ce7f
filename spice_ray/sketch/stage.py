"""The sketch stage's Ray shell: records → (cache lookup) → Ray Data actor pool of SketchWorkers → sketches.

Steps (``run_sketch_stage``):

1. Warm-up (``sketch.warmup_fraction > 0``): a seeded random slice of the records is written to
   ``<out>/warmup/selection.parquet`` and the proxy's LoRA is fine-tuned on it by the train stage
   (``run_train_stage``: its settings, ``sketch.warmup_steps`` as max_steps, ZeRO-2); the sketches
   are then taken at that checkpoint (its LoRA weights and, for ``gradient=adam``, its moments). A
   finished warm-up with the same inputs is reused.
2. Spec: what a sketch depends on besides its record — proxy fingerprint, tokenizer, sketched
   parameters (LoRA config), checkpoint digest, projection spec (built from the model config on
   the meta device: no weights on the driver), loss spec (tokens, max_tokens, sgd/adam), dtype —
   hashed to ``spec_hash``.
3. Cache (``<cache_dir>/<spec_hash>/parts/*.parquet``): the driver reads the cached uids (one
   column; it may hold N uids, never N sketches) and only ``records − cached`` go to the actor
   pool. Their parts are written to a temporary directory and moved into the cache when complete.
   The stage's output ``<out>/sketches/`` is then the cached rows filtered to the current records'
   uids (one row per uid, even if concurrent runs appended a uid twice), so ``select`` reads
   exactly the current records. Without a cache dir, the computed parts are the output.
4. Fidelity (``sketch.fidelity_sample``): a seeded sample of records is sketched once more with the
   exact per-sample vectors materialised, and the distortion of norms and inner products goes
   into the result (see ``worker.distortion``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from spice_ray.config import Config
from spice_ray.sketch.projection import ProjectionSpec, stable_seed
from spice_ray.storage import Store, ensure_local, is_remote, move_dir, resolve_filesystem
from spice_ray.sketch.worker import SketchWorker, layer_shapes, sketch_schema

logger = logging.getLogger(__name__)

# Bump when the numbers a sketch holds change for the same spec (math, loss, projection code).
SKETCH_FORMAT = 3  # 3: every record padded to its own bucket width (worker.padded_width)
SPEC_FILE = "spec.json"


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


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


def _parquet_files(uri: str) -> list[str]:
    """Filesystem paths (no scheme) of the parquet files below ``uri``; [] when it does not exist."""
    fs, root = resolve_filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    )


def _delete_dir(uri: str) -> None:
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _record_uids(records_path: str) -> list[str]:
    uids = pq.read_table(records_path, columns=["uid"]).column("uid").to_pylist()
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
        "lora": {"r": m.lora_r, "alpha": m.lora_alpha, "target_modules": list(m.lora_target_modules), "init_seed": m.init_seed}
        if s.parameters == "lora"
        else {"target_modules": list(m.lora_target_modules)},
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


def run_warmup(cfg: Config, *, records_path: str, model_path: str, tokenizer_path: str, out_dir: str) -> dict[str, Any]:
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
    wcfg.train.zero_stage = 2  # ZeRO-2 optimizer states are what the sketch can read back
    wcfg.train.max_steps = s.warmup_steps
    wcfg.train.epochs = 1 if s.warmup_steps is None else max(wcfg.train.epochs, 10**6)
    key = hashlib.sha256(
        json.dumps(
            {"model": wcfg.model.model_dump(mode="json"), "train": wcfg.train.model_dump(mode="json"), "proxy": model_path,
             "uids": hashlib.sha256("\n".join(picked).encode()).hexdigest(), "max_tokens": cfg.corpus.max_tokens},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    if store.exists("warmup/_DONE") and store.read_text("warmup/_DONE").strip() == key:
        logger.info("warm-up: reusing %s", store.uri("warmup"))
        return json.loads(store.read_text("warmup/warmup.json"))
    store.delete("warmup")
    selection = store.uri("warmup/selection.parquet")
    store.fs.create_dir(store.path("warmup"), recursive=True)
    pq.write_table(
        pa.table({"uid": pa.array(picked, pa.string()), "rank": pa.array(range(n), pa.int64())}),
        store.path("warmup/selection.parquet"), filesystem=store.fs,
    )
    t0 = time.time()
    summary = run_train_stage(
        wcfg, records_path=records_path, selection_path=selection, model_path=model_path,
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
    store.write_text("warmup/_DONE", key + "\n")
    return result


def _keep_uids(batch: pa.Table, values_ref, keep: bool, drop_ref=None) -> pa.Table:
    """Rows whose uid is (keep=True) / is not (keep=False) in the referenced array. ``drop_ref``:
    {file path: uids} rows to drop from those files (duplicates left by concurrent appends)."""
    mask = pc.is_in(batch.column("uid"), value_set=ray.get(values_ref))
    if not keep:
        mask = pc.invert(mask)
    if drop_ref is not None and "path" in batch.column_names:
        for path, uids in ray.get(drop_ref).items():
            dup = pc.and_(pc.equal(batch.column("path"), path), pc.is_in(batch.column("uid"), value_set=uids))
            mask = pc.and_(mask, pc.invert(dup))
    if "path" in batch.column_names:
        batch = batch.drop_columns(["path"])
    return batch.filter(mask)


def _sort_by_length(batch: pa.Table) -> pa.Table:
    return batch.sort_by([("n_tokens", "ascending"), ("uid", "ascending")])


def _cached_uids(cache_uri: str) -> tuple[set[str], dict[str, pa.Array]]:
    """The uids in the cache parts, and per file the duplicate uids to skip (first file wins)."""
    fs, _ = resolve_filesystem(cache_uri)
    seen: set[str] = set()
    dups: dict[str, list[str]] = {}
    for f in _parquet_files(cache_uri):
        for u in pq.read_table(f, columns=["uid"], filesystem=fs).column("uid").to_pylist():
            if u in seen:
                dups.setdefault(f, []).append(u)
            else:
                seen.add(u)
    return seen, {f: pa.array(us, pa.string()) for f, us in dups.items()}


def _move_parts(src_uri: str, dst_uri: str) -> int:
    """Move every parquet part from ``src_uri`` into ``dst_uri`` under a unique name."""
    fs, dst = resolve_filesystem(dst_uri)
    fs.create_dir(dst, recursive=True)
    files = _parquet_files(src_uri)
    for f in files:
        fs.move(f, f"{dst}/{uuid.uuid4().hex}-{f.rsplit('/', 1)[-1]}")
    return len(files)


def run_sketch_stage(
    cfg: Config,
    *,
    records_path: str,
    model_path: str,
    tokenizer_path: str,
    out_dir: str,
    cache_dir: str | None = None,
    model_fingerprint: str | None = None,
) -> dict:
    """Sketch the records (only those not cached); write ``out_dir/sketches/*.parquet`` holding exactly
    the records' sketches. ``cache_dir`` (or ``sketch.cache_dir``): the sketch cache; None: none.
    Returns counts, the spec, the projection spec and the fidelity report for the manifest."""
    s = cfg.sketch
    t_start = time.time()
    num_gpus = s.num_gpus_per_worker if s.num_gpus_per_worker is not None else (1 if cluster_has_gpus() else 0)
    cache_root = cache_dir or s.cache_dir
    result: dict[str, Any] = {}

    state_path = s.optimizer_state
    if s.warmup_fraction > 0:
        warmup = run_warmup(cfg, records_path=records_path, model_path=model_path, tokenizer_path=tokenizer_path, out_dir=out_dir)
        state_path = warmup["checkpoint"]
        result["warmup"] = warmup
    spec, projection = sketch_spec(
        cfg, model_path=model_path, tokenizer_path=tokenizer_path, model_fingerprint=model_fingerprint,
        state_path=ensure_local(state_path) if state_path else None,
    )
    key = spec_hash(spec)

    uids = _record_uids(records_path)
    n_records = len(uids)
    cache_parts = _uri(cache_root, key, "parts") if cache_root else None
    cached: set[str] = set()
    dups: dict[str, pa.Array] = {}
    if cache_parts is not None:
        fs, spec_file = resolve_filesystem(_uri(cache_root, key, SPEC_FILE))
        if fs.get_file_info(spec_file).type == pafs.FileType.NotFound:
            fs.create_dir(spec_file.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(spec_file) as fh:
                fh.write(json.dumps(spec, indent=2, sort_keys=True).encode())
        cached, dups = _cached_uids(cache_parts)
    current = set(uids)
    n_cached = len(current & cached)
    todo = n_records - n_cached

    worker_kwargs = dict(
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        model_cfg=cfg.model.model_dump(),
        sketch_cfg=s.model_dump(),
        max_tokens=cfg.corpus.max_tokens,
        state_path=state_path,
        expected_projection=projection.digest(),
    )
    tmp = _uri(out_dir, "sketches.tmp")
    _delete_dir(tmp)
    t_compute = time.time()
    if todo:
        ds = ray.data.read_parquet(records_path).select_columns(["uid", "messages", "n_tokens"])
        if n_cached:
            cached_ref = ray.put(pa.array(sorted(cached), pa.string()))
            ds = ds.map_batches(_keep_uids, fn_kwargs={"values_ref": cached_ref, "keep": False}, batch_format="pyarrow")
        # Length grouping without a global sort (an all-to-all shuffle): windows of 16 worker
        # batches are sorted by n_tokens in place, so each worker batch (sketch.batch_size
        # consecutive rows) spans a narrow range of lengths; the worker then packs sub-batches of
        # one padded width under the token budget. The repartition (order-preserving, no shuffle)
        # spreads the work over the actors (one parquet file may be one block).
        ds = ds.map_batches(_sort_by_length, batch_size=16 * s.batch_size, batch_format="pyarrow")
        n_blocks = max(1, min(todo // max(1, s.batch_size), 4 * s.num_workers))
        ds = ds.repartition(n_blocks)
        sketches = ds.map_batches(
            SketchWorker,
            fn_constructor_kwargs=worker_kwargs,
            batch_size=s.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=s.num_workers),
            num_cpus=s.num_cpus_per_worker,
            num_gpus=num_gpus,
        )
        # write_parquet appends to what is there: write into a fresh temporary directory and move
        # it only once every block is written, so a crash never leaves a half set.
        sketches.write_parquet(tmp)
    compute_seconds = time.time() - t_compute

    final = _uri(out_dir, "sketches")
    if cache_parts is not None:
        n_parts = _move_parts(tmp, cache_parts) if todo else 0
        _delete_dir(tmp)
        logger.info("sketch cache %s: %d hits, %d computed (%d new parts)", cache_parts, n_cached, todo, n_parts)
        current_ref = ray.put(pa.array(sorted(current), pa.string()))
        dups_ref = ray.put(dups) if dups else None
        cached_ds = ray.data.read_parquet(cache_parts, include_paths=bool(dups))
        selected = cached_ds.map_batches(
            _keep_uids, fn_kwargs={"values_ref": current_ref, "keep": True, "drop_ref": dups_ref}, batch_format="pyarrow"
        )
        selected.write_parquet(tmp)
    fs, tmp_path = resolve_filesystem(tmp)
    if not _parquet_files(tmp):  # no records at all: an empty table keeps the schema
        fs.create_dir(tmp_path, recursive=True)
        pq.write_table(sketch_schema(s.dim, s.dtype).empty_table(), f"{tmp_path}/empty.parquet", filesystem=fs)
    # publish whole: a reader never sees a half-written sketches/ directory (on object stores the
    # move is a copy, and the stage's completion marker is what readers wait for)
    _delete_dir(final)
    move_dir(fs, tmp_path, resolve_filesystem(final)[1])
    files = _parquet_files(final)
    n_sketches = pads.dataset(files, format="parquet", filesystem=fs).count_rows() if files else 0
    if n_sketches != n_records:
        raise RuntimeError(f"sketch stage wrote {n_sketches} rows for {n_records} records")

    if s.fidelity_sample > 0 and n_records:
        result["fidelity"] = _fidelity(records_path, uids, worker_kwargs, s.fidelity_sample, s.seed, s.num_cpus_per_worker, num_gpus)
    logger.info("sketched %d records (%d cached) with %d actor(s), d=%d", n_records, n_cached, s.num_workers, s.dim)
    result.update(
        {
            "n_records": n_records,
            "n_sketches": n_sketches,
            "n_cached": n_cached,
            "n_computed": todo,
            "compute_seconds": round(compute_seconds, 3),
            "records_per_second": round(todo / compute_seconds, 3) if todo and compute_seconds > 0 else None,
            "seconds": round(time.time() - t_start, 3),
            "num_workers": s.num_workers,
            "num_gpus_per_worker": num_gpus,
            "method": s.method,
            "gradient": s.gradient,
            "state": state_path,
            "spec_hash": key,
            "cache": cache_parts.rsplit("/", 1)[0] if cache_parts is not None else None,
            "projection": {k: v for k, v in projection.to_dict().items() if k != "layers"}
            | {"layers": [name for name, _, _ in projection.layers], "n_params": sum(o * i for _, o, i in projection.layers)},
        }
    )
    return result


def _fidelity(records_path: str, uids: list[str], worker_kwargs: dict, k: int, seed: int, num_cpus: float, num_gpus: float) -> dict:
    """Distortion of the sketches against exact per-sample gradients on a seeded sample of records."""
    ordered = sorted(uids)
    rng = np.random.default_rng(stable_seed(seed, "fidelity"))
    sample = [ordered[i] for i in sorted(rng.choice(len(ordered), size=min(k, len(ordered)), replace=False))]
    ref = ray.put(pa.array(sample, pa.string()))
    ds = ray.data.read_parquet(records_path).select_columns(["uid", "messages"])
    rows = ds.map_batches(_keep_uids, fn_kwargs={"values_ref": ref, "keep": True}, batch_format="pyarrow").take_all()
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uid"]))
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_fidelity_task)
    return ray.get(task.remote(worker_kwargs, table))


def _fidelity_task(worker_kwargs: dict, table: pa.Table) -> dict:
    return SketchWorker(**worker_kwargs).fidelity(table)
