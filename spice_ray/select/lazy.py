"""The lazy exact greedy over one shard's rows (:class:`LazyEngine`): an eager frontier of the rows
that can win, stale upper bounds for the rest (see :mod:`spice_ray.select.engines` for the eager
engines and :class:`~spice_ray.select.engines.CandidateShard`, which picks one).

Pure numpy, no Ray.
"""

from __future__ import annotations

import numpy as np

from spice_ray.select.engine_base import _REPLAY_BLOCK, _Engine
from spice_ray.select.state import U64, SelectedState, Winner


class LazyEngine(_Engine):
    """Lazy exact greedy: an eager frontier of the rows that can win, stale upper bounds for the rest.

    Bounds. Per row ``i``, ``ub_i`` is its float64 gain when last computed (the base gain ``Δ_i(∅)``
    before any): Δ only shrinks as S grows and the conflict is ≥ 0, so ``ub_i`` bounds every later
    score (up to the rounding margin ``m_i = a‖g_i‖² + b`` of :meth:`SelectedState.margin_coefs`, per
    row: the margin grows with ‖g_i‖², and with t only as t·√d·u).

    Frontier. The rows with the ``size`` largest ``ub`` form the frontier F; the others have
    ``ub ≤ L``. F is kept *exact*, as the eager engine keeps all rows: a float64 copy of its rows,
    their ``q = gᵀM⁻¹g`` and ``g·s`` updated each step by one ``G_F [u, g]`` product (2d flops a row
    rather than the d² of a refresh), so their scores are current — the conflict included, where a
    stale bound would have to allow for any drift of the selected mean's direction. A step scores F;
    if the best F score less its margin beats ``L`` plus the largest margin, no row outside F can win
    or tie, and the F rows within the margins of the best are decided canonically
    (:meth:`_Engine.decide`). Otherwise F is rebuilt from the current bounds (its rows' current gains,
    the stale ones outside; a row entering F is scored once, d² flops) and the step redone. F doubles
    when rebuilds come more often than every ``grow_below`` steps.
    """

    def __init__(
        self, G: np.ndarray, indices: np.ndarray, state: SelectedState, size: int = 2048, grow_below: int = 4
    ) -> None:
        super().__init__(G, indices, state)
        self.size = int(size)
        self.grow_below = int(grow_below)
        self.ub = np.log1p(state.alpha * self.norm_sq)  # Δ_i(∅) ≥ Δ_i(S) for any S
        self.pos = np.full(self.n, -1, dtype=np.int64)  # row → its place in F, or −1
        self.L = np.inf  # no frontier yet: the first step builds one
        self.F = np.zeros(0, dtype=np.int64)
        self.qF = self.dotF = np.zeros(0)
        self.pending: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.since = 0  # steps since the last rebuild
        self.rebuilds = 0
        self.tracked = 0  # F rows brought up to date (2d flops each; ``refreshed``: rows scored afresh, d²)

    def update(self, u: np.ndarray, g: np.ndarray, coef: float, local: int | None) -> None:
        self.pending.append((u, g, coef))
        if local is not None:
            self.kill(local)
            self.ub[local] = -np.inf
            if self.pos[local] >= 0:
                self.deadF[self.pos[local]] = -np.inf

    def _apply(self) -> None:
        """Bring F's ``q`` and ``g·s`` up to date with the pending picks (64 per product)."""
        pend, self.pending = self.pending, []
        for a in range(0, len(pend), _REPLAY_BLOCK):
            block = pend[a : a + _REPLAY_BLOCK]
            W = np.empty((self.G.shape[1], 2 * len(block)), dtype=np.float64)
            for j, (u, g, _) in enumerate(block):
                W[:, 2 * j] = u
                W[:, 2 * j + 1] = g
            R = self.GF @ W
            for j, (_, _, coef) in enumerate(block):
                r = R[:, 2 * j]
                r *= r
                r *= coef
                self.qF -= r
                np.maximum(self.qF, 0.0, out=self.qF)
                self.dotF += R[:, 2 * j + 1]

    def _rebuild(self) -> None:
        """F := the alive rows with the ``size`` largest bounds; rows entering F are scored afresh."""
        if self.L != np.inf and (self.since == 0 or self.since < self.grow_below):
            self.size *= 2  # again within one step (the conflicts hide the winner below L), or often
        self.since = 0
        self.rebuilds += 1
        if self.F.size:
            self.ub[self.F] = np.where(np.isfinite(self.deadF), np.log1p(self.state.alpha * self.qF), -np.inf)
        m = self.size
        if m >= self.n_alive:
            F, L = np.flatnonzero(self.alive), -np.inf
        else:
            part = np.argpartition(self.ub, self.n - m - 1)
            F, L = np.sort(part[self.n - m :]), float(self.ub[part[self.n - m - 1]])
        kept = self.pos[F]
        old_q, old_dot = self.qF, self.dotF
        self.pos[self.F] = -1
        self.F, self.L = F, L
        self.pos[F] = np.arange(F.size)
        self.GF = self.G[F].astype(np.float64)
        self.nsqF = self.norm_sq[F]
        self.invnF = np.zeros(F.size)
        np.divide(1.0, np.sqrt(self.nsqF), out=self.invnF, where=self.nsqF > 0)
        self.deadF = np.zeros(F.size)
        self.qF = np.empty(F.size)
        self.dotF = np.empty(F.size)
        had = kept >= 0
        self.qF[had], self.dotF[had] = old_q[kept[had]], old_dot[kept[had]]
        new = np.flatnonzero(~had)
        self.refreshed += new.size
        for a in range(0, new.size, 256):
            q, _, dot = self.state.fresh_qdot(self.GF[new[a : a + 256]])
            self.qF[new[a : a + 256]] = q
            self.dotF[new[a : a + 256]] = dot
        self._compact()

    def _compact(self) -> None:
        """Drop from F the rows whose gain is below L (they cannot win before the next rebuild); their
        ``ub`` is that gain, so every row outside F still has ``ub ≤ L``."""
        gain = np.log1p(self.state.alpha * self.qF)
        keep = (gain >= self.L) & np.isfinite(self.deadF)
        if keep.all():
            return
        out = self.F[~keep]
        self.ub[out] = np.where(np.isfinite(self.deadF[~keep]), gain[~keep], -np.inf)
        self.pos[out] = -1
        self.F = self.F[keep]
        self.pos[self.F] = np.arange(self.F.size)
        for name in ("GF", "nsqF", "invnF", "deadF", "qF", "dotF"):
            setattr(self, name, getattr(self, name)[keep])

    def _scores(self) -> np.ndarray:
        st = self.state
        score = np.log1p(self.qF * st.alpha)
        if st.lam != 0 and st.s_norm > 0:
            c = self.dotF * self.invnF
            c *= -1.0 / st.s_norm
            np.clip(c, 0.0, 1.0, out=c)
            c *= st.lam
            score -= c
        score += self.deadF
        return score

    def best(self) -> Winner | None:
        if self.n_alive == 0:
            return None
        if self.L == np.inf:
            self.pending = []  # the frontier is scored against the current state
            self._rebuild()
        self._apply()
        a, b = self.state.margin_coefs(U64, self.max_norm_sq)
        while True:
            if self.F.size == 0:
                self._rebuild()
                continue
            score = self._scores()
            m4 = self.nsqF * (4.0 * a)
            m4 += 4.0 * b
            j = int(np.argmax(score))
            thr = float(score[j] - m4[j])
            if np.isfinite(score[j]) and self.L + 4.0 * (a * self.max_norm_sq + b) < thr:
                break
            self._rebuild()
        self.since += 1
        self.tracked += int(self.F.size)
        m4 += score
        cands = np.flatnonzero(m4 >= thr)
        return self.decide(self.F[cands], None, U64)
