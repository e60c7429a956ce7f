"""What the selection sees of the sketches: their scaling, α, and per-source quotas (pure numpy).

The paper's objective takes the sketches as they come: the gradient of each record's *mean*
token loss, with α = 1. On real instruction data most of those sketches are short
(‖g‖² ≪ 1/α), so log det(I + α Σ g gᵀ) is nearly linear and the greedy ranks by ‖g‖: it favours
short, high-loss records of a few sources (issue 11's measurements). These options change that
without touching the objective:

- ``scale="unit"``: g/‖g‖ (as LESS): only directions count;
- ``scale="tokens"``: g × n_i / mean(n) with n_i the record's loss tokens: the gradient of the
  *summed* token loss, so a record weighs what it trains (rescaled by the mean so α keeps its scale);
- ``scale="sqrt_tokens"``: in between;
- ``alpha="auto"``: α = 1 / median ‖g‖² of the scaled sketches, out of the linear regime;
- quotas by source: each source gets its share of the budget by largest remainder.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


_CHUNK = 1 << 15  # rows per float64 temporary


def row_norms_sq_canonical(G: np.ndarray) -> np.ndarray:
    """``‖g_i‖²`` in float64, each row's value independent of the others (elementwise product, numpy's
    pairwise row sum): the same bits whether computed over all rows or over one shard's slice."""
    out = np.empty(G.shape[0], dtype=np.float64)
    for a in range(0, G.shape[0], _CHUNK):
        X = G[a : a + _CHUNK].astype(np.float64)
        out[a : a + _CHUNK] = np.multiply(X, X).sum(axis=1)
    return out


def token_factors(loss_tokens: np.ndarray | None, mode: str) -> np.ndarray:
    """Per-row factors of ``tokens`` / ``sqrt_tokens`` scaling: ``w_i / mean(w)`` over *all* rows."""
    if loss_tokens is None:
        raise ValueError(f"select.scale={mode} needs the sketches' n_loss_tokens column (sketch format 4 or later)")
    n = np.asarray(loss_tokens, dtype=np.float64)
    w = n if mode == "tokens" else np.sqrt(n)
    return w / max(float(w.mean()), 1e-12)


def scale_rows(G: np.ndarray, mode: str, factors: np.ndarray | None = None) -> np.ndarray:
    """``G`` scaled row by row: ``unit`` from each row's own norm, ``tokens``/``sqrt_tokens`` by the
    given per-row ``factors`` (:func:`token_factors`, sliced for a shard). Row by row deterministic,
    so a shard scaling its slice gets the rows a single worker gets. ``G`` itself for ``none``."""
    if mode == "none":
        return G
    if mode == "unit":
        norms = np.sqrt(row_norms_sq_canonical(G))
        factors = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    elif mode not in ("tokens", "sqrt_tokens"):
        raise ValueError(f"unknown sketch scaling {mode!r}")
    elif factors is None or len(factors) != G.shape[0]:
        raise ValueError(f"select.scale={mode} needs one factor per row")
    out = np.empty(G.shape, dtype=np.float32)
    for a in range(0, G.shape[0], _CHUNK):
        out[a : a + _CHUNK] = G[a : a + _CHUNK].astype(np.float64) * factors[a : a + _CHUNK, None]
    return out


def scale_sketches(G: np.ndarray, loss_tokens: np.ndarray | None, mode: str) -> np.ndarray:
    """``G`` scaled row by row as ``mode`` says (a new float32 array; ``G`` itself for ``none``)."""
    if mode in ("none", "unit"):
        return scale_rows(G, mode)
    if mode not in ("tokens", "sqrt_tokens"):
        raise ValueError(f"unknown sketch scaling {mode!r}")
    return scale_rows(G, mode, token_factors(loss_tokens, mode))


def alpha_from_norms(norm_sq: np.ndarray, alpha: float | str) -> float:
    """``alpha`` itself, or for ``"auto"`` 1 / median of the nonzero ``norm_sq`` (any order)."""
    if alpha != "auto":
        return float(alpha)
    positive = norm_sq[norm_sq > 0]
    if positive.size == 0:
        raise ValueError("alpha=auto: every sketch is zero")
    return 1.0 / float(np.median(positive))


def resolve_alpha(G: np.ndarray, alpha: float | str) -> float:
    """``alpha`` itself, or for ``"auto"`` 1 / median ‖g‖² over the nonzero rows."""
    if alpha != "auto":
        return float(alpha)
    return alpha_from_norms(row_norms_sq_canonical(G), alpha)


def quotas(groups: list[str], k: int) -> dict[str, int]:
    """Each group's share of ``k`` by largest remainder (ties by name), never above its size."""
    sizes = Counter(groups)
    n = sum(sizes.values())
    exact = {g: k * c / n for g, c in sizes.items()}
    out = {g: min(sizes[g], math.floor(x)) for g, x in exact.items()}
    for g in sorted(exact, key=lambda g: (-(exact[g] - math.floor(exact[g])), g)):
        if sum(out.values()) >= min(k, n):
            break
        if out[g] < sizes[g]:
            out[g] += 1
    return out
