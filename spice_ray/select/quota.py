"""Selection under per-group quotas (a partition matroid): each group — a record's source — gets its
share of the budget, and the method picks within it.

Greedy methods run one joint greedy over one candidate shard per group: every step takes the best
candidate (max score, ties → smallest index) among the groups whose quota is not yet full, and the
pick updates every shard's state, so a pick in one source lowers the gains of similar records in
all the others (the log-det still measures the whole selection). Fixed-order methods (random,
gradnorm, less) take each group's own first ``quota`` rows of their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spice_ray.select.engines import CandidateShard
from spice_ray.select.state import Winner


class QuotaShards:
    """A :class:`~spice_ray.select.loop.ShardGroup` whose shards stop competing once their quota is met."""

    def __init__(self, shards: Sequence[CandidateShard], quotas: Sequence[int]) -> None:
        self.shards = list(shards)
        self.quotas = list(quotas)
        self.taken = [0] * len(self.shards)
        self.n = sum(len(s) for s in self.shards)

    def _open(self) -> list[int]:
        return [i for i, (taken, quota) in enumerate(zip(self.taken, self.quotas, strict=True)) if taken < quota]

    def best(self) -> Winner | None:
        best: Winner | None = None
        for i in self._open():
            w = self.shards[i].best()
            if w is not None and w.beats(best):
                best = w
        return best

    def _owner(self, index: int) -> int:
        for i, shard in enumerate(self.shards):
            if shard.local(index) is not None:
                return i
        raise KeyError(f"row {index} is in no shard")

    def exact(self, index: int) -> Winner:
        return self.shards[self._owner(index)].exact(index)

    def update(self, w: Winner) -> None:
        self.taken[self._owner(w.index)] += 1
        for shard in self.shards:
            shard.update(w.u, w.g, w.q, w.index)

    @property
    def refreshed(self) -> int:
        return sum(s.refreshed for s in self.shards)


def group_rows(groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each group, groups in order of their labels, rows ascending."""
    labels = np.asarray(groups)
    return [np.flatnonzero(labels == g) for g in np.unique(labels)]


def quota_counts(groups: np.ndarray, k: int) -> list[int]:
    """Each group's (label order) share of ``k`` by largest remainder, never above its size."""
    from spice_ray.select.prepare import quotas

    labels = np.asarray(groups)
    names = [str(g) for g in np.unique(labels)]
    by_name = quotas([str(g) for g in labels.tolist()], k)
    return [by_name[n] for n in names]


def fixed_order_with_quotas(order: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """The first ``quota`` rows of ``order`` within each group, kept in ``order``'s sequence."""
    labels = np.asarray(groups)
    left = dict(zip((str(g) for g in np.unique(labels)), quota_counts(labels, k), strict=True))
    out = []
    for i in np.asarray(order).tolist():
        g = str(labels[i])
        if left[g] > 0:
            out.append(i)
            left[g] -= 1
    return np.asarray(out, dtype=np.int64)
