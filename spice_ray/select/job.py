"""The select stage's work, without Ray: read the sketches, run ``select``, write the artifacts.

Outputs under ``out_dir`` (a local directory or an object-store URI): ``selection.parquet``
(``uid``, ``rank``, ``gain``, ``base``, ``conflict``, ``score``, ``logdet``, ``eps``,
``eps_bound``: one row per pick, in pick order, i.e. the per-step trace) and ``summary.json`` (with
the diagnostics). While it runs, the picks are checkpointed under ``out_dir/_checkpoint/`` every
``checkpoint_every`` steps; a rerun after a kill resumes from there (same picks as an uninterrupted
run), and the checkpoint is removed once the outputs are written. The Ray shells that run this
(one selector actor, or shard actors) are in :mod:`spice_ray.select.actor`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.config import SelectConfig
from spice_ray.select.checkpoint import PickCheckpoint
from spice_ray.select.greedy import Selection, select
from spice_ray.select.io import read_sketches, read_target
from spice_ray.storage import Store

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.parquet"
SUMMARY_FILE = "summary.json"


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
    """Write ``selection.parquet`` and ``summary.json`` (each atomically), then drop the checkpoint."""
    store = Store(str(out_dir))
    buf = io.BytesIO()
    pq.write_table(selection_table(uids, sel), buf)
    store.write_bytes(SELECTION_FILE, buf.getvalue())
    store.write_text(SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    PickCheckpoint(checkpoint_dir(out_dir), {}).clear()
    log.info("selection of %d/%d written to %s", len(sel), len(uids), out_dir)


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
        checkpoint_dir=checkpoint_dir(out_dir),
        checkpoint_every=cfg.checkpoint_every,
    )
    summary = sel.summary() | {
        "dim": int(d),
        "seed": int(cfg.seed),
        "sketches": str(sketches_path),
        "read_seconds": round(t_read, 4),
        "select_seconds": round(time.perf_counter() - t0 - t_read, 4),
    }
    write_selection(out_dir, uids, sel, summary)
    return summary
