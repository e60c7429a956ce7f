"""Sharded selection on Ray: shard actors own slices of the candidates, the driver reduces each step.

For sketch sets larger than one machine. Each :class:`ShardActor` holds a contiguous slice of the
rows (in uid order) in a :class:`~spice_ray.select.sharding.ShardWorker`: the rows scaled as the
single worker scales them, α resolved by the driver from every shard's norms, then one
:class:`~spice_ray.select.engines.CandidateShard` (or one per source under quotas; eager or lazy,
numpy or torch) with its own copy of the selected-side state (O(d²) or O(k·d) memory, the same on
every shard). One step is one round trip: the driver sends every shard the previous step's pick
(``g``, ``u = M⁻¹g`` and ``q = gᵀM⁻¹g``, computed canonically by the shard that owned it), each
shard applies it and answers its canonical best candidate, and the driver keeps the maximum score,
ties to the smallest global index. Because every shard decides by the canonical score
(:mod:`spice_ray.select.state`), the picks equal a single actor's.

The driver holds only the uids (for the output) and the picked sketches (k×d, for diagnostics).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import ray

from spice_ray.config import SelectConfig
from spice_ray.select.engines import row_norms_sq
from spice_ray.select.factory import default_lazy, stage_device
from spice_ray.select.io import read_sketch_column, read_sketch_uids, read_sketches
from spice_ray.select.prepare import token_factors
from spice_ray.select.resume import fingerprint_data
from spice_ray.select.selection import Selection
from spice_ray.select.sharding import SHARDABLE, ShardWorker, select_over_workers, shard_bounds

log = logging.getLogger(__name__)


@ray.remote
class ShardActor:
    """A :class:`~spice_ray.select.sharding.ShardWorker` in an actor: rows ``[offset, offset + n)``
    of the uid-sorted sketches, read from the parquet (its uid range only) or given as an array."""

    def __init__(
        self, source: Any, *, offset: int, scale: str = "none", factors: np.ndarray | None = None,
        groups: np.ndarray | None = None, uid_range: tuple[str | None, str | None] | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        if isinstance(source, str):  # a sketch parquet path: read only this shard's uid range
            _, G = read_sketches(source, uid_range=uid_range)
        else:
            G = np.asarray(source)
        self.worker = ShardWorker(G, offset=offset, scale=scale, factors=factors, groups=groups)
        log.info("shard at offset %d: %d rows (d=%d), scale=%s", offset, G.shape[0], G.shape[1], scale)

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        return getattr(self.worker, method)(*args, **kw)


def _ray_call(actors: list[Any]) -> Any:
    return lambda method, *args, **kw: ray.get([a.call.remote(method, *args, **kw) for a in actors])


def select_sharded(
    sketches: np.ndarray | str,
    k: int,
    *,
    n_shards: int,
    method: str = "spice",
    alpha: float | str = 1.0,
    lam: float = 0.1,
    omega: float | None = None,
    lazy: bool | None = None,
    device: str | None = "numpy",
    scale: str = "none",
    loss_tokens: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    diagnostics: bool = True,
    progress: bool = False,
) -> tuple[Selection, np.ndarray | None]:
    """SPICE (or log-det) over ``n_shards`` Ray shard actors; the picks equal :func:`select`'s on the
    same prepared sketches (``scale``, ``alpha="auto"``, per-group quotas: as the single worker).

    ``sketches``: an (N, d) array (each shard gets its slice through the object store) or a sketch
    parquet path (each shard reads its own uid range; the driver reads only the uids). ``loss_tokens``
    (uid order): for ``scale=tokens|sqrt_tokens`` (read from the parquet when None); ``groups``: a
    label per row (uid order) for per-group quotas; ``resources``: custom Ray resources of each shard
    actor (``select.resources``). Returns the selection and, for a path, the sorted uids the indices
    refer to. Ray must be initialised.
    """
    if method not in SHARDABLE:
        raise ValueError(f"sharded selection runs the greedy methods spice | logdet, not {method!r}")
    use_lazy = default_lazy(lazy, device)
    uids = None
    if isinstance(sketches, str):
        uids = read_sketch_uids(sketches)
        n = len(uids)
        if scale in ("tokens", "sqrt_tokens") and loss_tokens is None:
            loss_tokens = read_sketch_column(sketches, "n_loss_tokens")
    else:
        G = np.ascontiguousarray(np.asarray(sketches))
        n = G.shape[0]
    factors = token_factors(loss_tokens, scale) if scale in ("tokens", "sqrt_tokens") else None
    bounds = shard_bounds(n, n_shards)
    actors = []
    actor_cls = ShardActor.options(num_cpus=num_cpus, num_gpus=num_gpus, **({"resources": dict(resources)} if resources else {}))
    for lo, hi in bounds:
        opts = dict(offset=lo, scale=scale, factors=None if factors is None else factors[lo:hi],
                    groups=None if groups is None else np.asarray(groups, dtype=object)[lo:hi])
        if uids is not None:
            uid_range = (None if lo == 0 else str(uids[lo]), None if hi >= n else str(uids[hi]))
            actors.append(actor_cls.remote(str(sketches), uid_range=uid_range, **opts))
        else:
            actors.append(actor_cls.remote(ray.put(G[lo:hi]), **opts))
    try:
        call = _ray_call(actors)
        sizes = [i["n"] for i in call("info")]
        if [hi - lo for lo, hi in bounds] != sizes:
            raise RuntimeError(f"shard sizes {sizes} do not match the planned slices {bounds}")
        if uids is not None:
            data = hashlib.sha256("\n".join(map(str, uids)).encode()).hexdigest()
        else:
            data = fingerprint_data(G, row_norms_sq(G))
        sel = select_over_workers(
            call, k, method=method, alpha=alpha, lam=lam, omega=omega, lazy=use_lazy, device=device,
            groups=groups, checkpoint_fp={"data": data, "scale": scale}, checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, diagnostics=diagnostics, progress=progress,
        )
        return sel, uids
    finally:
        for a in actors:
            ray.kill(a)


def run_sharded(sketches_path: str, out_dir: str, cfg: SelectConfig, records_path: str | None = None,
                resources: Any | None = None) -> dict[str, Any]:
    """The select stage over ``select.shards`` shard actors; the driver writes the outputs.

    The same preparation as :func:`~spice_ray.select.stage.select_to_dir` (scaling, α, quotas), done
    by the shards on their rows with the driver's global token factors and median. ``resources``:
    each shard actor's (default: ``resources_of(cfg)``).
    """
    from spice_ray.executor_types import resources_of
    from spice_ray.select.io import read_record_sources
    from spice_ray.select.output import checkpoint_dir, write_selection

    t0 = time.perf_counter()
    resources = resources or resources_of(cfg)
    gpus = resources.gpus or 0.0
    uids = read_sketch_uids(str(sketches_path))
    n = len(uids)
    if cfg.quota == "source" and records_path is None:
        raise ValueError("select.quota=source needs the records (their source column)")
    groups = read_record_sources(records_path, uids) if cfg.quota == "source" else None
    sel, got = select_sharded(
        str(sketches_path),
        cfg.max_records(n),
        n_shards=cfg.shards,
        method=cfg.method,
        alpha=cfg.alpha,
        lam=cfg.lam,
        omega=cfg.omega,
        lazy=cfg.lazy,
        device=stage_device(cfg.device, gpus),
        scale=cfg.scale,
        groups=groups,
        num_cpus=resources.cpus,
        num_gpus=gpus,
        resources=dict(resources.custom),
        checkpoint_dir=checkpoint_dir(out_dir),
        checkpoint_every=cfg.checkpoint_every,
    )
    assert got is not None
    summary = sel.summary() | {
        "dim": int(sel.params.get("d", 0)),
        "seed": int(cfg.seed),
        "scale": cfg.scale,
        "quota": cfg.quota,
        "alpha_setting": cfg.alpha,
        "sketches": str(sketches_path),
        "select_seconds": round(time.perf_counter() - t0, 4),
    }
    if groups is not None:
        summary["quotas"] = dict(sorted(Counter(groups[sel.indices].tolist()).items()))
    write_selection(out_dir, got, sel, summary)
    return summary
