"""The select stage's outputs, written by one worker (:mod:`spice_ray.select.stage`) and by the
driver of a sharded selection (:mod:`spice_ray.select.ray_shards`) alike: ``selection.parquet`` (one
row per pick, in pick order), ``summary.json``, and the pick checkpoint's place under ``out_dir``.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.select.selection import Selection
from spice_ray.select.resume import PickCheckpoint
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
