"""The select stage's work, without Ray: read the sketches, run ``select``, write the artifacts.

Outputs under ``out_dir`` (a local directory or an object-store URI): ``selection.parquet``
(``uid``, ``rank``, ``gain``, ``base``, ``conflict``, ``score``, ``logdet``, ``eps``,
``eps_bound``: one row per pick, in pick order, i.e. the per-step trace) and ``summary.json`` (with
the diagnostics). While it runs, the picks are checkpointed under ``out_dir/_checkpoint/`` every
``checkpoint_every`` steps; a rerun after a kill resumes from there (same picks as an uninterrupted
run), and the checkpoint is removed once the outputs are written (:mod:`spice_ray.select.output`,
shared with the sharded path). The Ray shells that run this (one selector actor, or shard actors) are
in :mod:`spice_ray.select.ray_shards`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from spice_ray.config import SelectConfig
from spice_ray.select.factory import refusal, stage_device
from spice_ray.select.greedy import select
from spice_ray.select.io import read_sketches, read_target
from spice_ray.select.output import checkpoint_dir, write_selection
from spice_ray.select.target import closest_rows, target_cosine

log = logging.getLogger(__name__)


def select_to_dir(
    sketches_path: str, out_dir: str, cfg: SelectConfig, *, device: str | None = None, records_path: str | None = None
) -> dict[str, Any]:
    """Read ``sketches_path``, select with ``cfg``, write ``out_dir``; return the summary dict.

    The sketches are scaled (``select.scale``) and α resolved (``select.alpha``) first
    (:mod:`spice_ray.select.prepare`); ``select.quota=source`` reads each record's source from
    ``records_path``. ``device``: the eager engine's device (None: ``cfg.device`` if set, else numpy).
    """
    from spice_ray.select.diagnostics import candidate_diagnostics
    from spice_ray.select.io import read_record_sources, read_sketch_column
    from spice_ray.select.prepare import resolve_alpha, scale_sketches

    t0 = time.perf_counter()
    uids, G = read_sketches(sketches_path)
    wants_tokens = cfg.scale in ("tokens", "sqrt_tokens") or cfg.method == "longest" or cfg.budget == "tokens"
    loss_tokens = read_sketch_column(sketches_path, "n_loss_tokens") if wants_tokens else None
    target, target_rows = read_target(cfg.target, uids, G) if cfg.target else (None, None)
    info: dict[str, Any] = {}
    if target_rows is not None:  # the target's own rows are the yardstick, never candidates (select/target.py)
        keep = np.ones(len(uids), dtype=bool)
        keep[target_rows] = False
        uids, G, loss_tokens = _rows(keep, uids, G, loss_tokens)
        info["target_rows_excluded"] = int(len(target_rows))
    n, d = G.shape
    G = scale_sketches(G, loss_tokens, cfg.scale)
    alpha = resolve_alpha(G, cfg.alpha)
    if cfg.budget == "tokens" and loss_tokens is None:
        raise ValueError("select.budget=tokens needs the sketches' n_loss_tokens column (sketch format 4 or later)")
    k = cfg.max_records(n)
    max_cost = cfg.max_tokens(int(loss_tokens.sum())) if cfg.budget == "tokens" else None
    if target is not None and cfg.method in ("spice", "logdet") and cfg.target_pool < 1:
        near = closest_rows(target_cosine(G, target), cfg.target_pool, at_least=k, costs=loss_tokens, max_cost=max_cost)
        uids, G, loss_tokens = _rows(near, uids, G, loss_tokens)
        info["target_pool_rows"] = int(len(near))
    if cfg.quota == "source" and records_path is None:
        raise ValueError("select.quota=source needs the records (their source column)")
    groups = read_record_sources(records_path, uids) if cfg.quota == "source" else None
    t_read = time.perf_counter() - t0
    sel = select(
        G,
        k,
        method=cfg.method,
        alpha=alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        seed=cfg.seed,
        target=target,
        pool_size=cfg.pool_size,
        lazy=cfg.lazy,
        device=device or cfg.device or "numpy",
        checkpoint_dir=checkpoint_dir(out_dir),
        checkpoint_every=cfg.checkpoint_every,
        groups=groups,
        lengths=loss_tokens,
        costs=loss_tokens,
        max_cost=max_cost,
    )
    if len(sel) > 1:
        sel.diagnostics.update(candidate_diagnostics(G, sel.indices, sel.gains, alpha))
    summary = sel.summary() | {
        "loss_tokens": None if loss_tokens is None else int(np.asarray(loss_tokens)[sel.indices].sum()),
        "dim": int(d),
        "seed": int(cfg.seed),
        "scale": cfg.scale,
        "quota": cfg.quota,
        "alpha_setting": cfg.alpha,
        **info,
        "sketches": str(sketches_path),
        "read_seconds": round(t_read, 4),
        "select_seconds": round(time.perf_counter() - t0 - t_read, 4),
    }
    if groups is not None:
        summary["quotas"] = dict(sorted(Counter(groups[sel.indices].tolist()).items()))
    write_selection(out_dir, uids, sel, summary)
    return summary


def _rows(which: np.ndarray, uids: np.ndarray, G: np.ndarray, loss_tokens: np.ndarray | None) -> tuple[Any, ...]:
    """The rows ``which`` (a mask or indices) of the uids, the sketches and the loss tokens."""
    return uids[which], G[which], None if loss_tokens is None else np.asarray(loss_tokens)[which]


def run_select_stage(sketches_path: str, out_dir: str, cfg: SelectConfig, executor: Any, records_path: str | None = None,
                     resources: Any | None = None) -> dict[str, Any]:
    """The select stage: :func:`select_to_dir` as one unit of work of ``executor`` (a GPU eager
    pass when it gets a GPU), or over ``select.shards`` Ray shard actors for sketch sets larger
    than one machine's memory (any scale, α and quota; the same picks). Sharding needs the ray
    executor and a greedy method (spice | logdet); otherwise a warning says which and one worker
    selects. ``resources``: the selector's (default: ``resources_of(cfg)``)."""
    from spice_ray.executor import resources_of

    resources = resources or resources_of(cfg)
    if cfg.shards > 1:
        why = refusal(cfg.method, executor.name, cfg.budget, cfg.target)
        if why is None:
            from spice_ray.select.ray_shards import run_sharded

            return run_sharded(sketches_path, out_dir, cfg, records_path=records_path, resources=resources)
        log.warning("select.shards=%d not used: %s; selecting in one worker", cfg.shards, why)
    device = stage_device(cfg.device, executor.gpus(resources), cfg.budget)
    return executor.call(select_to_dir, str(sketches_path), str(out_dir), cfg, device=device, records_path=records_path, resources=resources)
