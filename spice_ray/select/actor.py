"""The selector as a Ray actor: read the sketches, run ``select``, write the selection artifacts.

The work is in :func:`select_to_dir` (no Ray); :class:`SelectorActor` is the thin Ray shell that
runs it where the sketches are loaded, so the driver never holds them. Outputs under ``out_dir``:
``selection.parquet`` (``uid``, ``rank``, ``gain``, ``base``, ``conflict``, ``score``, ``logdet``:
one row per pick, in pick order, i.e. the per-step trace) and ``summary.json``.
"""

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
from spice_ray.select.greedy import Selection, select
from spice_ray.select.io import read_sketches

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
        }
    )


def select_to_dir(sketches_path: str, out_dir: str, cfg: SelectConfig) -> dict[str, Any]:
    """Read ``sketches_path``, select with ``cfg``, write ``out_dir``; return the summary dict."""
    t0 = time.perf_counter()
    uids, G = read_sketches(sketches_path)
    n, d = G.shape
    t_read = time.perf_counter() - t0
    sel = select(
        G,
        cfg.budget(n),
        method=cfg.method,
        alpha=cfg.alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        seed=cfg.seed,
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
    buf = io.BytesIO()
    pq.write_table(selection_table(uids, sel), buf)
    _write_bytes_atomic(out_dir, SELECTION_FILE, buf.getvalue())
    _write_bytes_atomic(out_dir, SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    log.info("selection of %d/%d written to %s", sel.summary()["k_selected"], n, out_dir)
    return summary


@ray.remote
class SelectorActor:
    """One actor that loads all sketches into memory and runs the greedy selection."""

    def run(self, sketches_path: str, out_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """Select from ``sketches_path`` into ``out_dir`` with ``cfg`` (a SelectConfig as a dict)."""
        logging.basicConfig(level=logging.INFO)
        return select_to_dir(sketches_path, out_dir, SelectConfig(**cfg))


def run_select_stage(sketches_path: str, out_dir: str, cfg: SelectConfig) -> dict[str, Any]:
    """Run the selection in a :class:`SelectorActor` sized by ``cfg``; return its summary.

    Ray must already be initialized (or ``ray.init`` is called implicitly with the defaults).
    """
    actor = SelectorActor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus).remote()
    try:
        return ray.get(actor.run.remote(str(sketches_path), str(out_dir), cfg.model_dump()))
    finally:
        ray.kill(actor)
