"""Candidate-side engines of the exact greedy: eager (numpy or torch), lazy (numpy), in one shard.

Pure math, no Ray. A :class:`CandidateShard` owns a slice of the candidate rows (global indices
ascending) and a copy of the selected-side :class:`~spice_ray.select.state.SelectedState`. Its whole
interface is :meth:`CandidateShard.best` (the shard's canonical argmax at the current step, ties to
the smallest index) and :meth:`CandidateShard.update` (apply the step's pick, chosen by whoever
reduces the shards). One shard over all rows is the single-actor greedy; several shards, in one
process or in Ray actors, reduce to the same picks (``max score, ties → smallest global index``).

Engines:

* **eager** — one fused pass per step over the shard's rows: ``R = G [u, g]`` updates every
  candidate's ``q_i = g_iᵀ M⁻¹ g_i`` and its dot with ``s``, then the scores follow. numpy keeps the
  sketches' dtype (float32 BLAS, margins sized for float32) and spreads row blocks over threads;
  torch (``device="cpu"`` or ``"cuda"``) keeps float64 on the device and decides on the host every
  step (the shards and the windowed schedule use it; :func:`~spice_ray.select.greedy.select` on a
  torch device runs the block engine of :mod:`spice_ray.select.device_engine` instead, one host
  round trip per block of steps). Updates that arrive before the next ``best()`` (a resume
  replaying picks) are applied 64 per read of the rows.
* **lazy** — Δ_i(S) only shrinks as S grows and ``c_i ≥ 0``, so a row's last computed gain bounds
  its later scores. The rows that can win soon form an exact *frontier* kept up to date like the
  eager pass (2d flops a row per step, the conflict current); the rest wait behind a level ``L`` of
  stale bounds and are scored afresh (d² flops) only when the frontier is rebuilt
  (see :class:`LazyEngine`).

Both engines then hand their contenders (approximate score within the rounding margin of the best)
to :meth:`SelectedState.winner`, which decides by the canonical score — so eager, lazy, sharded and
GPU runs pick identically (see :mod:`spice_ray.select.state`).
"""

from __future__ import annotations

import heapq
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from spice_ray.select.state import U32, U64, SelectedState, Winner

log = logging.getLogger(__name__)

_REPLAY_BLOCK = 64  # updates applied per read of the rows when several are pending (a resume)


def row_norms_sq(G: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``‖g_i‖²`` in float64, chunked so no float64 copy of G is made."""
    out = np.empty(G.shape[0], dtype=np.float64)
    for start in range(0, G.shape[0], chunk):
        block = G[start : start + chunk].astype(np.float64, copy=False)
        out[start : start + chunk] = np.einsum("ij,ij->i", block, block)
    return out


def _resolve_device(device: str | None) -> str:
    """``numpy`` | ``cpu`` | ``cuda[:i]``; ``auto``/None: cuda when torch sees one, else numpy."""
    if device in (None, "auto"):
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "numpy"
        except ImportError:  # pragma: no cover - torch is a dependency
            return "numpy"
    if device == "numpy" or device == "cpu" or str(device).startswith("cuda"):
        return str(device)
    raise ValueError(f"unknown device {device!r}; expected numpy | cpu | cuda[:i] | auto")


class _Engine:
    """Common part: the rows, their norms, which are still candidates."""

    def __init__(self, G: np.ndarray, indices: np.ndarray, state: SelectedState) -> None:
        self.G = G
        self.indices = indices
        self.state = state
        self.n = G.shape[0]
        self.norm_sq = row_norms_sq(G) if self.n else np.zeros(0)
        self.max_norm_sq = float(self.norm_sq.max()) if self.n else 0.0
        self.alive = np.ones(self.n, dtype=bool)
        self.n_alive = self.n
        self.refreshed = 0  # rows whose score was computed (for the lazy/eager work statistics)

    def kill(self, local: int) -> None:
        if self.alive[local]:
            self.alive[local] = False
            self.n_alive -= 1

    def rows64(self, local: np.ndarray) -> np.ndarray:
        return self.G[local].astype(np.float64)

    def _narrow(self, cands: np.ndarray, approx: np.ndarray, unit: float) -> np.ndarray:
        """The candidates that can still be the canonical argmax, by per-row margins ``a‖g_i‖² + b``.

        The best approximate row j has canonical score ≥ approx_j − m_j; row i can only beat or
        tie it if approx_i + m_i ≥ that.
        """
        a, b = self.state.margin_coefs(unit, self.max_norm_sq)
        reach = self.norm_sq[cands] * a
        reach += b
        j = int(np.argmax(approx))
        low = float(approx[j]) - float(reach[j])
        reach += approx
        return cands[reach >= low]

    def decide(self, cands: np.ndarray, approx: np.ndarray | None, unit: float) -> Winner:
        """From candidates (local, ascending) with approximate scores: narrow by margins, decide exactly.

        ``approx=None``: the candidates are already narrowed.
        """
        st = self.state
        if approx is not None and cands.size > 1:
            cands = self._narrow(cands, approx, unit)
        X = self.rows64(cands)
        if unit != U64 and cands.size > 1:  # re-score in float64 first, then the canonical few
            _, _, score = st.fresh(X)
            keep = np.isin(cands, self._narrow(cands, score, U64))
            cands, X = cands[keep], X[keep]
        return st.winner(X, self.indices[cands])


def num_threads() -> int:
    """Threads for the eager pass: ``OMP_NUM_THREADS`` (Ray sets it to an actor's CPUs), else the CPUs we may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="spice-eager")
    return _POOLS[threads]


class EagerNumpy(_Engine):
    """One fused ``G @ [u, g]`` pass per step in the sketches' own dtype (float32 or float64).

    The rows are processed in blocks of ``chunk`` rows spread over ``threads`` Python threads
    (numpy releases the GIL); within a block the product runs in row slices small enough for
    OpenBLAS to keep on one thread (M·N·K ≤ 2^18) — a threaded (N×d)·(d×2) product is slower than
    one thread on an idle machine and many times slower on a busy one — then the same block's
    ``q``, ``dot`` and scores are updated while it is in cache.
    """

    def __init__(
        self, G: np.ndarray, indices: np.ndarray, state: SelectedState, chunk: int = 1 << 15, threads: int | None = None
    ) -> None:
        super().__init__(G, indices, state)
        self.unit = U32 if G.dtype == np.float32 else U64
        self.chunk = chunk
        self.threads = max(1, min(threads or num_threads(), -(-self.n // chunk) if self.n else 1))
        self.inv_norm = np.zeros(self.n, dtype=np.float64)
        np.divide(1.0, np.sqrt(self.norm_sq), out=self.inv_norm, where=self.norm_sq > 0)
        if state.t == 0:
            self.q = self.norm_sq.copy()
            self.dot = np.zeros(self.n, dtype=np.float64)
        else:  # a pool of the windowed schedule starts against a non-empty selected set
            self.q = np.empty(self.n, dtype=np.float64)
            self.dot = np.empty(self.n, dtype=np.float64)
            for a in range(0, self.n, 4096):
                q, _, dot = state.fresh_qdot(self.G[a : a + 4096])
                self.q[a : a + 4096] = q
                self.dot[a : a + 4096] = dot
        self.dead = np.zeros(self.n, dtype=np.float64)  # 0 for candidates, −inf once selected
        self.pending: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.score = np.empty(self.n, dtype=np.float64)

    def update(self, u: np.ndarray, g: np.ndarray, coef: float, local: int | None) -> None:
        self.pending.append((u, g, coef))
        if local is not None:
            self.kill(local)
            self.dead[local] = -np.inf

    def _apply(self, lo: int, hi: int, W: np.ndarray, coefs: list[float]) -> None:
        """Apply updates (columns ``u_j, g_j`` of W) to rows [lo, hi): ``q −= c_j (g·u_j)²``, ``dot += g·g_j``."""
        q, dot = self.q[lo:hi], self.dot[lo:hi]
        R = np.empty((hi - lo, W.shape[1]), dtype=self.G.dtype)
        sub = max(256, (1 << 18) // (W.shape[0] * W.shape[1]))
        for a in range(lo, hi, sub):
            b = min(hi, a + sub)
            np.matmul(self.G[a:b], W, out=R[a - lo : b - lo])
        for j, coef in enumerate(coefs):
            r = R[:, 2 * j].astype(np.float64)
            r *= r
            r *= coef
            q -= r
            np.maximum(q, 0.0, out=q)
            dot += R[:, 2 * j + 1]

    def _score(self, lo: int, hi: int) -> None:
        st = self.state
        score = self.score[lo:hi]
        np.multiply(self.q[lo:hi], st.alpha, out=score)
        np.log1p(score, out=score)
        if st.lam != 0 and st.s_norm > 0:
            c = self.dot[lo:hi] * self.inv_norm[lo:hi]
            c *= -1.0 / st.s_norm
            np.clip(c, 0.0, 1.0, out=c)
            c *= st.lam
            score -= c
        score += self.dead[lo:hi]

    def _block(self, lo: int, W: np.ndarray | None, coefs: list[float], score: bool) -> None:
        hi = min(self.n, lo + self.chunk)
        if W is not None:
            self._apply(lo, hi, W, coefs)
        if score:
            self._score(lo, hi)

    def best(self) -> Winner | None:
        if self.n_alive == 0:
            return None
        pend, self.pending = self.pending, []
        blocks = [pend[a : a + _REPLAY_BLOCK] for a in range(0, len(pend), _REPLAY_BLOCK)] or [[]]
        starts = range(0, self.n, self.chunk)
        for b, block in enumerate(blocks):
            W = None
            if block:
                W = np.empty((self.G.shape[1], 2 * len(block)), dtype=self.G.dtype)
                for j, (u, g, _) in enumerate(block):
                    W[:, 2 * j] = u
                    W[:, 2 * j + 1] = g
            coefs = [c for _, _, c in block]
            last = b == len(blocks) - 1
            if self.threads > 1:  # one read of the rows: update, then score, block by block
                list(_pool(self.threads).map(lambda lo: self._block(lo, W, coefs, last), starts))
            else:
                for lo in starts:
                    self._block(lo, W, coefs, last)
        self.refreshed += self.n_alive
        # Per-row margins a·‖g_i‖² + b (the float32 bound grows with the row's norm): the best row's
        # canonical score is ≥ score_j − m_j, so only rows with score_i + m_i above that can win.
        j = int(np.argmax(self.score))
        a, b = self.state.margin_coefs(self.unit, self.max_norm_sq)
        low = float(self.score[j]) - (a * float(self.norm_sq[j]) + b) - b
        if a * self.max_norm_sq <= 1e-3 * b or a == 0:
            cands = np.flatnonzero(self.score >= low - a * self.max_norm_sq)
        else:
            reach = self.norm_sq * a
            reach += self.score
            cands = np.flatnonzero(reach >= low)
        return self.decide(cands, None, self.unit)


class EagerTorch(_Engine):
    """The eager pass with torch on ``device`` (float64 on the device; decisions on the host)."""

    def __init__(self, G: np.ndarray, indices: np.ndarray, state: SelectedState, device: str) -> None:
        import torch

        super().__init__(G, indices, state)
        self.torch = torch
        self.device = torch.device(device)
        self.Gt = torch.tensor(G, dtype=torch.float64, device=self.device)  # one copy, read-only input is fine
        norm_sq = torch.as_tensor(self.norm_sq, device=self.device)
        self.inv_norm = torch.where(norm_sq > 0, norm_sq.rsqrt(), torch.zeros_like(norm_sq))
        if state.t == 0:
            self.q = norm_sq.clone()
            self.dot = torch.zeros_like(norm_sq)
        else:
            self.q = torch.empty_like(norm_sq)
            self.dot = torch.empty_like(norm_sq)
            for a in range(0, self.n, 4096):
                q, _, dot = state.fresh_qdot(G[a : a + 4096])
                self.q[a : a + 4096] = torch.as_tensor(q, device=self.device)
                self.dot[a : a + 4096] = torch.as_tensor(dot, device=self.device)
        self.dead = torch.zeros_like(norm_sq)
        self.pending: list[tuple[np.ndarray, np.ndarray, float]] = []

    def update(self, u: np.ndarray, g: np.ndarray, coef: float, local: int | None) -> None:
        self.pending.append((u, g, coef))
        if local is not None:
            self.kill(local)
            self.dead[local] = -float("inf")

    def best(self) -> Winner | None:
        torch = self.torch
        if self.n_alive == 0:
            return None
        st = self.state
        pend, self.pending = self.pending, []
        for a in range(0, len(pend), _REPLAY_BLOCK):
            block = pend[a : a + _REPLAY_BLOCK]
            W = np.empty((2 * len(block), self.G.shape[1]), dtype=np.float64)  # transposed: G @ Wᵀ is column-major
            for j, (u, g, _) in enumerate(block):
                W[2 * j] = u
                W[2 * j + 1] = g
            R = self.Gt @ torch.as_tensor(W, device=self.device).T
            for j, (_, _, coef) in enumerate(block):
                self.q.sub_(R[:, 2 * j].square().mul_(coef)).clamp_(min=0.0)
                self.dot.add_(R[:, 2 * j + 1])
        score = torch.log1p(self.q * st.alpha)
        if st.lam != 0 and st.s_norm > 0:
            c = (self.dot * self.inv_norm).mul_(-1.0 / st.s_norm).clamp_(0.0, 1.0)
            score.sub_(c.mul_(st.lam))
        score.add_(self.dead)
        self.refreshed += self.n_alive
        best = score.max()
        mask = score >= best - st.margin(self.max_norm_sq, U64)
        cands = torch.nonzero(mask).flatten()  # ascending
        return self.decide(cands.cpu().numpy(), score[cands].cpu().numpy(), U64)


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


class CandidateShard:
    """A slice of the candidates with its own copy of the selected-side state.

    ``G``: the shard's rows (N_s, d); ``indices``: their global indices, ascending (default
    ``offset + arange``). ``max_updates``: the run's budget (it fixes the dense/factored form of
    ``M⁻¹``, which must be the same in every shard). ``best()`` returns the shard's canonical argmax
    (or None when no candidate is left); ``update(u, g, q_s, index)`` applies the pick ``index``
    (global; the shard holding it drops it from its candidates) with ``u = M⁻¹g`` and
    ``q_s = gᵀM⁻¹g`` as reported by the winner.
    """

    def __init__(
        self,
        G: np.ndarray,
        *,
        alpha: float,
        lam: float,
        max_updates: int,
        offset: int = 0,
        indices: np.ndarray | None = None,
        lazy: bool = False,
        device: str | None = "numpy",
        state: SelectedState | None = None,
    ) -> None:
        G = np.asarray(G)
        if G.ndim != 2:
            raise ValueError(f"shard rows must be 2-d, got shape {G.shape}")
        if G.dtype not in (np.float32, np.float64):
            G = G.astype(np.float32)
        self.G = np.ascontiguousarray(G)
        n, d = self.G.shape
        self.indices = (
            np.arange(offset, offset + n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.shape != (n,) or (n > 1 and np.any(np.diff(self.indices) <= 0)):
            raise ValueError("shard indices must be strictly ascending, one per row")
        self.state = state if state is not None else SelectedState(d, max_updates, alpha, lam)
        self.lazy = bool(lazy)
        self.device = "numpy" if self.lazy else _resolve_device(device)
        if self.lazy:
            self.engine: Any = LazyEngine(self.G, self.indices, self.state)
        elif self.device == "numpy":
            self.engine = EagerNumpy(self.G, self.indices, self.state)
        else:
            self.engine = EagerTorch(self.G, self.indices, self.state, self.device)

    def __len__(self) -> int:
        return int(self.G.shape[0])

    @property
    def refreshed(self) -> int:
        """Candidate scores computed so far (eager: N per step; lazy: far fewer)."""
        return int(self.engine.refreshed)

    def best(self) -> Winner | None:
        """The shard's canonical argmax at the current step (ties: smallest index)."""
        return self.engine.best()

    def local(self, index: int) -> int | None:
        j = int(np.searchsorted(self.indices, index))
        return j if j < len(self.indices) and self.indices[j] == index else None

    def exact(self, index: int) -> Winner:
        """Canonical values of the row with global ``index`` (which this shard must hold)."""
        j = self.local(index)
        if j is None:
            raise KeyError(f"row {index} is not in this shard")
        return self.state.winner(self.G[[j]].astype(np.float64), self.indices[[j]])

    def update(self, u: np.ndarray, g: np.ndarray, q_s: float, index: int | None = None) -> None:
        """Apply the step's pick (``index`` global; None: a pick from outside every shard)."""
        coef = self.state.alpha / (1.0 + self.state.alpha * q_s)
        local = None if index is None else self.local(int(index))
        self.engine.update(np.asarray(u, dtype=np.float64), np.asarray(g, dtype=np.float64), coef, local)
        self.state.add(u, g, q_s)
