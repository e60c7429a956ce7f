"""What the candidate-side engines share (:mod:`spice_ray.select.engines`, :mod:`spice_ray.select.lazy`):
the rows' norms, the device names, the common part of an engine (:class:`_Engine`: which rows are
still candidates, the narrowing of contenders by rounding margins and the canonical decision among
them) and the eager pass's threads.

Pure numpy, no Ray.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from spice_ray.select.state import U64, SelectedState, Winner

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
