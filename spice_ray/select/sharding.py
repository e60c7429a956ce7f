"""Sharded selection without Ray: what one shard worker does, and the driver's reduction over them.

A :class:`ShardWorker` holds rows ``[offset, offset + n)`` of the uid-sorted sketches, scales them
exactly as the single-worker path does (:func:`~spice_ray.select.prepare.scale_rows`, row by row, with
the global token factors sliced for it), reports their squared norms (the driver resolves ``alpha =
"auto"`` from all of them: the same median, so the same α) and then runs one
:class:`~spice_ray.select.engines.CandidateShard` — or, under per-source quotas, one per source it
holds, as :func:`~spice_ray.select.greedy.select` does for the whole set. :class:`WorkerGroup` is
the driver's :class:`~spice_ray.select.loop.ShardGroup` over such workers, reached through a
``call(method, *args)`` that runs a method on every worker and returns their answers in order
(in-process here, Ray actors in :mod:`spice_ray.select.ray_shards`). Every shard decides by the
canonical score, so the picks are the single worker's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spice_ray.select.engines import CandidateShard
from spice_ray.select.factory import SHARDABLE, refusal  # noqa: F401  # refusal: re-export
from spice_ray.select.greedy import Selection, select_shards
from spice_ray.select.prepare import alpha_from_norms, row_norms_sq_canonical, scale_rows
from spice_ray.select.quota import quota_counts
from spice_ray.select.resume import PickCheckpoint, fingerprint
from spice_ray.select.state import Winner

Pick = tuple[np.ndarray, np.ndarray, float, int]  # u, g, q, global index


class ShardWorker:
    """One shard's rows, scaled; after :meth:`build`, its candidate shard(s)."""

    def __init__(
        self, G: np.ndarray, *, offset: int, scale: str = "none", factors: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        self.G = np.ascontiguousarray(scale_rows(np.asarray(G), scale, factors))
        self.offset = int(offset)
        self.groups = None if groups is None else np.asarray(groups, dtype=object)
        self.shards: dict[str | None, CandidateShard] = {}

    def info(self) -> dict[str, Any]:
        return {"n": int(self.G.shape[0]), "d": int(self.G.shape[1])}

    def norms_sq(self) -> np.ndarray:
        """The scaled rows' ``‖g‖²`` (row by row canonical), for ``alpha = "auto"``."""
        return row_norms_sq_canonical(self.G)

    def build(self, *, alpha: float, lam: float, max_updates: int, lazy: bool, device: str | None) -> None:
        kw = dict(alpha=alpha, lam=lam, max_updates=max_updates, lazy=lazy, device=device)
        if self.groups is None:
            self.shards = {None: CandidateShard(self.G, offset=self.offset, **kw)}
            return
        for label in np.unique(self.groups).tolist():
            rows = np.flatnonzero(self.groups == label)
            self.shards[str(label)] = CandidateShard(self.G[rows], indices=self.offset + rows, **kw)

    def apply(self, pick: Pick | None) -> None:
        if pick is not None:
            u, g, q, index = pick
            for shard in self.shards.values():
                shard.update(u, g, q, index)

    def step(self, pick: Pick | None, open_groups: Sequence[str] | None = None) -> Winner | None:
        """Apply the previous step's pick, then return the best of this worker's open shards."""
        self.apply(pick)
        best: Winner | None = None
        for label, shard in self.shards.items():
            if open_groups is not None and label not in open_groups:
                continue
            w = shard.best()
            if w is not None and w.beats(best):
                best = w
        return best

    def exact(self, index: int) -> Winner | None:
        """Canonical values of row ``index`` if this worker holds it, else None."""
        for shard in self.shards.values():
            if shard.local(index) is not None:
                return shard.exact(index)
        return None

    def refreshed(self) -> int:
        return int(sum(s.refreshed for s in self.shards.values()))


class WorkerGroup:
    """The driver side: one round trip per step over the workers (max score, ties → smallest index).

    ``call(method, *args)``: the answers of every worker, in order. ``groups`` (a label per global
    row) with ``k``: per-group quotas, each group's share of ``k`` as the single worker computes it.
    """

    def __init__(
        self, call: Callable[..., list[Any]], n: int, groups: np.ndarray | None = None, k: int = 0
    ) -> None:
        self.call = call
        self.n = int(n)
        self.pending: Pick | None = None
        self.groups = None if groups is None else np.asarray(groups, dtype=object)
        self.left: dict[str, int] = {}
        if self.groups is not None:
            labels = [str(g) for g in np.unique(self.groups).tolist()]
            self.left = dict(zip(labels, quota_counts(self.groups, k), strict=True))

    def _open(self) -> list[str] | None:
        return None if self.groups is None else [g for g, left in self.left.items() if left > 0]

    def best(self) -> Winner | None:
        winners = self.call("step", self.pending, self._open())
        self.pending = None
        best: Winner | None = None
        for w in winners:
            if w is not None and w.beats(best):
                best = w
        return best

    def exact(self, index: int) -> Winner:
        if self.pending is not None:
            self.call("apply", self.pending)
            self.pending = None
        for w in self.call("exact", index):
            if w is not None:
                return w
        raise KeyError(f"row {index} is in no shard")

    def update(self, w: Winner) -> None:
        self.pending = (w.u, w.g, w.q, w.index)
        if self.groups is not None:
            self.left[str(self.groups[w.index])] -= 1

    @property
    def refreshed(self) -> int:
        return int(sum(self.call("refreshed")))


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` row ranges of ``n_shards`` near-equal shards (fewer if n is small)."""
    n_shards = max(1, min(int(n_shards), max(n, 1)))
    edges = [round(i * n / n_shards) for i in range(n_shards + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n_shards)]


def local_workers(
    G: np.ndarray, n_shards: int, *, scale: str = "none", loss_tokens: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> list[ShardWorker]:
    """In-process workers over ``G`` (raw sketches, uid order), as the Ray path plans them."""
    from spice_ray.select.prepare import token_factors

    factors = token_factors(loss_tokens, scale) if scale in ("tokens", "sqrt_tokens") else None
    return [
        ShardWorker(
            G[lo:hi], offset=lo, scale=scale, factors=None if factors is None else factors[lo:hi],
            groups=None if groups is None else np.asarray(groups)[lo:hi],
        )
        for lo, hi in shard_bounds(G.shape[0], n_shards)
    ]


def local_call(workers: Sequence[ShardWorker]) -> Callable[..., list[Any]]:
    """``call`` for :class:`WorkerGroup` over in-process workers."""
    return lambda method, *args, **kw: [getattr(w, method)(*args, **kw) for w in workers]


def select_over_workers(
    call: Callable[..., list[Any]],
    k: int,
    *,
    method: str = "spice",
    alpha: float | str = 1.0,
    lam: float = 0.1,
    omega: float | None = None,
    lazy: bool = True,
    device: str | None = "numpy",
    groups: np.ndarray | None = None,
    checkpoint_fp: dict[str, Any] | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    diagnostics: bool = True,
    progress: bool = False,
) -> Selection:
    """The sharded greedy over built-or-not workers: resolve α from every worker's norms (``"auto"``:
    the single worker's median), build their shards, run :func:`~spice_ray.select.greedy.select_shards`.

    ``checkpoint_fp``: what identifies the data in the checkpoint's fingerprint (the parameters are added).
    """
    if method not in SHARDABLE:
        raise ValueError(f"sharded selection runs the greedy methods {' | '.join(SHARDABLE)}, not {method!r}")
    infos = call("info")
    n = int(sum(i["n"] for i in infos))
    d = int(infos[0]["d"]) if infos else 0
    alpha_f = alpha_from_norms(np.concatenate(call("norms_sq")), alpha) if alpha == "auto" else float(alpha)
    if alpha_f <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha_f}")
    lam_eff = 0.0 if method == "logdet" else float(lam)
    k_eff = min(int(k), n)
    call("build", alpha=alpha_f, lam=lam_eff, max_updates=k_eff, lazy=lazy, device=device)
    ckpt = None
    if checkpoint_dir is not None:
        fp = fingerprint(method=method, n=n, d=d, k=k_eff, alpha=alpha_f, lam=lam_eff, omega=omega, seed=None,
                         pool_size=None, groups=groups, **(checkpoint_fp or {}))
        ckpt = PickCheckpoint(checkpoint_dir, fp)
    group = WorkerGroup(call, n, groups, k_eff)
    sel = select_shards(
        group, k_eff, alpha=alpha_f, lam=lam_eff, omega=omega, method=method, checkpoint=ckpt,
        checkpoint_every=checkpoint_every, diagnostics=diagnostics, progress=progress,
    )
    sel.k_requested = int(k)
    sel.params.update(lazy=lazy, device=device, shards=len(infos), d=d)
    if groups is not None:
        sel.params["quota"] = "groups"
    sel.stats.update(shards=len(infos), scored=group.refreshed, lazy=lazy)
    return sel
