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
  (:class:`~spice_ray.select.lazy.LazyEngine`, in its own module).

Both engines then hand their contenders (approximate score within the rounding margin of the best)
to :meth:`SelectedState.winner`, which decides by the canonical score — so eager, lazy, sharded and
GPU runs pick identically (see :mod:`spice_ray.select.state`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from spice_ray.select.engine_base import (  # noqa: F401  # re-exports: the names' old home
    _REPLAY_BLOCK,
    _Engine,
    _pool,
    _resolve_device,
    num_threads,
    row_norms_sq,
)
from spice_ray.select.lazy import LazyEngine
from spice_ray.select.state import U32, U64, SelectedState, Winner

log = logging.getLogger(__name__)


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
