"""The selector as Ray actors: :class:`SelectorActor` runs :func:`~spice_ray.select.job.select_to_dir`
where the sketches are loaded, so the driver never holds them (a GPU eager pass when it has one).

With ``select.shards > 1`` (see :func:`run_select_stage`) the greedy runs over shard actors instead
(:mod:`spice_ray.select.sharded`), each reading its own slice; the driver writes the outputs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from spice_ray.config import SelectConfig
from spice_ray.select.job import checkpoint_dir, select_to_dir, write_selection

log = logging.getLogger(__name__)

__all__ = ["SelectorActor", "run_select_stage"]


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
    sel, uids = select_sharded(
        str(sketches_path),
        cfg.budget(n),
        n_shards=shards,
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
