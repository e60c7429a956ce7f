"""The lazy SPICE engine against the plain heap-lazy greedy anyone writes in numpy (issue 20, item 3).

Both run on the same synthetic sketches (float32: unit random directions, a shared direction mixed
into a quarter of the rows, log-normal row norms) in one process, one after the other:

- ``naive``: a max-heap of gain upper bounds; pop the top 64, rescore them (``X M⁻¹``, conflict against
  the selected sum), push them back, until the best fresh score beats the next bound; pick it and
  update ``M⁻¹`` by Sherman–Morrison (dense d×d, float64). ~30 lines.
- ``lazy``: the project's lazy engine (:class:`spice_ray.select.engines.LazyEngine`, what
  :func:`spice_ray.select.select` runs with numpy), driven step by step to read its counters.

Prints each one's wall time and rows rescored per step, whether the picks are identical, and the
speed-up. Usage: ``python benchmarks/lazy_vs_naive.py --sizes 100000,1000000 [--d 256]
[--fraction 0.1] [--lam 0.1] [--skip-naive]``.
"""

from __future__ import annotations

import argparse
import heapq
import os
import time

import numpy as np


def synthetic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit random rows, a quarter of them pulled towards one shared direction, log-normal norms."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=d)
    shared /= np.linalg.norm(shared)
    G = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 1 << 16):
        m = min(n, a + (1 << 16)) - a
        X = rng.normal(size=(m, d))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        quarter = rng.random(m) < 0.25
        X[quarter] += 0.8 * shared
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        X *= rng.lognormal(0.0, 0.5, size=(m, 1))
        G[a : a + m] = X
    return G


def naive_lazy(G: np.ndarray, k: int, alpha: float, lam: float, top: int = 64) -> tuple[list[int], int]:
    """The plain heap-lazy greedy: (picks, rows rescored)."""
    X64 = G.astype(np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", X64, X64))
    minv, s = np.eye(G.shape[1]), np.zeros(G.shape[1])
    heap = [(-g, i) for i, g in enumerate(np.log1p(alpha * norm**2).tolist())]
    heapq.heapify(heap)
    picks, rescored = [], 0
    for _ in range(k):
        best, best_i, popped = -np.inf, -1, []
        while heap and -heap[0][0] >= best:
            idx = [heapq.heappop(heap)[1] for _ in range(min(top, len(heap)))]
            X = X64[idx]
            gain = np.log1p(alpha * np.einsum("ij,ij->i", X @ minv, X))
            s_norm = np.linalg.norm(s)
            cos = -(X @ s) / np.maximum(norm[idx] * s_norm, 1e-300) if s_norm > 0 else np.zeros(len(idx))
            score = gain - lam * np.clip(cos, 0.0, 1.0)
            j = int(np.argmax(score))
            if score[j] > best:
                best, best_i = float(score[j]), idx[j]
            popped += list(zip((-gain).tolist(), idx))
            rescored += len(idx)
        for entry in popped:
            if entry[1] != best_i:
                heapq.heappush(heap, entry)
        g = X64[best_i]
        u = minv @ g
        minv -= (alpha / (1.0 + alpha * float(g @ u))) * np.outer(u, u)
        s += g
        picks.append(best_i)
    return picks, rescored


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.1f}/{five:.1f} on {os.cpu_count()} cpus"


def project_lazy(G: np.ndarray, k: int, alpha: float, lam: float) -> tuple[list[int], dict[str, float]]:
    """The project's lazy engine, step by step (what ``select(..., lazy=True)`` runs): picks and counts."""
    from spice_ray.select import CandidateShard

    shard = CandidateShard(G, alpha=alpha, lam=lam, max_updates=k, lazy=True)
    picks = []
    for _ in range(k):
        w = shard.best()
        picks.append(w.index)
        shard.update(w.u, w.g, w.q, w.index)
    eng = shard.engine
    return picks, {"rescored": eng.refreshed / k, "tracked": eng.tracked / k, "rebuilds": eng.rebuilds,
                   "frontier": eng.size}


def run(n: int, d: int, fraction: float, lam: float, alpha: float, skip_naive: bool) -> None:
    G = synthetic(n, d)
    k = max(1, int(round(fraction * n)))
    t = time.perf_counter()
    picks, c = project_lazy(G, k, alpha, lam)
    t_lazy = time.perf_counter() - t
    line = (f"[lazy-vs-naive] N={n:,} d={d} k={k:,} lambda={lam}: lazy {t_lazy:.1f} s ({c['rescored']:.1f} rows "
            f"rescored/step, d² flops each; {c['tracked']:.0f} frontier rows updated/step, 2d flops each; "
            f"{c['rebuilds']} rebuilds, frontier {c['frontier']:,})")
    if not skip_naive:
        t = time.perf_counter()
        naive, rescored = naive_lazy(G, k, alpha, lam)
        t_naive = time.perf_counter() - t
        line += (f"; naive {t_naive:.1f} s ({rescored / k:.1f} rows rescored/step) -> {t_naive / t_lazy:.1f}x; "
                 f"identical picks: {naive == picks}")
    print(line + f"  ({load()})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--skip-naive", action="store_true")
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        run(n, args.d, args.fraction, args.lam, args.alpha, args.skip_naive)


if __name__ == "__main__":
    main()
