"""Selection aimed at a target set (LESS's setting): what the target's rows and direction do.

Pure numpy, no Ray. ``select.target`` names a target set: a few examples of the task the model is
tuned for. Two rules follow from it, for every method:

- **Its rows are never candidates.** When the target is a list of pool uids, those rows are the
  yardstick, not training data: a selection that returned them would look aligned by construction,
  and a baseline that happened to draw them would train on the target itself. They are taken out of
  the candidates before any method runs (random, longest and gradnorm included), so every arm of a
  bench chooses from the same rows.
- **spice and logdet select among the rows closest to it.** The candidates are narrowed to the
  ``select.target_pool`` share of rows whose gradient has the largest cosine to the target set's
  mean gradient (LESS's score, :func:`target_cosine`), at least the budget; the greedy (log det and
  its conflict term) then picks the diverse, non-conflicting ones among them. ``target_pool: 1``
  (the default) ignores the target's direction; ``less`` is the other end, the top-k by cosine alone.
  The default is what measured best: on the bench's targeted setting (gsm8k as the target,
  pico-llama as the proxy; benchmarks/RESULTS.md) the closer the selection aimed at the target's
  gradient, the worse the model did on the target, LESS worst of all.
"""

from __future__ import annotations

import math

import numpy as np

from spice_ray.select.engines import row_norms_sq


def target_cosine(G: np.ndarray, target: np.ndarray, norm_sq: np.ndarray | None = None) -> np.ndarray:
    """Each row's cosine to the mean of the target sketches (0 for a zero row); float64 (n,).
    ``norm_sq``: the rows' squared norms where the caller has them."""
    T = np.asarray(target, dtype=np.float64)
    if T.ndim == 1:
        T = T[None, :]
    if T.ndim != 2 or T.shape[1] != G.shape[1] or T.shape[0] == 0:
        raise ValueError(f"target must be an (M, {G.shape[1]}) array, got shape {T.shape}")
    if not np.isfinite(T).all():
        raise ValueError("target sketches contain NaN or inf")
    mean = T.mean(axis=0)
    m_norm = float(np.linalg.norm(mean))
    if m_norm == 0:
        raise ValueError("the target sketches' mean is zero: cosine to it is undefined")
    n = G.shape[0]
    cos = np.zeros(n, dtype=np.float64)
    for a in range(0, n, 1 << 16):
        cos[a : a + (1 << 16)] = G[a : a + (1 << 16)].astype(np.float64) @ (mean / m_norm)
    if norm_sq is None:
        norm_sq = row_norms_sq(G)
    norms = np.sqrt(norm_sq)
    np.divide(cos, norms, out=cos, where=norms > 0)
    cos[norms == 0] = 0.0
    return cos


def closest_rows(cos: np.ndarray, share: float, *, at_least: int = 0, costs: np.ndarray | None = None,
                 max_cost: float | None = None) -> np.ndarray:
    """The indices (ascending) of the ``share`` of rows with the largest cosine (ties: smaller index),
    at least ``at_least`` of them, and with a cost budget, enough that their costs cover ``max_cost``."""
    n = len(cos)
    order = np.argsort(-cos, kind="stable")
    m = max(math.ceil(share * n), at_least)
    if costs is not None and max_cost is not None:
        covered = np.cumsum(np.asarray(costs, dtype=np.float64)[order])
        m = max(m, int(np.searchsorted(covered, max_cost, side="left")) + 1)
    return np.sort(order[: min(m, n)])
