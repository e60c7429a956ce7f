"""The result of a selection run: :class:`Selection` (picks, per-step trace, diagnostics), built from
the recorded picks by :func:`build_selection`; and :func:`logdet_of`, the objective by a direct slogdet.

Pure numpy, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from spice_ray.select.diagnostics import diagnose

if TYPE_CHECKING:
    from spice_ray.select.loop import Recorder

STOP_REASONS = ("budget", "exhausted", "early_stop")


@dataclass
class Selection:
    """The picks of one selection run, in order, with the per-step trace and diagnostics.

    ``gains[t]``, ``conflicts[t]`` and ``scores[t]`` are measured against the set selected before
    pick ``t``; ``logdets[t]`` is ``log det(I + α F_S)`` after it (so ``logdet == logdets[-1]``);
    ``eps[t] = gains[t] − bases[t]`` and ``eps_bound[t]`` its first-order bound (see
    :mod:`spice_ray.select.diagnostics`).
    """

    indices: np.ndarray
    gains: np.ndarray
    bases: np.ndarray
    conflicts: np.ndarray
    scores: np.ndarray
    logdets: np.ndarray
    logdet: float
    stop_reason: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    n_candidates: int = 0
    k_requested: int = 0
    eps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eps_bound: np.ndarray = field(default_factory=lambda: np.zeros(0))
    diagnostics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary of the run (no per-step arrays)."""
        n = len(self)
        return {
            "n_candidates": int(self.n_candidates),
            "k_requested": int(self.k_requested),
            "k_selected": n,
            "logdet": float(self.logdet),
            "mean_conflict": float(self.conflicts.mean()) if n else 0.0,
            "mean_gain": float(self.gains.mean()) if n else 0.0,
            "stop_reason": self.stop_reason,
            "method": self.method,
            "alpha": float(self.params["alpha"]),
            "lam": float(self.params["lam"]),
            "omega": None if self.params.get("omega") is None else float(self.params["omega"]),
            "budget": self.params.get("budget"),
            "diagnostics": dict(self.diagnostics),
            "engine": dict(self.stats),
        }


def build_selection(
    rec: Recorder,
    *,
    method: str,
    params: dict[str, Any],
    n: int,
    k_requested: int,
    early: bool,
    diagnostics: bool,
    stats: dict[str, Any] | None = None,
) -> Selection:
    """The :class:`Selection` (trace, log-dets, diagnostics) of a recorded run."""
    alpha = float(params["alpha"])
    d_rows = rec.rows[0].shape[0] if rec.rows else 0
    rows = np.stack(rec.rows) if rec.rows else np.zeros((0, d_rows))
    gains = np.asarray(rec.gains, dtype=np.float64)
    conflicts = np.asarray(rec.conflicts, dtype=np.float64)
    bases = np.log1p(alpha * np.einsum("ij,ij->i", rows, rows)) if len(rows) else np.zeros(0)
    logdets = np.cumsum(gains)
    if diagnostics:
        eps, bound, diag = diagnose(rows, gains, bases, conflicts, alpha)
    else:
        eps, bound, diag = gains - bases, np.full(len(gains), np.nan), {}
    if early:
        stop_reason = "early_stop"
    elif len(rec.picks) >= n:
        stop_reason = "exhausted"
    else:
        stop_reason = "budget"
    return Selection(
        indices=np.asarray(rec.picks, dtype=np.int64),
        gains=gains,
        bases=bases,
        conflicts=conflicts,
        scores=np.asarray(rec.scores, dtype=np.float64),
        logdets=logdets,
        logdet=float(logdets[-1]) if len(logdets) else 0.0,
        stop_reason=stop_reason,
        method=method,
        params=params,
        n_candidates=n,
        k_requested=k_requested,
        eps=eps,
        eps_bound=bound,
        diagnostics=diag,
        stats=dict(stats or {}),
    )


def logdet_of(sketches: np.ndarray, indices: np.ndarray | list[int], alpha: float = 1.0) -> float:
    """``log det(I + α Σ_{i∈indices} g_i g_iᵀ)`` by a direct slogdet (t×t Gram form when t < d)."""
    G_s = np.asarray(sketches)[np.asarray(indices, dtype=np.int64)].astype(np.float64)
    t, d = G_s.shape
    if t == 0:
        return 0.0
    if t <= d:
        mat = np.eye(t) + alpha * (G_s @ G_s.T)
    else:
        mat = np.eye(d) + alpha * (G_s.T @ G_s)
    sign, value = np.linalg.slogdet(mat)
    if sign <= 0:
        raise FloatingPointError("I + αF is not positive definite (numerical breakdown)")
    return float(value)
