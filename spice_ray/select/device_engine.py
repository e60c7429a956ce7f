"""The exact greedy on a torch device, a block of B steps per host round trip.

Pure torch + numpy, no Ray. :class:`DeviceGreedy` runs the whole greedy step on the device — the
score ``Δ − λ·c`` of every candidate, the contenders within the rounding margin of the best, their
*canonical* values (:mod:`spice_ray.select.state`), the pick (max score, ties to the smallest
index), the Sherman–Morrison update of ``M⁻¹`` and of every candidate's ``q_i``, and the running
sum ``s`` of the selected rows for the conflict term — with no host synchronisation inside a block:
no ``.item()``, no Python branch on a device value, masks by ``torch.where``, the picks and the
values the host needs written to one device buffer that is copied to the host once per block (the
block's only synchronisation). On CUDA the block is captured once as a CUDA graph and replayed
(guarded: it falls back to running the same ops eagerly).

Why the picks equal the numpy engines'. The state (``M⁻¹`` dense or factored, ``s``) evolves only
from canonical values, and every canonical quantity is computed by the same IEEE operations as
:meth:`SelectedState.exact` — elementwise products, numpy's pairwise summation reproduced exactly
by :func:`~spice_ray.select.pairwise.pairwise_sum`, ``sqrt``, true division — so it is bit-identical to the host state of any
engine that made the same picks. The one function of the canonical score that torch and numpy may
round differently is ``log1p``; so at the end of each block the host re-scores each step's
contenders from the device's canonical ``q``, ``gᵀs`` and ``‖g‖²`` with numpy (O(contenders) per
step) and checks the device's pick. On a disagreement (never seen in practice), or when more rows
than the block's contender slots lie within the margin (many exact ties), the engine restores the
block's snapshot, replays the verified picks, decides that step on the host over all of its
contenders, and goes on (a *rollback*; the contender slots double after an overflow). An ω early
stop is checked by the caller as the verified picks come out; the rest of the block is dropped.

The candidate sweep is float64 (the sketches are copied to the device in float64, 2× the bytes of
float32): with a float32 sweep the rigorous rounding margin (:meth:`SelectedState.margin`, unit
2⁻²⁴) grows with the selected set until most rows are contenders — measured with the numpy float32
engine at N=20,000, d=256: ~1,000 contenders per step by step 1,000 and up to ~13,000 after it —
while in float64 it stays at ~1e-12 and a step has one or two (exact ties).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np

from spice_ray.select.engine_base import row_norms_sq
from spice_ray.select.pairwise import pairwise_sum
from spice_ray.select.state import U64, Winner, gamma

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 32  # greedy steps per host round trip
DEFAULT_CONTENDERS = 2  # contender slots per step (doubled after an overflow)
MAX_CONTENDERS = 256
_CANON_ELEMS = 1 << 25  # elements of the (rows, d, d) product of one canonical chunk on the slow path

# columns of one step's row in the block output (K1 = contender slots + 1 forced slot)
_PICK, _SSQ, _OVER = 0, 1, 2
_BASE = 3


# ---------------------------------------------------------------------------------- host helpers
def canonical_scores(
    q: np.ndarray, dot: np.ndarray, nn: np.ndarray, s_norm: float, alpha: float, lam: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gain, conflict and score from canonical ``q``, ``gᵀs``, ``‖g‖²``: :meth:`SelectedState.exact`'s numpy."""
    norm = np.sqrt(nn)
    gain = np.log1p(alpha * q)
    conflict = np.zeros(q.shape[0], dtype=np.float64)
    if s_norm > 0:
        ok = norm > 0
        conflict[ok] = np.clip(-dot[ok] / (norm[ok] * s_norm), 0.0, 1.0)
    return gain, conflict, gain - lam * conflict


def margin_consts(d: int, t: int, alpha: float, lam: float, max_norm_sq: float) -> tuple[float, float, float]:
    """``(m0, κ, c0)``: at step t, ``|score_approx − score_canon| ≤ m0 + 4λ·min(2, κ·A/‖s‖ + c0)``.

    :meth:`SelectedState.margin` for a float64 approximation (``unit = 2⁻⁵³``), with the state's
    ``S = Σ_j c_j‖u_j‖²`` replaced by its bound ``t`` (each term is ``α‖u‖²/(1 + αq) < 1`` since
    ``‖M⁻¹g‖² ≤ gᵀM⁻¹g``) so the host knows it without reading the device; ``A = Σ_j ‖g_j‖`` and
    ``‖s‖`` stay on the device. The last term is 0 while ``s = 0`` or λ = 0.
    """
    S = min((t + 1) * 1.01 + 1e-12, float(d))
    gm = gamma(d + 2, U64)
    q_rel = 2.0 * (2.0 * gm * math.sqrt(S) + gm * gm * S) + (t + 2 * d + 16) * d * U64
    a = 4.0 * alpha * (4.0 * q_rel)
    gmax = math.log1p(alpha * max_norm_sq)
    b0 = 4.0 * (16 * U64 * (1.0 + gmax) + 16 * U64 * (1.0 + gmax + lam))
    kappa = 4.0 * (2.0 * gm + (t + 2) * U64)
    return a * max_norm_sq + b0, kappa, 32 * d * U64


def _at(x: Any, i: Any) -> Any:
    """``x[i]`` for a 0-d index tensor without a host round trip (``x[tensor]`` reads the index)."""
    return x.index_select(0, i.view(1)).squeeze(0)


def _norm(ssq: float) -> float:
    """‖s‖ from ‖s‖² as the host state computes it (numpy's sqrt is correctly rounded; torch's on
    the CPU is not always, so the device keeps ‖s‖² for the canonical values)."""
    return float(np.sqrt(np.float64(ssq)))


def _cuda_graphs_wanted(device: Any, dense: bool) -> bool:
    return device.type == "cuda" and dense and os.environ.get("SPICE_CUDA_GRAPHS", "1") != "0"


# ------------------------------------------------------------------------------------- the engine
class DeviceGreedy:
    """The eager greedy over all rows of ``G`` on a torch ``device``, B steps per host round trip.

    ``max_updates``: the run's budget (dense ``M⁻¹`` when ≥ d, factored below, as
    :class:`SelectedState`). ``block``: steps per round trip. ``contenders``: contender slots per
    step (a step with more rows inside the margin is decided on the host, then the slots double).
    ``graphs``: capture the block as a CUDA graph (None: on CUDA with a dense ``M⁻¹``;
    ``SPICE_CUDA_GRAPHS=0`` turns it off). :meth:`picks` yields the canonical winners in order.
    """

    def __init__(
        self,
        G: np.ndarray,
        *,
        alpha: float,
        lam: float,
        max_updates: int,
        device: str = "cpu",
        block: int = DEFAULT_BLOCK,
        contenders: int = DEFAULT_CONTENDERS,
        graphs: bool | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.G = G
        self.n, self.d = G.shape
        self.alpha, self.lam = float(alpha), float(lam)
        self.max_updates = int(max_updates)
        self.dense = self.max_updates >= self.d
        self.device = torch.device(device)
        self.block = max(1, int(block))
        self.K = 0
        self._set_contenders(contenders)
        self.graphs = _cuda_graphs_wanted(self.device, self.dense) if graphs is None else bool(graphs)
        self.graphs = self.graphs and self.device.type == "cuda" and self.dense
        self.graph: Any = None
        self._warm = False
        self._started = False
        norm_sq = row_norms_sq(G) if self.n else np.zeros(0)
        self.max_norm_sq = float(norm_sq.max()) if self.n else 0.0
        self.refreshed = 0
        self.rollbacks = 0
        self.overflows = 0
        self.n_blocks = 0
        with torch.no_grad():
            self._init_tensors(norm_sq)

    # -------------------------------------------------------------------------------- set-up
    def _set_contenders(self, k: int) -> None:
        cap = max(1, min(MAX_CONTENDERS, _CANON_ELEMS // max(1, self.d * self.d)))
        self.K = max(1, min(int(k), cap, max(1, self.n)))
        self.K1 = self.K + 1
        self.width = _BASE + 5 * self.K1 + self.d
        self.graph = None

    def _init_tensors(self, norm_sq: np.ndarray) -> None:
        torch, dev, f64 = self.torch, self.device, self.torch.float64
        self.G64 = torch.as_tensor(np.require(self.G, requirements=["C", "W"]), device=dev).to(f64)
        ns = torch.tensor(norm_sq, dtype=f64, device=dev)
        self.inv_norm = torch.where(ns > 0, ns.rsqrt(), torch.zeros_like(ns))
        self.q = ns.clone()
        self.dot = torch.zeros_like(ns)
        self.dead = torch.zeros_like(ns)  # 0 for candidates, −inf once selected
        if self.dense:
            self.minv = torch.eye(self.d, dtype=f64, device=dev)
        else:
            self.U = torch.zeros((max(self.max_updates, 1), self.d), dtype=f64, device=dev)
            self.c = torch.zeros(max(self.max_updates, 1), dtype=f64, device=dev)
        self.s = torch.zeros(self.d, dtype=f64, device=dev)
        self.ssq = torch.zeros((), dtype=f64, device=dev)  # ‖s‖² (canonical: numpy's pairwise sum)
        self.s_norm = torch.zeros((), dtype=f64, device=dev)  # its torch sqrt (for the device's own scores)
        self.A = torch.zeros((), dtype=f64, device=dev)
        self.alpha_t = torch.tensor(self.alpha, dtype=f64, device=dev)
        live = [self.q, self.dot, self.dead, self.s, self.ssq, self.s_norm, self.A] + ([self.minv] if self.dense else [])
        self._snap = [(x.clone(), x) for x in live]
        self.forced_buf = torch.full((self.block,), -1, dtype=torch.int64, device=dev)
        self.consts = torch.zeros((self.block, 2), dtype=f64, device=dev)
        self._alloc_out()

    def _alloc_out(self) -> None:
        self.out = self.torch.zeros((self.block, self.width), dtype=self.torch.float64, device=self.device)

    # ------------------------------------------------------------------------- device maths
    def _sweep(self) -> Any:
        """The approximate (float64) score of every row; −inf for the selected ones."""
        torch = self.torch
        score = torch.log1p(self.q * self.alpha)
        if self.lam != 0:
            neg = torch.where(self.s_norm > 0, -self.s_norm.reciprocal(), torch.zeros_like(self.s_norm))
            c = (self.dot * self.inv_norm).mul_(neg).clamp_(0.0, 1.0)
            score.sub_(c.mul_(self.lam))
        return score.add_(self.dead)

    def _margin(self, j: int) -> Any:
        """This step's bound on |sweep score − canonical score| (a 0-d tensor)."""
        torch = self.torch
        m0, kappa = self.consts[j, 0], self.consts[j, 1]
        if self.lam == 0:
            return m0
        c0 = 32 * self.d * U64
        cm = ((self.A / self.s_norm) * kappa + c0).clamp(max=2.0)
        cm = torch.where(self.s_norm > 0, cm, torch.zeros_like(cm))
        return m0 + cm * (4.0 * self.lam)

    def _apply_exact(self, X: Any, t: int) -> Any:
        """Canonical ``M⁻¹x`` of each row (:meth:`SelectedState.apply_exact`, bit for bit)."""
        if self.dense:
            return pairwise_sum(X[:, None, :] * self.minv[None, :, :])
        if t == 0:
            return X.clone()
        P = pairwise_sum(X[:, None, :] * self.U[None, :t, :])  # u_jᵀx, (m, t)
        W = P * self.c[:t]
        return X - pairwise_sum(W[:, None, :] * self.U[:t].T[None, :, :])

    def _canonical(self, X: Any, t: int) -> tuple[Any, Any]:
        """Canonical ``M⁻¹x`` and the sums ``[xᵀM⁻¹x, xᵀs, ‖x‖², ‖s + x‖²]`` of rows X."""
        U = self._apply_exact(X, t)
        sx = X + self.s  # s after adding x (numpy: s += g)
        sums = pairwise_sum(self.torch.stack([X * U, X * self.s, X * X, sx * sx], dim=1))
        return U, sums

    def _device_scores(self, q: Any, dot: Any, nn: Any) -> Any:
        """The canonical score with torch's log1p (the host re-checks the decision with numpy's)."""
        torch = self.torch
        score = torch.log1p(q * self.alpha)
        if self.lam == 0:
            return score
        norm = nn.sqrt()
        conflict = (-dot / (norm * self.s_norm)).clamp(0.0, 1.0)
        ok = (self.s_norm > 0) & (norm > 0)
        return score - torch.where(ok, conflict, torch.zeros_like(conflict)) * self.lam

    def _step(self, j: int, t: int) -> None:
        """One greedy step, all on the device: decide (or take ``forced_buf[j]``), record, update."""
        torch, K = self.torch, self.K
        score = self._sweep()
        top, top_idx = torch.topk(score, min(K + 1, self.n))  # one more: more than K within the margin?
        vals, idx = top[:K], top_idx[:K]
        low = vals[0] - 2.0 * self._margin(j)
        valid = vals >= low
        over = (top[K] >= low) if K < self.n else torch.zeros((), dtype=torch.bool, device=self.device)
        forced = self.forced_buf[j]
        is_forced = forced >= 0
        rows = torch.cat([idx, torch.where(is_forced, forced, idx[0]).view(1)])
        X = self.G64.index_select(0, rows)
        U, sums = self._canonical(X, t)
        q, dot, nn, ss = sums[:, 0].clamp(min=0.0), sums[:, 1], sums[:, 2], sums[:, 3]
        sc = torch.where(valid, self._device_scores(q[:K], dot[:K], nn[:K]), torch.full_like(vals, -math.inf))
        tie = torch.where(sc == sc.max(), idx, torch.full_like(idx, self.n))  # ties → smallest index
        free = tie.argmin()
        slot = torch.where(is_forced, torch.full_like(free, K), free)
        pick = torch.where(is_forced, forced, _at(idx, free))
        u, g = _at(U, slot), _at(X, slot)
        flags = torch.cat([valid, is_forced.view(1)]).to(torch.float64)
        head = torch.stack([pick.to(torch.float64), self.ssq, over.to(torch.float64)])
        self.out[j].copy_(torch.cat([head, rows.to(torch.float64), flags, q, dot, nn, u]))
        self._update(pick, u, g, _at(q, slot), _at(ss, slot), _at(nn, slot), t)

    def _update(self, pick: Any, u: Any, g: Any, q_s: Any, ss: Any, nn: Any, t: int) -> None:
        """Add the pick: :meth:`SelectedState.add` (bit for bit) and every candidate's ``q``, ``gᵀs``."""
        torch = self.torch
        coef = torch.div(self.alpha_t, 1.0 + self.alpha * q_s)  # not alpha / x: torch takes a reciprocal
        if self.dense:
            self.minv.sub_(torch.outer(u, u).mul_(coef))
        else:
            self.U[t].copy_(u)
            self.c[t].copy_(coef)
        self.s.add_(g)
        self.ssq.copy_(ss)
        self.s_norm.copy_(ss.sqrt())
        self.A.add_(nn.sqrt())
        R = self.G64 @ torch.stack([u, g]).T  # a column-major (d, 2): ~3x faster than row-major on MKL
        self.q.sub_(R[:, 0].square().mul_(coef)).clamp_(min=0.0)
        self.dot.add_(R[:, 1])
        self.dead.index_fill_(0, pick.view(1), -math.inf)

    def _snapshot(self) -> None:
        for saved, live in self._snap:
            saved.copy_(live)

    def _restore(self) -> None:
        for saved, live in self._snap:
            live.copy_(saved)

    # ---------------------------------------------------------------------------- blocks
    def _load(self, t0: int, forced: Sequence[int]) -> None:
        """This block's forced picks (−1: free) and per-step margin constants, one copy each."""
        fb = np.full(self.block, -1, dtype=np.int64)
        fb[: len(forced)] = forced
        cs = np.array([margin_consts(self.d, t0 + j, self.alpha, self.lam, self.max_norm_sq)[:2] for j in range(self.block)])
        self.forced_buf.copy_(self.torch.from_numpy(fb))
        self.consts.copy_(self.torch.from_numpy(cs))

    def _run_eager(self, steps: int, t0: int) -> None:
        self._snapshot()
        for j in range(steps):
            self._step(j, t0 + j)

    def _run_block(self, steps: int, t0: int) -> None:
        """Snapshot, then ``steps`` steps: by the CUDA graph when it applies, else eagerly."""
        if not (self.graphs and steps == self.block):
            self._run_eager(steps, t0)
            return
        with self.torch.cuda.device(self.device):
            self._run_graph(steps, t0)

    def _run_graph(self, steps: int, t0: int) -> None:
        torch = self.torch
        if not self._warm:  # the first full block runs eagerly on a side stream: the capture's warm-up
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run_eager(steps, t0)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._warm = True
            return
        if self.graph is None:
            self._capture()
        if self.graph is None:
            self._run_eager(steps, t0)
        else:
            self.graph.replay()

    def _capture(self) -> None:
        torch = self.torch
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run_eager(self.block, 0)  # dense: t enters only through `consts`
            self.graph = graph
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - needs CUDA; any failure: run eagerly
            log.warning("CUDA graph capture failed (%s: %s); running the blocks eagerly", type(exc).__name__, exc)
            self.graphs, self.graph = False, None

    # ------------------------------------------------------------------------ host side
    def _cols(self, out: np.ndarray, k: int) -> np.ndarray:
        """Column block k (0 rows, 1 flags, 2 q, 3 gᵀs, 4 ‖g‖²) of a step's output row."""
        a = _BASE + k * self.K1
        return out[a : a + self.K1]

    def _winner(self, out: np.ndarray, slot: int) -> Winner:
        q, dot, nn = (self._cols(out, k)[slot : slot + 1] for k in (2, 3, 4))
        gain, conflict, score = canonical_scores(q, dot, nn, _norm(out[_SSQ]), self.alpha, self.lam)
        index = int(self._cols(out, 0)[slot])
        return Winner(
            index=index, score=float(score[0]), gain=float(gain[0]), conflict=float(conflict[0]), q=float(q[0]),
            u=out[_BASE + 5 * self.K1 :].copy(), g=np.asarray(self.G[index], dtype=np.float64),
        )

    def _check(self, out: np.ndarray) -> list[int | None]:
        """Per step of a block: the slot of the device's pick when numpy's canonical argmax over the
        step's contenders (ties → smallest index) confirms it; None: decide that step again."""
        K = self.K
        rows, flags, q, dot, nn = (out[:, _BASE + k * self.K1 : _BASE + k * self.K1 + K] for k in range(5))
        s_norm = np.sqrt(out[:, _SSQ])[:, None]
        norm = np.sqrt(nn)
        gain = np.log1p(self.alpha * q)
        ok = (s_norm > 0) & (norm > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            conflict = np.where(ok, np.clip(-dot / (norm * s_norm), 0.0, 1.0), 0.0)  # canonical_scores, elementwise
        score = np.where(flags > 0, gain - self.lam * conflict, -np.inf)
        best = score.max(axis=1, keepdims=True)
        tied = np.where((score == best) & (flags > 0), rows, np.inf).min(axis=1)
        slots: list[int | None] = []
        for j in range(out.shape[0]):
            confirmed = out[j, _OVER] == 0 and np.isfinite(best[j, 0]) and tied[j] == out[j, _PICK]
            slots.append(int(np.flatnonzero(rows[j] == tied[j])[0]) if confirmed else None)
        return slots

    def _host_pick(self, t: int) -> int:
        """Decide step t on the host over all contenders (the device state is at step t)."""
        torch = self.torch
        with torch.no_grad():
            s_norm, A = _norm(float(self.ssq)), float(self.A)
            m0, kappa, c0 = margin_consts(self.d, t, self.alpha, self.lam, self.max_norm_sq)
            m = m0 + (4 * self.lam * min(2.0, kappa * A / s_norm + c0) if self.lam != 0 and s_norm > 0 else 0.0)
            score = self._sweep()
            rows = torch.nonzero(score >= score.max() - 2.0 * m).flatten()  # ascending
            chunk = max(1, _CANON_ELEMS // (self.d * self.d))
            parts = [self._canonical(self.G64.index_select(0, r), t)[1][:, :3].cpu().numpy() for r in rows.split(chunk)]
        sums = np.concatenate(parts)
        _, _, sc = canonical_scores(np.maximum(sums[:, 0], 0.0), sums[:, 1], sums[:, 2], s_norm, self.alpha, self.lam)
        return int(rows[int(np.argmax(sc))])  # first maximum: rows ascending

    def _rollback(self, t0: int, verified: list[int]) -> Winner:
        """Back to the block's start, replay its verified picks, decide the next step on the host."""
        self.rollbacks += 1
        torch = self.torch
        with torch.no_grad():
            self._restore()
            if verified:
                self._load(t0, verified)
                for j in range(len(verified)):
                    self._step(j, t0 + j)
            t = t0 + len(verified)
            pick = self._host_pick(t)
            self._load(t, [pick])
            self._step(0, t)
            out = self.out[0].cpu().numpy()
        return self._winner(out, self.K)

    def picks(self, steps: int, forced: Sequence[int] = ()) -> Iterator[tuple[Winner, bool]]:
        """Yield ``(winner, replayed)`` for up to ``steps`` greedy steps, the first ``len(forced)`` forced.

        The caller may stop at any time (an ω stop): the block's remaining picks are dropped. One
        call per engine (the engine's state is the run's).
        """
        if self._started:
            raise RuntimeError("DeviceGreedy.picks runs once per engine")
        self._started = True
        steps = min(int(steps), self.n)
        forced = [int(i) for i in forced][:steps]
        if len(set(forced)) != len(forced) or any(not 0 <= i < self.n for i in forced):
            raise ValueError("checkpoint picks are not distinct rows of these sketches")
        t = 0
        while t < steps:
            t = yield from self._block_picks(t, min(self.block, steps - t), forced)

    def _block_picks(self, t: int, b: int, forced: list[int]) -> Generator[tuple[Winner, bool], None, int]:
        """Run steps t..t+b−1 on the device, then yield their verified picks; returns the next step
        (a rollback ends the block early)."""
        with self.torch.no_grad():
            self._load(t, forced[t : t + b])
            self._run_block(b, t)
            out = self.out[:b].cpu().numpy()  # the block's one synchronisation
        self.n_blocks += 1
        checked = self._check(out)
        verified: list[int] = []
        for j in range(b):
            step = t + j
            self.refreshed += self.n - step
            replayed = step < len(forced)
            slot = self.K if replayed else checked[j]
            if slot is None:
                grow = bool(out[j, _OVER] != 0)
                self.overflows += int(grow)
                w = self._rollback(t, verified)
                if grow and self.K < MAX_CONTENDERS:
                    self._set_contenders(2 * self.K)
                    self._alloc_out()
                yield w, False
                return step + 1
            verified.append(int(out[j, _PICK]))
            yield self._winner(out[j], slot), replayed
        return t + b

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "device-block", "block": self.block, "contenders": self.K, "blocks": self.n_blocks,
            "rollbacks": self.rollbacks, "overflows": self.overflows, "cuda_graph": self.graph is not None,
        }
