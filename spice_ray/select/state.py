"""The selected-side state of the greedy and the one *canonical* score every engine decides by.

Pure numpy, no Ray. ``SelectedState`` holds what a step needs about the selected set ``S``:
``M⁻¹`` for ``M = I + α Σ_{j∈S} g_j g_jᵀ`` (dense d×d, or factored ``I − Σ_j c_j u_j u_jᵀ`` while the
budget is below d), the running sum ``s = Σ_{j∈S} g_j`` and a few scalars used for error margins.

Why a canonical score. The eager pass (one fused product over all N rows per step), the lazy
refresh (a small batch of rows against the current ``M⁻¹``), the sharded shards and the GPU all
compute the same quantities with different floating-point arithmetic (BLAS blocking depends on the
matrix shape; float32 on CPU, float64 on GPU), so their last bits differ. To make every engine pick
*identically* (including ties, which go to the smallest index), no engine decides from its own
numbers: each finds the rows whose approximate score is within a rigorous rounding margin ``δ`` of
its best, recomputes those few with :meth:`SelectedState.exact` — a fixed per-row procedure
(elementwise products and numpy's per-row pairwise sums, never a shape-dependent BLAS call) whose
result for a row depends only on the row and on this state — and takes the argmax of those values
(ties: smallest index). The state itself evolves only through :meth:`add` from the canonical
``u = M⁻¹g`` of each pick, so it is bit-identical in every engine that made the same picks.

The margins (:meth:`margin`) bound ``|approximate − canonical|`` from the standard rounding-error
bound ``|fl(xᵀy) − xᵀy| ≤ γ_n Σ|x_k y_k|`` (``γ_n = n u/(1 − n u)``, any summation order, FMA or not),
Cauchy–Schwarz over the steps, and the drift of the stored ``M⁻¹`` between steps; they are then
multiplied by a safety factor of 4. In float64 they are ~1e-12 (so only exact or near-exact ties are
ever recomputed); for a float32 eager pass they are ~1e-4 relative, which only widens the set of
rows re-scored in float64 before the canonical step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

U64 = 2.0**-53  # unit roundoff, float64
U32 = 2.0**-24  # unit roundoff, float32

_CANON_TEMP = 1 << 22  # elements of the per-row temporaries of the canonical computation
_BLAS_SINGLE = 1 << 18  # M·N·K below which OpenBLAS runs a product on one thread


def gamma(n: int, unit: float) -> float:
    """``γ_n = n u / (1 − n u)``: the relative error bound of an n-term dot product."""
    nu = n * unit
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row ``Σ_k a_k b_k`` with a layout-independent result (elementwise product, pairwise sum).

    The product goes into a fresh C-contiguous buffer so the sum runs along the contiguous last axis,
    where numpy sums each row pairwise on its own: the value of a row does not depend on the other
    rows, on how many there are, or on the machine's BLAS.
    """
    shape = np.broadcast_shapes(a.shape, b.shape)
    tmp = np.empty(shape, dtype=np.float64)
    np.multiply(a, b, out=tmp)
    return tmp.sum(axis=-1)


@dataclass
class Winner:
    """One candidate with its canonical values at the current step (what a shard reports)."""

    index: int  # global row index
    score: float
    gain: float
    conflict: float
    q: float  # gᵀ M⁻¹ g
    u: np.ndarray  # M⁻¹ g, float64 (d,)
    g: np.ndarray  # the sketch, float64 (d,)

    def beats(self, other: Winner | None) -> bool:
        """Higher score, ties to the smaller index (the greedy's order)."""
        if other is None:
            return True
        return self.score > other.score or (self.score == other.score and self.index < other.index)


class SelectedState:
    """``M⁻¹``, ``s`` and the margin bookkeeping of the selected set (float64 throughout)."""

    def __init__(self, d: int, max_updates: int, alpha: float, lam: float) -> None:
        self.d = int(d)
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.max_updates = int(max_updates)
        self.dense = self.max_updates >= self.d
        if self.dense:
            self.minv = np.eye(self.d, dtype=np.float64)
        else:
            m = max(self.max_updates, 0)
            self.U = np.zeros((m, self.d), dtype=np.float64)  # u_j rows
            self.UT = np.zeros((self.d, m), dtype=np.float64)  # the same, transposed (canonical sums)
            self.c = np.zeros(m, dtype=np.float64)
        self.t = 0
        self.s = np.zeros(self.d, dtype=np.float64)
        self.s_norm = 0.0
        self.S = 0.0  # Σ_j c_j ‖u_j‖² (= d − tr M⁻¹), for the dot-product error bound
        self.A = 0.0  # Σ_j ‖g_j‖, for the conflict error bound
        self.D = 0.0  # Σ_j of the conflict drift bound per step (see LazyEngine)
        self.H = 0.0  # max over steps so far of the float64 conflict margin

    def copy(self) -> SelectedState:
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ canonical values
    def apply_exact(self, X: np.ndarray) -> np.ndarray:
        """Canonical ``M⁻¹ x`` for each row of X (float64 (m, d)), row by row deterministic."""
        m, d = X.shape
        if self.dense:
            out = np.empty((m, d), dtype=np.float64)
            step = max(1, _CANON_TEMP // (d * d))
            for a in range(0, m, step):
                out[a : a + step] = rowdot(X[a : a + step, None, :], self.minv[None, :, :])
            return out
        t = self.t
        if t == 0:
            return X.copy()
        out = np.empty((m, d), dtype=np.float64)
        step = max(1, _CANON_TEMP // (d * t))
        for a in range(0, m, step):
            Xa = X[a : a + step]
            P = rowdot(Xa[:, None, :], self.U[None, :t, :])  # u_jᵀ x, (m, t)
            W = P * self.c[:t]
            out[a : a + step] = Xa - rowdot(W[:, None, :], self.UT[None, :, :t])
        return out

    def exact(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Canonical u, q, dot, norm, gain, conflict and score of rows X (float64 (m, d))."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        u = self.apply_exact(X)
        q = np.maximum(rowdot(X, u), 0.0)
        dot = rowdot(X, self.s[None, :])
        norm = np.sqrt(rowdot(X, X))
        gain = np.log1p(self.alpha * q)
        conflict = np.zeros(X.shape[0], dtype=np.float64)
        if self.s_norm > 0:
            ok = norm > 0
            conflict[ok] = np.clip(-dot[ok] / (norm[ok] * self.s_norm), 0.0, 1.0)
        score = gain - self.lam * conflict
        return {"u": u, "q": q, "dot": dot, "norm": norm, "gain": gain, "conflict": conflict, "score": score}

    def winner(self, X: np.ndarray, indices: np.ndarray) -> Winner:
        """The canonical argmax of rows X (global ``indices``, ascending), ties to the smallest index."""
        ex = self.exact(X)
        j = int(np.argmax(ex["score"]))  # first maximum: indices are ascending
        return Winner(
            index=int(indices[j]),
            score=float(ex["score"][j]),
            gain=float(ex["gain"][j]),
            conflict=float(ex["conflict"][j]),
            q=float(ex["q"][j]),
            u=ex["u"][j].copy(),
            g=np.array(X[j], dtype=np.float64),
        )

    # ------------------------------------------------------------------ fast approximations
    def fresh_qdot(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``q = xᵀ M⁻¹ x``, ``‖x‖²`` and ``xᵀ s`` of rows X (float64) by BLAS (shape-dependent bits)."""
        X = np.asarray(X, dtype=np.float64)
        norm2 = np.einsum("ij,ij->i", X, X)
        if self.dense or self.t:
            q = np.empty_like(norm2)
            inner = self.d if self.dense else self.t
            # Small products stay under OpenBLAS's threading threshold (M·N·K ≤ 2^18): on a busy
            # machine a threaded 16×256×256 product costs ~100× a single-threaded one.
            step = max(1, _BLAS_SINGLE // (self.d * inner))
            for a in range(0, X.shape[0], step):
                Xa = X[a : a + step]
                if self.dense:
                    q[a : a + step] = np.einsum("ij,ij->i", Xa @ self.minv, Xa)
                else:
                    P = Xa @ self.U[: self.t].T
                    q[a : a + step] = norm2[a : a + step] - (P * P) @ self.c[: self.t]
        else:
            q = norm2.copy()
        np.maximum(q, 0.0, out=q)
        return q, norm2, X @ self.s

    def fresh(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gain, conflict and score of rows X (float64) against the current state, by BLAS.

        Within :meth:`margin` (``unit=U64``) of :meth:`exact`; O(min(t, d)·d) per row.
        """
        q, norm2, dot = self.fresh_qdot(X)
        gain = np.log1p(self.alpha * q)
        conflict = np.zeros(q.shape[0], dtype=np.float64)
        if self.s_norm > 0 and self.lam != 0:
            norm = np.sqrt(norm2)
            ok = norm > 0
            conflict[ok] = np.clip(-dot[ok] / (norm[ok] * self.s_norm), 0.0, 1.0)
        return gain, conflict, gain - self.lam * conflict

    # ------------------------------------------------------------------ update
    def add(self, u: np.ndarray, g: np.ndarray, q_s: float) -> None:
        """Add the pick ``g`` with its canonical ``u = M⁻¹ g`` and ``q_s = gᵀ M⁻¹ g``."""
        if self.t >= self.max_updates:
            raise RuntimeError(f"selected-side state is full ({self.max_updates} updates)")
        u = np.asarray(u, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        coef = self.alpha / (1.0 + self.alpha * q_s)
        if self.dense:
            self.minv -= coef * np.outer(u, u)
        else:
            self.U[self.t] = u
            self.UT[:, self.t] = u
            self.c[self.t] = coef
        g_norm = float(np.sqrt(rowdot(g, g)))
        s_old, n_old = self.s.copy(), self.s_norm
        self.s += g
        self.s_norm = float(np.sqrt(rowdot(self.s, self.s)))
        # Conflict drift: for unit ĝ, |c(S ∪ {g}) − c(S)| ≤ |ĝ·(ŝ' − ŝ)| ≤ ‖ŝ' − ŝ‖ (max(0, ·) is
        # 1-Lipschitz); while s = 0 (c ≡ 0) or once s' = 0, c moves by at most 1.
        if n_old == 0 or self.s_norm == 0:
            drift = 1.0
        else:
            drift = min(1.0, float(np.linalg.norm(self.s / self.s_norm - s_old / n_old)))
        self.D += drift * (1.0 + 1e-6) + 1e-12
        self.S += coef * float(u @ u)
        self.A += g_norm
        self.t += 1
        self.H = max(self.H, self.conflict_margin(U64))

    # ------------------------------------------------------------------ margins
    @property
    def E(self) -> float:
        """Monotone conflict-drift allowance: ``c_canon(t) ≥ ĉ(τ) + D_τ − E_t`` (see LazyEngine)."""
        return self.D + 2.0 * self.H

    def q_rel_err(self, unit: float) -> float:
        """Bound on ``|q_approx − q_canon| / ‖g‖²`` for an approximation whose dots are in ``unit``."""
        d = self.d
        S = min(self.S * 1.01 + 1e-12, float(d))
        out = 0.0
        for un in (unit, U64):  # the approximation and the canonical value
            gm = gamma(d + 2, un)
            out += 2.0 * gm * math.sqrt(S) + gm * gm * S
        # Float64 accumulation, and the stored M⁻¹'s drift: each rank-1 update rounds every entry
        # by ≤ u·(|M⁻¹_ab| + 2|c u_a u_b|), a matrix of 2-norm ≤ its Frobenius norm ≤ u(√d + 2), so
        # after t updates ‖E‖₂ ≤ t(√d + 2)u (not t·d·u, the entrywise bound).
        out += (self.t * (math.sqrt(d) + 4.0) + (2 * d + 16) * d) * U64
        return 4.0 * out

    def conflict_margin(self, unit: float) -> float:
        """Bound on ``|c_approx − c_canon|`` (0 while ``s = 0``: every engine gives 0 exactly)."""
        if self.s_norm == 0 or self.lam == 0:
            return 0.0
        gm = gamma(self.d + 2, unit) + gamma(self.d + 2, U64)
        value = 4.0 * (gm + (self.t + 2) * U64) * self.A / self.s_norm + 32 * self.d * U64
        return min(2.0, value)

    def margin_coefs(self, unit: float, max_norm_sq: float) -> tuple[float, float]:
        """``(a, b)`` with ``|score_approx − score_canon| ≤ a·‖g‖² + b`` for rows with ``‖g‖² ≤ max_norm_sq``."""
        gmax = math.log1p(self.alpha * max_norm_sq)
        a = 4.0 * self.alpha * self.q_rel_err(unit)
        b = 4.0 * (16 * U64 * (1.0 + gmax) + self.lam * self.conflict_margin(unit) + 16 * U64 * (1.0 + gmax + self.lam))
        return a, b

    def margin(self, max_norm_sq: float, unit: float) -> float:
        """Bound on ``|score_approx − score_canon|`` for rows with ``‖g‖² ≤ max_norm_sq``."""
        a, b = self.margin_coefs(unit, max_norm_sq)
        return a * max_norm_sq + b
