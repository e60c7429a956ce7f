"""The selection over Ray shard actors (``select.shards > 1``, :mod:`spice_ray.select.sharded`): each
actor reads its own slice of the sketches; the driver reduces their best and writes the outputs.
One worker's selection is :func:`spice_ray.select.job.run_select_stage` through the executor."""

from __future__ import annotations

import logging
import time
from typing import Any

from spice_ray.config import SelectConfig
from spice_ray.select.job import checkpoint_dir, write_selection

log = logging.getLogger(__name__)

__all__ = ["run_sharded"]


def run_sharded(sketches_path: str, out_dir: str, cfg: SelectConfig) -> dict[str, Any]:
    from spice_ray.select.io import read_sketch_uids
    from spice_ray.select.sharded import select_sharded

    t0 = time.perf_counter()
    n = len(read_sketch_uids(str(sketches_path)))
    sel, uids = select_sharded(
        str(sketches_path),
        cfg.budget(n),
        n_shards=cfg.shards,
        method=cfg.method,
        alpha=cfg.alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        lazy=cfg.lazy,
        device=cfg.device or ("cuda" if cfg.num_gpus > 0 else "numpy"),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        checkpoint_dir=checkpoint_dir(out_dir),
        checkpoint_every=cfg.checkpoint_every,
    )
    assert uids is not None
    summary = sel.summary() | {
        "dim": int(sel.params.get("d", 0)),
        "seed": int(cfg.seed),
        "sketches": str(sketches_path),
        "select_seconds": round(time.perf_counter() - t0, 4),
    }
    write_selection(out_dir, uids, sel, summary)
    return summary
