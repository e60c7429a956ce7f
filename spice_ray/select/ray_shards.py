"""Sharded selection on Ray: shard actors own slices of the candidates, the driver reduces each step.

For sketch sets larger than one machine. Each :class:`ShardActor` holds a contiguous slice of the
rows (in uid order) in a :class:`~spice_ray.select.engines.CandidateShard` (eager or lazy, numpy or
torch) with its own copy of the selected-side state (O(d²) or O(k·d) memory, the same on every
shard). One step is one round trip: the driver sends every shard the previous step's pick
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
from typing import Any

import numpy as np
import ray

from spice_ray.config import SelectConfig
from spice_ray.select.engines import CandidateShard, row_norms_sq
from spice_ray.select.greedy import Selection, select_shards
from spice_ray.select.io import read_sketch_uids, read_sketches
from spice_ray.select.resume import PickCheckpoint, fingerprint_data
from spice_ray.select.state import Winner

log = logging.getLogger(__name__)


@ray.remote
class ShardActor:
    """One shard of the candidates: rows ``[offset, offset + n)`` of the uid-sorted sketches."""

    def __init__(
        self,
        source: Any,
        *,
        offset: int,
        alpha: float,
        lam: float,
        max_updates: int,
        lazy: bool,
        device: str | None,
        uid_range: tuple[str | None, str | None] | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        if isinstance(source, str):  # a sketch parquet path: read only this shard's uid range
            _, G = read_sketches(source, uid_range=uid_range)
        else:
            G = np.asarray(source)
        self.shard = CandidateShard(
            G, alpha=alpha, lam=lam, max_updates=max_updates, offset=offset, lazy=lazy, device=device
        )
        log.info("shard at offset %d: %d rows (d=%d), lazy=%s", offset, len(self.shard), G.shape[1], lazy)

    def info(self) -> dict[str, Any]:
        return {"n": len(self.shard), "d": int(self.shard.G.shape[1]), "norm_sq_max": float(self.shard.engine.max_norm_sq)}

    def apply(self, pick: tuple[np.ndarray, np.ndarray, float, int] | None) -> None:
        if pick is not None:
            u, g, q, index = pick
            self.shard.update(u, g, q, index)

    def step(self, pick: tuple[np.ndarray, np.ndarray, float, int] | None) -> Winner | None:
        """Apply the previous step's pick, then return this shard's canonical best."""
        self.apply(pick)
        return self.shard.best()

    def exact(self, index: int) -> Winner | None:
        """Canonical values of row ``index`` if this shard holds it, else None."""
        return self.shard.exact(index) if self.shard.local(index) is not None else None

    def refreshed(self) -> int:
        return self.shard.refreshed


class RayShards:
    """The driver side: a :class:`~spice_ray.select.greedy.ShardGroup` over :class:`ShardActor`\\ s."""

    def __init__(self, actors: list[Any], sizes: list[int]) -> None:
        self.actors = actors
        self.n = int(sum(sizes))
        self.pending: tuple[np.ndarray, np.ndarray, float, int] | None = None

    def best(self) -> Winner | None:
        winners = ray.get([a.step.remote(self.pending) for a in self.actors])
        self.pending = None
        best: Winner | None = None
        for w in winners:
            if w is not None and w.beats(best):
                best = w
        return best

    def exact(self, index: int) -> Winner:
        if self.pending is not None:
            ray.get([a.apply.remote(self.pending) for a in self.actors])
            self.pending = None
        for w in ray.get([a.exact.remote(index) for a in self.actors]):
            if w is not None:
                return w
        raise KeyError(f"row {index} is in no shard")

    def update(self, w: Winner) -> None:
        self.pending = (w.u, w.g, w.q, w.index)

    @property
    def refreshed(self) -> int:
        return int(sum(ray.get([a.refreshed.remote() for a in self.actors])))


def _bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    n_shards = max(1, min(int(n_shards), max(n, 1)))
    edges = [round(i * n / n_shards) for i in range(n_shards + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n_shards)]


def select_sharded(
    sketches: np.ndarray | str,
    k: int,
    *,
    n_shards: int,
    method: str = "spice",
    alpha: float = 1.0,
    lam: float = 0.1,
    omega: float | None = None,
    lazy: bool | None = None,
    device: str | None = "numpy",
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    diagnostics: bool = True,
    progress: bool = False,
) -> tuple[Selection, np.ndarray | None]:
    """SPICE (or log-det) over ``n_shards`` Ray shard actors; the picks equal :func:`select`'s.

    ``sketches``: an (N, d) array (each shard gets its slice through the object store) or a sketch
    parquet path (each shard reads its own uid range; the driver reads only the uids). Returns the
    selection and, for a path, the sorted uids the indices refer to. Ray must be initialised.
    """
    if method not in ("spice", "logdet"):
        raise ValueError(f"sharded selection runs the greedy methods spice | logdet, not {method!r}")
    lam_eff = 0.0 if method == "logdet" else float(lam)
    use_lazy = (device in (None, "numpy")) if lazy is None else bool(lazy)
    uids = None
    if isinstance(sketches, str):
        uids = read_sketch_uids(sketches)
        n = len(uids)
    else:
        G = np.ascontiguousarray(np.asarray(sketches))
        n = G.shape[0]
    k_eff = min(int(k), n)
    bounds = _bounds(n, n_shards)
    actors = []
    for lo, hi in bounds:
        opts = dict(alpha=alpha, lam=lam_eff, max_updates=k_eff, lazy=use_lazy, device=device, offset=lo)
        actor_cls = ShardActor.options(num_cpus=num_cpus, num_gpus=num_gpus)
        if uids is not None:
            uid_range = (None if lo == 0 else str(uids[lo]), None if hi >= n else str(uids[hi]))
            actors.append(actor_cls.remote(str(sketches), uid_range=uid_range, **opts))
        else:
            actors.append(actor_cls.remote(ray.put(G[lo:hi]), **opts))
    try:
        infos = ray.get([a.info.remote() for a in actors])
        sizes = [i["n"] for i in infos]
        if [hi - lo for lo, hi in bounds] != sizes:
            raise RuntimeError(f"shard sizes {sizes} do not match the planned slices {bounds}")
        ckpt = None
        if checkpoint_dir is not None:
            if uids is not None:
                data = hashlib.sha256("\n".join(map(str, uids)).encode()).hexdigest()
            else:
                data = fingerprint_data(G, row_norms_sq(G))
            fp = {"method": method, "n": n, "d": infos[0]["d"] if infos else 0, "k": k_eff, "alpha": float(alpha),
                  "lam": lam_eff, "omega": omega, "seed": None, "pool_size": None, "data": data}
            ckpt = PickCheckpoint(checkpoint_dir, fp)
        group = RayShards(actors, sizes)
        sel = select_shards(
            group, k_eff, alpha=alpha, lam=lam_eff, omega=omega, method=method, checkpoint=ckpt,
            checkpoint_every=checkpoint_every, diagnostics=diagnostics, progress=progress,
        )
        sel.k_requested = int(k)
        sel.params.update(lazy=use_lazy, device=device, shards=len(actors), d=infos[0]["d"] if infos else 0)
        sel.stats.update(shards=len(actors), scored=group.refreshed, lazy=use_lazy)
        return sel, uids
    finally:
        for a in actors:
            ray.kill(a)


def run_sharded(sketches_path: str, out_dir: str, cfg: SelectConfig) -> dict[str, Any]:
    """The select stage over ``select.shards`` shard actors; the driver writes the outputs."""
    from spice_ray.select.stage import checkpoint_dir, write_selection

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
