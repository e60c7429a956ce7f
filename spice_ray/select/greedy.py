"""Greedy selection over gradient sketches: SPICE, plain log-det greedy and two baselines.

Pure numpy (no Ray). The objective is ``F(S) = log det(I + α Σ_{i∈S} g_i g_iᵀ)`` (DESIGN §3). Each
greedy step makes one pass over the (N, d) sketch matrix: a fused product ``G @ [u, g]`` updates
every candidate's ``q_i = g_iᵀ M⁻¹ g_i`` (``M = I + α F_S``) and its dot with the running sum of the
selected sketches, from which the gain ``Δ_i = log(1 + α q_i)`` and the conflict
``c_i = max(0, −cos(g_i, ḡ_S))`` follow. No N×N kernel is ever formed.

The selected-side state ``M⁻¹`` is kept either dense (d×d) or, while the budget is below d, in the
factored form ``M⁻¹ = I − Σ_j c_j u_j u_jᵀ`` (t×d), whichever is smaller; both are exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("spice", "logdet", "random", "gradnorm")
STOP_REASONS = ("budget", "exhausted", "early_stop")


@dataclass
class Selection:
    """The picks of one selection run, in order, with the per-step trace.

    ``gains[t]``, ``conflicts[t]`` and ``scores[t]`` are measured against the set selected before
    pick ``t``; ``logdets[t]`` is ``log det(I + α F_S)`` after it (so ``logdet == logdets[-1]``).
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
        }


class _InverseState:
    """``M⁻¹`` for ``M = I + α Σ_{j∈S} g_j g_jᵀ``, updated by Sherman–Morrison (float64).

    Dense (d×d) when the number of updates may reach d, else factored as ``I − Σ_j c_j u_j u_jᵀ``.
    """

    def __init__(self, d: int, max_updates: int, alpha: float) -> None:
        self.alpha = alpha
        self.dense = max_updates >= d
        if self.dense:
            self.minv = np.eye(d, dtype=np.float64)
        else:
            self.u = np.empty((max(max_updates, 0), d), dtype=np.float64)
            self.c = np.empty(max(max_updates, 0), dtype=np.float64)
        self.t = 0

    def apply(self, g: np.ndarray) -> np.ndarray:
        """``M⁻¹ g`` for a float64 vector ``g``."""
        if self.dense:
            return self.minv @ g
        if self.t == 0:
            return g.copy()
        u, c = self.u[: self.t], self.c[: self.t]
        return g - u.T @ (c * (u @ g))

    def add(self, u: np.ndarray, q: float) -> None:
        """Add ``g`` with ``u = M⁻¹ g`` and ``q = gᵀ M⁻¹ g`` (both before the update)."""
        coef = self.alpha / (1.0 + self.alpha * q)
        if self.dense:
            self.minv -= coef * np.outer(u, u)
        else:
            self.u[self.t] = u
            self.c[self.t] = coef
        self.t += 1


def _row_norms_sq(G: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``‖g_i‖²`` in float64, chunked so no float64 copy of G is made."""
    out = np.empty(G.shape[0], dtype=np.float64)
    for start in range(0, G.shape[0], chunk):
        block = G[start : start + chunk].astype(np.float64, copy=False)
        out[start : start + chunk] = np.einsum("ij,ij->i", block, block)
    return out


def _as_matrix(sketches: np.ndarray) -> np.ndarray:
    G = np.asarray(sketches)
    if G.ndim != 2:
        raise ValueError(f"sketches must be a 2-d (N, d) array, got shape {G.shape}")
    if G.dtype not in (np.float32, np.float64):
        G = G.astype(np.float32)
    if not np.isfinite(G).all():
        raise ValueError("sketches contain NaN or inf")
    return np.ascontiguousarray(G)


class _Progress:
    """A rich progress bar (steps/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class _Rate(ProgressColumn):
                def render(self, task):  # type: ignore[override]
                    speed = task.finished_speed or task.speed
                    return Text("?  steps/s" if speed is None else f"{speed:,.1f} steps/s")

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _greedy(
    G: np.ndarray,
    k: int,
    alpha: float,
    lam: float,
    omega: float | None,
    norm_sq: np.ndarray,
    bar: _Progress,
) -> tuple[list[int], list[float], list[float], list[float], str | None]:
    """Greedy argmax of ``Δ − λ c``; returns picks, gains, conflicts, scores, early-stop flag."""
    n = G.shape[0]
    q = norm_sq.copy()  # g_iᵀ M⁻¹ g_i
    dot = np.zeros(n, dtype=np.float64)  # g_iᵀ s, s = Σ_{j∈S} g_j
    norms = np.sqrt(norm_sq)
    inv_norm = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    s = np.zeros(G.shape[1], dtype=np.float64)
    selected = np.zeros(n, dtype=bool)
    inv = _InverseState(G.shape[1], k, alpha)
    gain = np.empty(n, dtype=np.float64)
    conflict = np.zeros(n, dtype=np.float64)
    score = np.empty(n, dtype=np.float64)

    picks: list[int] = []
    gains: list[float] = []
    conflicts: list[float] = []
    scores: list[float] = []
    first_gain: float | None = None
    early = None
    for _ in range(k):
        np.multiply(q, alpha, out=gain)
        np.log1p(gain, out=gain)
        s_norm = float(np.sqrt(s @ s))
        if s_norm > 0 and lam != 0:
            # c = max(0, −cos) = max(0, −dot / (‖g‖‖s‖)); inv_norm is 0 for zero rows.
            np.multiply(dot, inv_norm, out=conflict)
            conflict *= -1.0 / s_norm
            np.clip(conflict, 0.0, 1.0, out=conflict)
            np.multiply(conflict, -lam, out=score)
            score += gain
        else:
            score[:] = gain
        score[selected] = -np.inf
        i = int(np.argmax(score))
        if omega is not None and first_gain is not None and gain[i] <= omega * first_gain:
            early = "early_stop"
            break

        g = G[i].astype(np.float64)
        u = inv.apply(g)
        q_s = max(float(g @ u), 0.0)  # exact gain of the pick, from the float64 state
        if s_norm > 0 and norms[i] > 0:
            c_i = min(1.0, max(0.0, -float(g @ s) / (norms[i] * s_norm)))
        else:
            c_i = 0.0
        g_i = float(np.log1p(alpha * q_s))
        if first_gain is None:
            first_gain = g_i
        picks.append(i)
        gains.append(g_i)
        conflicts.append(c_i)
        scores.append(g_i - lam * c_i)

        selected[i] = True
        if len(picks) < k:  # the candidate-side update is only needed for a further step
            R = G @ np.stack([u, g], axis=1).astype(G.dtype, copy=False)
            r0 = R[:, 0].astype(np.float64)
            r0 *= r0
            r0 *= alpha / (1.0 + alpha * q_s)
            q -= r0
            np.maximum(q, 0.0, out=q)
            dot += R[:, 1]
        inv.add(u, q_s)
        s += g
        bar.step()
    return picks, gains, conflicts, scores, early


def _trace_fixed(
    G: np.ndarray, order: np.ndarray, alpha: float, lam: float, norm_sq: np.ndarray, bar: _Progress
) -> tuple[list[float], list[float], list[float]]:
    """Gains, conflicts and scores along a fixed order (O(d²) or O(t·d) per pick, no pass over G)."""
    inv = _InverseState(G.shape[1], len(order), alpha)
    s = np.zeros(G.shape[1], dtype=np.float64)
    gains: list[float] = []
    conflicts: list[float] = []
    scores: list[float] = []
    for i in order:
        g = G[i].astype(np.float64)
        u = inv.apply(g)
        q_s = max(float(g @ u), 0.0)
        s_norm = float(np.sqrt(s @ s))
        g_norm = float(np.sqrt(norm_sq[i]))
        c_i = min(1.0, max(0.0, -float(g @ s) / (g_norm * s_norm))) if s_norm > 0 and g_norm > 0 else 0.0
        gain = float(np.log1p(alpha * q_s))
        gains.append(gain)
        conflicts.append(c_i)
        scores.append(gain - lam * c_i)
        inv.add(u, q_s)
        s += g
        bar.step()
    return gains, conflicts, scores


def select(
    sketches: np.ndarray,
    k: int,
    *,
    method: str = "spice",
    alpha: float = 1.0,
    lam: float = 0.1,
    omega: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Selection:
    """Select up to ``k`` rows of ``sketches`` (N, d) by ``method``; the library entry point.

    Methods: ``spice`` (greedy ``argmax Δ − λ c``), ``logdet`` (the same with λ = 0), ``random``
    (a seeded permutation) and ``gradnorm`` (top-k by ‖g_i‖). Ties go to the smallest row index, so
    callers sort rows by uid first. ``omega`` (spice/logdet only) stops before the first pick whose
    gain is ≤ ω × the first gain. Every method reports the same trace (gains, conflicts, scores
    with the given λ, running log-dets).
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {', '.join(METHODS)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if omega is not None and not 0 < omega < 1:
        raise ValueError(f"omega must be in (0, 1), got {omega}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    G = _as_matrix(sketches)
    n, d = G.shape
    k_eff = min(int(k), n)
    lam_eff = 0.0 if method == "logdet" else float(lam)
    params = {"alpha": float(alpha), "lam": lam_eff, "omega": omega, "seed": int(seed)}
    if omega is not None and method in ("random", "gradnorm"):
        log.info("omega=%s is ignored by the %s baseline (no greedy gain to stop on)", omega, method)

    t0 = time.perf_counter()
    norm_sq = _row_norms_sq(G)
    bar = _Progress(progress, k_eff, f"select[{method}]")
    early = None
    try:
        if method in ("spice", "logdet"):
            picks, gains, conflicts, scores, early = _greedy(G, k_eff, alpha, lam_eff, omega, norm_sq, bar)
            order = np.asarray(picks, dtype=np.int64)
        else:
            if method == "random":
                order = np.random.default_rng(seed).permutation(n)[:k_eff].astype(np.int64)
            else:  # gradnorm: largest norm first, ties by index (stable sort of −‖g‖)
                order = np.argsort(-norm_sq, kind="stable")[:k_eff].astype(np.int64)
            gains, conflicts, scores = _trace_fixed(G, order, alpha, lam_eff, norm_sq, bar)
    finally:
        bar.close()

    gains_a = np.asarray(gains, dtype=np.float64)
    logdets = np.cumsum(gains_a)
    if early is not None:
        stop_reason = early
    elif k_eff >= n:
        stop_reason = "exhausted"
    else:
        stop_reason = "budget"
    sel = Selection(
        indices=order,
        gains=gains_a,
        bases=np.log1p(alpha * norm_sq[order]),
        conflicts=np.asarray(conflicts, dtype=np.float64),
        scores=np.asarray(scores, dtype=np.float64),
        logdets=logdets,
        logdet=float(logdets[-1]) if len(logdets) else 0.0,
        stop_reason=stop_reason,
        method=method,
        params=params,
        n_candidates=n,
        k_requested=int(k),
    )
    log.info(
        "select[%s]: %d of %d (d=%d) in %.2fs, logdet=%.4f, stop=%s",
        method, len(sel), n, d, time.perf_counter() - t0, sel.logdet, stop_reason,
    )
    return sel


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
