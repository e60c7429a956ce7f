"""The baselines: fixed orders over the rows, no greedy step (``random``, ``gradnorm``, ``longest``,
``less``), and :class:`OrderEngine`, which replays any fixed order (a baseline's, or the picks of the
token-budget greedy) with each pick's canonical values, so every method reports the same trace.

Pure numpy, no Ray. Ties go to the smallest row index (stable sorts).

- ``random``: a permutation seeded with ``seed``.
- ``gradnorm``: the largest ``‖g_i‖`` first.
- ``longest``: the most loss tokens first (``lengths``); the sketches are not looked at — the
  baseline that needs no gradient.
- ``less``: the largest cosine to the target set's mean sketch first
  (:func:`~spice_ray.select.target.target_cosine`, LESS's score).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spice_ray.select.loop import Picks
from spice_ray.select.state import SelectedState
from spice_ray.select.target import target_cosine

FIXED_ORDERS = ("random", "gradnorm", "longest", "less")


def fixed_order(
    method: str, G: np.ndarray, k: int, norm_sq: np.ndarray, seed: int, target: np.ndarray | None,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """The first ``k`` rows of ``method``'s order (int64 indices)."""
    n = G.shape[0]
    if method == "random":
        return np.random.default_rng(seed).permutation(n)[:k].astype(np.int64)
    if method == "gradnorm":  # largest norm first, ties by index (stable sort of −‖g‖)
        return np.argsort(-norm_sq, kind="stable")[:k].astype(np.int64)
    if method == "longest":  # most loss tokens first, ties by index; the sketches are not looked at
        if lengths is None or len(lengths) != n:
            raise ValueError("method 'longest' needs each row's loss tokens (lengths=, n values)")
        return np.argsort(-np.asarray(lengths, dtype=np.float64), kind="stable")[:k].astype(np.int64)
    if method != "less":
        raise ValueError(f"{method!r} is not a fixed order; expected one of {', '.join(FIXED_ORDERS)}")
    if target is None:  # top-k cosine to the target set's mean sketch, ties by index
        raise ValueError("method 'less' needs target sketches (target=(M, d) array)")
    cos = target_cosine(G, target, norm_sq)
    return np.argsort(-cos, kind="stable")[:k].astype(np.int64)


class OrderEngine:
    """An :class:`~spice_ray.select.loop.Engine` that yields the rows of a fixed ``order`` with their
    canonical values (the same trace a greedy records: gain, conflict and score against the rows before)."""

    def __init__(
        self, order: np.ndarray, G: np.ndarray, *, alpha: float, lam: float, params: dict[str, Any] | None = None
    ) -> None:
        self.order = np.asarray(order, dtype=np.int64)
        self.G = G
        self.alpha, self.lam = alpha, lam
        self.params = dict(params or {})

    def picks(self, steps: int, forced: list[int]) -> Picks:
        state = SelectedState(self.G.shape[1], max(1, len(self.order)), self.alpha, self.lam)
        for i in self.order[:steps].tolist():
            w = state.winner(self.G[[i]].astype(np.float64), np.array([i]))
            yield w, False
            state.add(w.u, w.g, w.q)

    def stats(self) -> dict[str, Any]:
        return {}
