"""Diagnostics of a selection trace (pure numpy): the ε bound, conflict–gain correlation, curvature.

Inputs are the picked sketches in pick order (``rows``, (t, d)) and the per-step trace; nothing
here touches the unpicked candidates, so the cost is O(t·d² + t·B·d) (blocked BLAS) whatever N is.

* ``eps[t] = Δ_t − b_t`` (gain minus base ``b_t = log(1 + α‖g_t‖²)``; ≤ 0).
* ``eps_bound[t] = α² Σ_{j<t} (g_tᵀ g_j)² / (1 + α‖g_t‖²)`` — the paper's first-order bound on |ε|.
  ``Σ_{j<t}(g_tᵀg_j)² = g_tᵀ F_{<t} g_t`` with ``F = Σ_j g_j g_jᵀ``, computed blockwise. It is a
  first-order statement (``|ε| = −log(1 − y)`` with ``y ≤`` the bound ``≥ y`` only to first
  order), so it can fail; we report the fraction of steps where it holds (with a 1e-12 relative
  tolerance for rounding, which matters at step 0 where both sides are 0).
* ``conflict_gain_spearman``: Spearman rank correlation of ``conflict[t]`` with ``Δ_t`` over the
  steps (the paper reports −0.79); None when either is constant.
* ``curvature``: the total curvature of F restricted to the picked set,
  ``κ_S = 1 − min_{i∈S} Δ_i(S∖i)/Δ_i(∅)`` — a cheap lower estimate of the total curvature over the
  whole ground set (``V ⊇ S``), from the leave-one-out gains
  ``Δ_i(S∖i) = −log(1 − α g_iᵀ M_S⁻¹ g_i)`` (Sherman–Morrison), O(t·d² + d³) or O(t³) if t < d.
  Rows with ``g = 0`` are skipped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def cross_energy(rows: np.ndarray, block: int = 256) -> np.ndarray:
    """``Σ_{j<t} (g_tᵀ g_j)²`` for each t (rows in pick order), in O(t·d² + t·block·d)."""
    X = np.asarray(rows, dtype=np.float64)
    t, d = X.shape
    out = np.zeros(t, dtype=np.float64)
    F = np.zeros((d, d), dtype=np.float64)
    for a in range(0, t, block):
        Xb = X[a : a + block]
        inner = Xb @ Xb.T
        out[a : a + block] = np.einsum("ij,ij->i", Xb @ F, Xb) + (np.tril(inner, -1) ** 2).sum(axis=1)
        F += Xb.T @ Xb
    return out


def eps_bound(rows: np.ndarray, alpha: float) -> np.ndarray:
    """The per-step bound ``α² Σ_{j<t}(g_tᵀg_j)² / (1 + α‖g_t‖²)``."""
    X = np.asarray(rows, dtype=np.float64)
    norm_sq = np.einsum("ij,ij->i", X, X)
    return alpha * alpha * cross_energy(X) / (1.0 + alpha * norm_sq)


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), as scipy.stats.rankdata(method="average")."""
    x = np.asarray(x)
    sorter = np.argsort(x, kind="mergesort")
    inv = np.empty(sorter.size, dtype=np.intp)
    inv[sorter] = np.arange(sorter.size, dtype=np.intp)
    xs = x[sorter]
    obs = np.r_[True, xs[1:] != xs[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], len(obs)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation; None for fewer than 3 points or a constant series."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or x.size != y.size:
        return None
    rx, ry = _rankdata(x), _rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if den == 0:
        return None
    return float(rx @ ry) / den


def leave_one_out_gains(rows: np.ndarray, alpha: float) -> np.ndarray:
    """``Δ_i(S∖i) = log det M_S − log det M_{S∖i} = −log(1 − α g_iᵀ M_S⁻¹ g_i)`` for each picked i."""
    X = np.asarray(rows, dtype=np.float64)
    t, d = X.shape
    if t == 0:
        return np.zeros(0)
    if t < d:  # g_iᵀ M⁻¹ g_i = [K (I + αK)⁻¹]_ii with K = X Xᵀ
        K = X @ X.T
        h = np.diag(np.linalg.solve(np.eye(t) + alpha * K, K)).copy()
    else:
        M = np.eye(d) + alpha * (X.T @ X)
        Y = np.linalg.solve(M, X.T)  # M⁻¹ Xᵀ
        h = np.einsum("ij,ji->i", X, Y)
    ah = np.clip(alpha * h, 0.0, 1.0 - 1e-15)
    return -np.log1p(-ah)


def curvature(rows: np.ndarray, alpha: float) -> float | None:
    """``κ_S = 1 − min_{i∈S} Δ_i(S∖i)/Δ_i(∅)`` over the picked rows with g ≠ 0 (None if none)."""
    X = np.asarray(rows, dtype=np.float64)
    if X.shape[0] < 2:
        return None
    base = np.log1p(alpha * np.einsum("ij,ij->i", X, X))
    ok = base > 0
    if not ok.any():
        return None
    ratio = leave_one_out_gains(X, alpha)[ok] / base[ok]
    return float(min(1.0, max(0.0, 1.0 - ratio.min())))


def diagnose(
    rows: np.ndarray, gains: np.ndarray, bases: np.ndarray, conflicts: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Per-step ``eps`` and ``eps_bound`` arrays and the JSON-ready summary of a trace."""
    gains = np.asarray(gains, dtype=np.float64)
    bases = np.asarray(bases, dtype=np.float64)
    eps = gains - bases
    bound = eps_bound(rows, alpha) if len(gains) else np.zeros(0)
    holds = np.abs(eps) <= bound * (1 + 1e-9) + 1e-12 * (1.0 + bases)
    n = int(len(gains))

    def _f(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(x)

    summary = {
        "steps": n,
        "gain_first": _f(float(gains[0])) if n else None,
        "gain_last": _f(float(gains[-1])) if n else None,
        "gain_decay": _f(float(gains[-1] / gains[0])) if n and gains[0] > 0 else None,
        "mean_eps": _f(float(eps.mean())) if n else None,
        "min_eps": _f(float(eps.min())) if n else None,
        "eps_bound_holds": _f(float(holds.mean())) if n else None,
        "conflict_gain_spearman": spearman(conflicts, gains),
        "curvature": curvature(rows, alpha),
    }
    return eps, bound, summary


PAPER = {"conflict_gain_spearman": -0.79, "gain_halving_step": "10–30"}


def candidate_scores(G: np.ndarray, picked: np.ndarray, alpha: float, block: int = 1 << 15) -> dict[str, np.ndarray]:
    """For every row of ``G`` against the set ``picked``: gain Δ_i(S), base b_i, ε_i = Δ_i − b_i and
    conflict c_i(S) = max(0, −cos(g_i, ḡ_S)) (0 when S is empty), in float64."""
    S = np.asarray(G[np.asarray(picked, dtype=np.int64)], dtype=np.float64)
    d = G.shape[1]
    M = np.eye(d) + alpha * (S.T @ S)
    Minv = np.linalg.inv(M)
    mean = S.mean(axis=0) if len(S) else np.zeros(d)
    m_norm = float(np.linalg.norm(mean))
    out = {name: np.zeros(G.shape[0]) for name in ("gain", "base", "eps", "conflict")}
    for a in range(0, G.shape[0], block):
        X = np.asarray(G[a : a + block], dtype=np.float64)
        q = np.einsum("ij,ij->i", X @ Minv, X)
        norm_sq = np.einsum("ij,ij->i", X, X)
        gain, base = np.log1p(alpha * q), np.log1p(alpha * norm_sq)
        cos = np.zeros(len(X))
        if m_norm > 0:
            norms = np.sqrt(norm_sq)
            np.divide(X @ mean, norms * m_norm, out=cos, where=norms > 0)
        out["gain"][a : a + block], out["base"][a : a + block] = gain, base
        out["eps"][a : a + block], out["conflict"][a : a + block] = gain - base, np.maximum(0.0, -cos)
    return out


def candidate_diagnostics(G: np.ndarray, picks: np.ndarray, gains: np.ndarray, alpha: float, steps: list[int] | None = None) -> dict[str, Any]:
    """The paper's diagnostics, over all candidates not yet picked at chosen steps t:
    Spearman ρ(c_i, Δ_i) and ρ(c_i, |ε_i|), and the first step whose gain is at most half the first
    gain. ``steps`` default: 1, k/10, k/4, k/2 and k−1 (the distinct ones in 1..k−1)."""
    picks = np.asarray(picks, dtype=np.int64)
    k = len(picks)
    if steps is None:
        steps = sorted({t for t in (1, k // 10, k // 4, k // 2, k - 1) if 1 <= t < k})
    per_step = []
    for t in steps:
        scores = candidate_scores(G, picks[:t], alpha)
        free = np.ones(G.shape[0], dtype=bool)
        free[picks[:t]] = False
        c, gain, eps = scores["conflict"][free], scores["gain"][free], np.abs(scores["eps"][free])
        per_step.append({"step": int(t), "candidates": int(free.sum()), "rho_conflict_gain": spearman(c, gain),
                         "rho_conflict_abs_eps": spearman(c, eps), "mean_conflict": float(c.mean()) if c.size else None})
    gains = np.asarray(gains, dtype=np.float64)
    halved = np.flatnonzero(gains <= gains[0] / 2) if len(gains) and gains[0] > 0 else np.zeros(0, dtype=np.int64)
    rhos = [s["rho_conflict_gain"] for s in per_step if s["rho_conflict_gain"] is not None]
    return {
        "candidate_steps": per_step,
        "rho_conflict_gain": float(np.mean(rhos)) if rhos else None,
        "gain_halving_step": int(halved[0]) if halved.size else None,
        "paper": dict(PAPER),
    }
