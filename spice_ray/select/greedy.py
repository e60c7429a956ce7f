"""Selection over gradient sketches: SPICE, plain log-det greedy, windowed SPICE and baselines.

Pure numpy (torch only for ``device="cpu"|"cuda"``; no Ray). The objective is
``F(S) = log det(I + α Σ_{i∈S} g_i g_iᵀ)`` (DESIGN §3); the SPICE step picks
``argmax_i Δ_i(S) − λ c_i(S)`` with ``Δ_i = log(1 + α g_iᵀ M⁻¹ g_i)``, ``M = I + α F_S`` and
``c_i = max(0, −cos(g_i, ḡ_S))``; ties go to the smallest row index.

:func:`select` is validate → engine → loop: the arguments become a
:class:`~spice_ray.select.factory.Problem`, :func:`~spice_ray.select.factory.make_engine` (the one
place that decides) builds its engine — eager or lazy :class:`~spice_ray.select.engines.CandidateShard`\\ s,
the torch block engine, the windowed schedule, per-group quotas, the token budget or a fixed order
(:mod:`spice_ray.select.baselines`) — and :func:`~spice_ray.select.loop.run_engine` records its picks
with the callbacks (checkpoint, ``on_step``, progress). :func:`select_shards` runs the same loop
over shards built elsewhere (local or Ray). Every engine decides by the same canonical per-row score
(:mod:`spice_ray.select.state`), so eager, lazy, sharded, GPU, windowed-pool and resumed runs make
identical picks. Progress can be checkpointed (the picks so far) and resumed
(:mod:`spice_ray.select.resume`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spice_ray.select.engines import row_norms_sq
from spice_ray.select.factory import (  # noqa: F401  # re-exports: the names' old home
    DEFAULT_POOL_SIZE,
    GREEDY_METHODS,
    METHODS,
    Problem,
    SelectOptions,
    check_budget,
    make_engine,
    pool_quotas,
)
from spice_ray.select.loop import (  # noqa: F401  # re-exports
    Engine,
    GroupEngine,
    LocalShards,
    Progress,
    Recorder,
    ShardGroup,
    run_engine,
)
from spice_ray.select.resume import PickCheckpoint, fingerprint, fingerprint_data
from spice_ray.select.selection import STOP_REASONS, Selection, build_selection, logdet_of  # noqa: F401

log = logging.getLogger(__name__)


def select(
    sketches: np.ndarray,
    k: int,
    *,
    method: str = "spice",
    alpha: float = 1.0,
    lam: float = 0.1,
    omega: float | None = None,
    seed: int = 0,
    target: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    costs: np.ndarray | None = None,
    max_cost: float | None = None,
    options: SelectOptions | None = None,
    **engine_kw: Any,
) -> Selection:
    """Select up to ``k`` rows of ``sketches`` (N, d) by ``method``; the library entry point.

    Methods: ``spice`` (greedy ``argmax Δ − λ c``), ``logdet`` (the same with λ = 0), ``windowed``
    (SPICE on the paper's windowed schedule, below), ``random`` (a seeded permutation),
    ``gradnorm`` (top-k by ‖g_i‖), ``longest`` (top-k by ``lengths``, each row's loss tokens: the
    baseline that needs no gradient) and ``less`` (top-k cosine to the mean of ``target``, an (M, d)
    array of target-set sketches). Ties go to the smallest row index, so callers sort rows by uid
    first. ``omega`` (greedy methods only) stops before the first pick whose gain is ≤ ω × the
    first gain. Every method reports the same trace (gains, conflicts, scores with the given λ,
    running log-dets) and diagnostics.

    Windowed: rows are shuffled by a permutation seeded with ``seed`` and cut into consecutive pools
    of ``pool_size`` rows (default 10,000); pool p gets ``≈ round(k·m/N)`` picks (cumulative
    rounding, so they add up to k) chosen by the greedy among the pool's rows only, against the
    selected set carried over from the earlier pools; ties within a pool go to the smallest
    original index.

    ``options`` (:class:`~spice_ray.select.factory.SelectOptions`, or the same fields as keywords:
    ``select(G, k, lazy=True, device="cpu")``) say how it runs, never what it picks. Engine (greedy
    methods): ``lazy`` (None: lazy when running with numpy, eager on a torch device), ``device``
    (``numpy`` | ``cpu`` | ``cuda[:i]`` | ``auto`` — torch for the eager pass when not numpy: for
    spice/logdet the block engine of :mod:`spice_ray.select.device_engine`, whole steps on the device
    with one host round trip per block of steps; the windowed schedule, group quotas and the shards
    use the per-step torch pass). ``checkpoint_dir`` (greedy methods): save the picks every
    ``checkpoint_every`` steps, atomically, and resume from what is there when it was written for the
    same sketches and parameters (the engine may differ); the resumed run ends with the same picks
    and trace as an uninterrupted one. ``on_step(step, index)`` is called after each pick (replayed
    ones included). ``diagnostics``: compute the ε bound, conflict–gain Spearman and curvature
    (O(k·d²); see :mod:`spice_ray.select.diagnostics`). ``progress``: a progress bar.

    ``groups``: a label per row (e.g. its source); each group gets its share of ``k`` by largest
    remainder and the method picks within it (:mod:`spice_ray.select.quota`; not with ``windowed``).
    ``max_cost``: a budget in ``costs`` (each row's loss tokens) instead of ``k`` rows
    (:mod:`spice_ray.select.budget`): fixed orders keep the rows that fit in their order; spice and
    logdet run the per-token and the unit-cost greedy and keep the larger objective. numpy only; not
    with quotas, ``windowed``, ``omega`` or a checkpoint (a budgeted run of a pool is seconds).
    """
    opts = SelectOptions.of(options, engine_kw)
    p = _problem(sketches, k, method, alpha, lam, omega, seed, opts, target=target, groups=groups,
                 lengths=lengths, costs=costs, max_cost=max_cost)
    if omega is not None and not p.greedy:
        log.info("omega=%s is ignored by the %s baseline (no greedy gain to stop on)", omega, method)
    t0 = time.perf_counter()
    engine = make_engine(p, opts)
    params: dict[str, Any] = {"alpha": p.alpha, "lam": p.lam, "omega": omega, "seed": int(seed), **engine.params}
    ckpt = _checkpoint(p, opts.checkpoint_dir)
    forced = ckpt.load() if ckpt is not None else []
    replayed = len(forced)
    rec = Recorder(ckpt, opts.checkpoint_every, opts.on_step, Progress(opts.progress, p.k, f"select[{method}]"))
    early = run_engine(engine, p.k, omega=omega if p.greedy else None, rec=rec, forced=forced, checkpoint=ckpt)
    elapsed = time.perf_counter() - t0
    stats = {"seconds": round(elapsed, 4), "replayed": replayed, **engine.stats()}
    n, d = p.G.shape
    k_requested = n if max_cost is not None else int(k)  # the budget, not k, ends the run
    sel = build_selection(rec, method=method, params=params, n=n, k_requested=k_requested, early=early,
                          diagnostics=opts.diagnostics, stats=stats)
    log.info("select[%s]: %d of %d (d=%d) in %.2fs, logdet=%.4f, stop=%s",
             method, len(sel), n, d, elapsed, sel.logdet, sel.stop_reason)
    return sel


def _as_matrix(sketches: np.ndarray) -> np.ndarray:
    G = np.asarray(sketches)
    if G.ndim != 2:
        raise ValueError(f"sketches must be a 2-d (N, d) array, got shape {G.shape}")
    if G.dtype not in (np.float32, np.float64):
        G = G.astype(np.float32)
    if not np.isfinite(G).all():
        raise ValueError("sketches contain NaN or inf")
    return np.ascontiguousarray(G)


def _problem(
    sketches: np.ndarray, k: int, method: str, alpha: float, lam: float, omega: float | None, seed: int,
    opts: SelectOptions, **data: Any,
) -> Problem:
    """The arguments checked and resolved (λ = 0 for logdet, k ≤ N, N under a budget, the pool size)."""
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
    if opts.pool_size is not None and opts.pool_size <= 0:
        raise ValueError(f"pool_size must be > 0, got {opts.pool_size}")
    G = _as_matrix(sketches)
    n = G.shape[0]
    p = Problem(
        G=G, k=min(int(k), n), method=method, alpha=float(alpha), lam=0.0 if method == "logdet" else float(lam),
        norm_sq=np.zeros(0), seed=int(seed), omega=omega,
        pool_size=int(opts.pool_size or DEFAULT_POOL_SIZE) if method == "windowed" else None, **data,
    )
    if p.max_cost is not None:
        check_budget(p, opts.device)
        p.k = n
    p.norm_sq = row_norms_sq(G)
    return p


def _checkpoint(p: Problem, directory: str | None) -> PickCheckpoint | None:
    """The pick checkpoint of a greedy run under ``directory`` (None: none; a budgeted run has none)."""
    if directory is None or not p.greedy or p.max_cost is not None:
        return None
    n, d = p.G.shape
    fp = fingerprint(
        method=p.method, n=n, d=d, k=p.k, alpha=p.alpha, lam=p.lam, omega=p.omega,
        seed=p.seed if p.method == "windowed" else None, pool_size=p.pool_size, groups=p.groups,
        data=fingerprint_data(p.G, p.norm_sq),
    )
    return PickCheckpoint(directory, fp)


def select_shards(
    group: ShardGroup,
    k: int,
    *,
    alpha: float,
    lam: float,
    omega: float | None = None,
    method: str = "spice",
    checkpoint: PickCheckpoint | None = None,
    checkpoint_every: int = 1000,
    on_step: Callable[[int, int], None] | None = None,
    diagnostics: bool = True,
    progress: bool = False,
) -> Selection:
    """The greedy over an existing group of shards (local or Ray); the same picks as :func:`select`.

    The shards must have been built with ``max_updates = min(k, N)`` and the same α, λ.
    """
    k_eff = min(int(k), group.n)
    forced = checkpoint.load() if checkpoint is not None else []
    replayed = len(forced)
    rec = Recorder(checkpoint, checkpoint_every, on_step, Progress(progress, k_eff, f"select[{method}, sharded]"))
    t0 = time.perf_counter()
    early = run_engine(GroupEngine(group), k_eff, omega=omega, rec=rec, forced=forced, checkpoint=checkpoint)
    params = {"alpha": float(alpha), "lam": float(lam), "omega": omega, "seed": 0}
    stats = {"seconds": round(time.perf_counter() - t0, 4), "replayed": replayed}
    return build_selection(
        rec, method=method, params=params, n=group.n, k_requested=int(k), early=early,
        diagnostics=diagnostics, stats=stats,
    )
