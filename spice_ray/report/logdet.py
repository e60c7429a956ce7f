"""Log det against k for SPICE and the baselines, recomputed on a run's own sketches (the report's
"log det vs k" section); a method too costly to rerun is skipped, or shown from the run's trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from spice_ray.report.artifacts import RunArtifacts, finite

log = logging.getLogger(__name__)

BASELINE_METHODS = ("spice", "logdet", "random", "gradnorm")
MAX_SKETCH_BYTES = 8 << 30  # the report reads the sketch matrix only below this (float32 bytes)
MAX_GFLOP = 200.0  # per method; above it a method is skipped (the run's own falls back to its trace)


def sketch_shape(path: str) -> tuple[int, int | None]:
    """``(N, d)`` of the sketch parquet from its metadata (``d`` None for variable-size lists)."""
    ds = pads.dataset(path, format="parquet")
    t = ds.schema.field("sketch").type
    d = t.list_size if pa.types.is_fixed_size_list(t) else None
    return ds.count_rows(), d


def method_gflop(method: str, n: int, d: int, k: int) -> float:
    """Rough cost of ``select(method)``: greedy methods pass over N×d per step; fixed orders do
    O(min(t, d)·d) per pick."""
    if method in ("spice", "logdet"):
        return 2.0 * k * n * d / 1e9
    return 2.0 * k * min(k, d) * d / 1e9


def _as_selected(run: RunArtifacts, G: np.ndarray) -> np.ndarray:
    """The sketches as the run's selection saw them (its ``select.scale``), so baselines compare alike."""
    from spice_ray.select.io import read_sketch_column
    from spice_ray.select.prepare import scale_sketches

    scale = str(run.select_param("scale", "none"))
    tokens = read_sketch_column(str(run.sketches_path), "n_loss_tokens") if scale in ("tokens", "sqrt_tokens") else None
    return scale_sketches(G, tokens, scale)


def _read_run_sketches(run: RunArtifacts, max_sketch_bytes: int) -> np.ndarray:
    """The run's sketch matrix, scaled as its selection saw it; a ``MemoryError`` (nothing read)
    when it is larger than ``max_sketch_bytes``."""
    from spice_ray.select import read_sketches

    n, d = sketch_shape(str(run.sketches_path))
    if d is not None and n * d * 4 > max_sketch_bytes:
        raise MemoryError(
            f"sketch matrix {n:,} × {d} is {n * d * 4 / 2**30:.1f} GiB > {max_sketch_bytes / 2**30:.1f} GiB; "
            "baselines not computed (raise max_sketch_bytes to force)"
        )
    _, G = read_sketches(str(run.sketches_path))
    return _as_selected(run, G)


def _compared_k(run: RunArtifacts, k: int | None, n: int) -> int:
    """``k``, else the run's ``k_selected``, else its selection's size, else 10 % of ``n``; at most ``n``."""
    if k is None:
        k = run.summary.get("k_selected")
        if k is None and run.selection is not None:
            k = run.selection.num_rows
        if k is None:
            k = max(1, round(0.1 * n))
    return min(int(k), n)


def _method_curves(
    run: RunArtifacts, G: np.ndarray, methods: Sequence[str], k: int, *, alpha: float, lam: float, seed: int, max_gflop: float
) -> dict[str, dict[str, Any]]:
    """Per method: its log det curve, final log det, mean conflict and origin ("recomputed" or
    "selection.parquet"), or why it was skipped."""
    from spice_ray.select import select

    n, d = G.shape
    run_method = run.summary.get("method")
    run_trace = run.column("logdet")
    curves: dict[str, np.ndarray] = {}
    finals: dict[str, float] = {}
    conflicts: dict[str, float] = {}
    origin: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for m in methods:
        cost = method_gflop(m, n, d, k)
        if cost > max_gflop:
            if m == run_method and run_trace.size:
                curves[m] = run_trace[:k]
                finals[m] = float(run_trace[:k][-1])
                conflicts[m] = float(run.column("conflict")[:k].mean())
                origin[m] = "selection.parquet"
            else:
                skipped[m] = f"estimated {cost:,.0f} GFLOP > {max_gflop:g}"
            continue
        sel = select(G, k, method=m, alpha=alpha, lam=lam, seed=seed)
        curves[m] = sel.logdets
        finals[m] = float(sel.logdet)
        conflicts[m] = float(sel.conflicts.mean()) if len(sel) else 0.0
        origin[m] = "recomputed"
    return {"curves": curves, "final": finals, "mean_conflict": conflicts, "origin": origin, "skipped": skipped}


def logdet_curves(
    run: RunArtifacts,
    methods: Sequence[str] = BASELINE_METHODS,
    k: int | None = None,
    *,
    max_sketch_bytes: int = MAX_SKETCH_BYTES,
    max_gflop: float = MAX_GFLOP,
) -> dict[str, Any] | None:
    """Running log det over k for each method, from ``select`` on the run's own sketches.

    ``k`` defaults to the run's ``k_selected`` (so an early-stopped run is compared at its own
    size); α, λ and the seed are the run's. A greedy method costs about what the select stage did,
    so a method whose estimated cost exceeds ``max_gflop`` is skipped (the run's own method then
    shows its trace from selection.parquet, which is the same computation); sketches larger than
    ``max_sketch_bytes`` are not read at all.
    """
    if not methods or run.sketches_path is None:
        return None
    try:
        G = _read_run_sketches(run, max_sketch_bytes)
    except (OSError, ValueError, TypeError, KeyError, MemoryError, pa.ArrowInvalid) as e:
        log.warning("log det curves skipped: %s", e)
        return {"error": str(e)}
    n, d = G.shape
    k = _compared_k(run, k, n)
    alpha = run.summary.get("alpha")  # the α the selection used (resolved when the config says auto)
    alpha = float(alpha) if isinstance(alpha, int | float) else 1.0
    lam = float(run.select_param("lam", 0.1))
    seed = int(run.select_param("seed", 0))
    run_trace = run.column("logdet")
    return {
        "k": k,
        "n": int(n),
        "d": int(d),
        "alpha": alpha,
        "lam": lam,
        "seed": seed,
        **_method_curves(run, G, methods, k, alpha=alpha, lam=lam, seed=seed, max_gflop=max_gflop),
        "run_method": run.summary.get("method"),
        "run_trace": run_trace if run_trace.size else None,
        "run_logdet": finite(run.summary.get("logdet")),
    }
