"""The selector as a Ray actor: read the sketches, run ``select``, write the selection artifacts.

The work is in :func:`select_to_dir` (no Ray); :class:`SelectorActor` is the thin Ray shell that
runs it where the sketches are loaded, so the driver never holds them. Outputs under ``out_dir``:
``selection.parquet`` (``uid``, ``rank``, ``gain``, ``base``, ``conflict``, ``score``, ``logdet``,
``eps``, ``eps_bound``: one row per pick, in pick order, i.e. the per-step trace) and
``summary.json`` (with the diagnostics). While it runs, the picks are checkpointed under
``out_dir/_checkpoint/`` every ``checkpoint_every`` steps; a rerun after a kill resumes from there
(same picks as an uninterrupted run), and the checkpoint is removed once the outputs are written.

With ``shards > 1`` (see :func:`run_select_stage`) the greedy runs over shard actors instead
(:mod:`spice_ray.select.sharded`), each reading its own slice; the driver writes the outputs."""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from spice_ray.config import SelectConfig
from spice_ray.select.checkpoint import PickCheckpoint
from spice_ray.select.greedy import Selection, select
from spice_ray.select.io import read_sketches, read_target

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.parquet"
SUMMARY_FILE = "summary.json"


def _write_bytes_atomic(out_dir: str, name: str, data: bytes) -> None:
    """Write ``out_dir/name``: temp name + os.replace locally; one object put on a remote store."""
    if "://" in out_dir:
        fs, root = pafs.FileSystem.from_uri(out_dir)
        with fs.open_output_stream(f"{root.rstrip('/')}/{name}") as f:
            f.write(data)
        return
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def selection_table(uids: np.ndarray, sel: Selection) -> pa.Table:
    """The selection as an arrow table, one row per pick in pick order."""
    return pa.table(
        {
            "uid": pa.array(uids[sel.indices], type=pa.string()),
            "rank": pa.array(np.arange(len(sel), dtype=np.int64)),
            "gain": pa.array(sel.gains, type=pa.float64()),
            "base": pa.array(sel.bases, type=pa.float64()),
            "conflict": pa.array(sel.conflicts, type=pa.float64()),
            "score": pa.array(sel.scores, type=pa.float64()),
            "logdet": pa.array(sel.logdets, type=pa.float64()),
            "eps": pa.array(sel.eps, type=pa.float64()),
            "eps_bound": pa.array(sel.eps_bound, type=pa.float64()),
        }
    )


def checkpoint_dir(out_dir: str) -> str:
    return f"{str(out_dir).rstrip('/')}/_checkpoint"


def write_selection(out_dir: str, uids: np.ndarray, sel: Selection, summary: dict[str, Any]) -> None:
    """Write ``selection.parquet`` and ``summary.json`` (each atomically)."""
    buf = io.BytesIO()
    pq.write_table(selection_table(uids, sel), buf)
    _write_bytes_atomic(out_dir, SELECTION_FILE, buf.getvalue())
    _write_bytes_atomic(out_dir, SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def select_to_dir(
    sketches_path: str, out_dir: str, cfg: SelectConfig, *, device: str | None = None
) -> dict[str, Any]:
    """Read ``sketches_path``, select with ``cfg``, write ``out_dir``; return the summary dict.

    ``device``: the eager engine's device (None: ``cfg.device`` if set, else numpy).
    """
    t0 = time.perf_counter()
    uids, G = read_sketches(sketches_path)
    n, d = G.shape
    target = read_target(cfg.target, uids, G) if cfg.target else None
    t_read = time.perf_counter() - t0
    ckpt_dir = checkpoint_dir(out_dir)
    sel = select(
        G,
        cfg.budget(n),
        method=cfg.method,
        alpha=cfg.alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        seed=cfg.seed,
        target=target,
        pool_size=cfg.pool_size,
        lazy=cfg.lazy,
        device=device or cfg.device or "numpy",
        checkpoint_dir=ckpt_dir,
        checkpoint_every=cfg.checkpoint_every,
    )
    t_select = time.perf_counter() - t0 - t_read
    summary = sel.summary()
    summary.update(
        dim=int(d),
        seed=int(cfg.seed),
        sketches=str(sketches_path),
        read_seconds=round(t_read, 4),
        select_seconds=round(t_select, 4),
    )
    write_selection(out_dir, uids, sel, summary)
    PickCheckpoint(ckpt_dir, {}).clear()
    log.info("selection of %d/%d written to %s", len(sel), n, out_dir)
    return summary


@ray.remote
class SelectorActor:
    """One actor that loads all sketches into memory and runs the selection (GPU eager if it has one)."""

    def run(self, sketches_path: str, out_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """Select from ``sketches_path`` into ``out_dir`` with ``cfg`` (a SelectConfig as a dict)."""
        logging.basicConfig(level=logging.INFO)
        config = SelectConfig(**cfg)
        device = config.device
        if device is None:
            device = "cuda" if ray.get_gpu_ids() else "numpy"
        return select_to_dir(sketches_path, out_dir, config, device=device)


def run_select_stage(sketches_path: str, out_dir: str, cfg: SelectConfig) -> dict[str, Any]:
    """Run the selection in a :class:`SelectorActor` (or ``shards`` shard actors); return its summary.

    Ray must already be initialized (or ``ray.init`` is called implicitly with the defaults).
    """
    shards = cfg.shards
    if shards > 1 and cfg.method in ("spice", "logdet"):
        return _run_sharded(sketches_path, out_dir, cfg, shards)
    if shards > 1:
        log.warning("shards=%d is only used by spice/logdet; running %s in one actor", shards, cfg.method)
    actor = SelectorActor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus).remote()
    try:
        return ray.get(actor.run.remote(str(sketches_path), str(out_dir), cfg.model_dump()))
    finally:
        ray.kill(actor)


def _run_sharded(sketches_path: str, out_dir: str, cfg: SelectConfig, shards: int) -> dict[str, Any]:
    from spice_ray.select.io import read_sketch_uids
    from spice_ray.select.sharded import select_sharded

    t0 = time.perf_counter()
    n = len(read_sketch_uids(str(sketches_path)))
    device = cfg.device or ("cuda" if cfg.num_gpus > 0 else "numpy")
    ckpt_dir = checkpoint_dir(out_dir)
    sel, uids = select_sharded(
        str(sketches_path),
        cfg.budget(n),
        n_shards=shards,
        method=cfg.method,
        alpha=cfg.alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        lazy=cfg.lazy,
        device=device,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=cfg.checkpoint_every,
    )
    assert uids is not None
    summary = sel.summary()
    summary.update(
        dim=int(sel.params.get("d", 0)),
        seed=int(cfg.seed),
        sketches=str(sketches_path),
        select_seconds=round(time.perf_counter() - t0, 4),
    )
    write_selection(out_dir, uids, sel, summary)
    PickCheckpoint(ckpt_dir, {}).clear()
    return summary
