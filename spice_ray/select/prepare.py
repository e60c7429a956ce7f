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


def scale_sketches(G: np.ndarray, loss_tokens: np.ndarray | None, mode: str) -> np.ndarray:
    """``G`` scaled row by row as ``mode`` says (a new float32 array; ``G`` itself for ``none``)."""
    if mode == "none":
        return G
    if mode == "unit":
        norms = np.linalg.norm(G.astype(np.float64), axis=1)
        factor = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    elif mode in ("tokens", "sqrt_tokens"):
        if loss_tokens is None:
            raise ValueError(f"select.scale={mode} needs the sketches' n_loss_tokens column (sketch format 4 or later)")
        n = np.asarray(loss_tokens, dtype=np.float64)
        w = n if mode == "tokens" else np.sqrt(n)
        factor = w / max(float(w.mean()), 1e-12)
    else:
        raise ValueError(f"unknown sketch scaling {mode!r}")
    return (G.astype(np.float64) * factor[:, None]).astype(np.float32)


def resolve_alpha(G: np.ndarray, alpha: float | str) -> float:
    """``alpha`` itself, or for ``"auto"`` 1 / median ‖g‖² over the nonzero rows."""
    if alpha != "auto":
        return float(alpha)
    norm_sq = np.einsum("ij,ij->i", G.astype(np.float64), G.astype(np.float64))
    positive = norm_sq[norm_sq > 0]
    if positive.size == 0:
        raise ValueError("alpha=auto: every sketch is zero")
    return 1.0 / float(np.median(positive))


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
