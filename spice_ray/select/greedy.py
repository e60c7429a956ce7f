"""Selection over gradient sketches: SPICE, plain log-det greedy, windowed SPICE and baselines.

Pure numpy (torch only for ``device="cpu"|"cuda"``; no Ray). The objective is
``F(S) = log det(I + α Σ_{i∈S} g_i g_iᵀ)`` (DESIGN §3); the SPICE step picks
``argmax_i Δ_i(S) − λ c_i(S)`` with ``Δ_i = log(1 + α g_iᵀ M⁻¹ g_i)``, ``M = I + α F_S`` and
``c_i = max(0, −cos(g_i, ḡ_S))``; ties go to the smallest row index.

The greedy runs over one or more :class:`~spice_ray.select.engines.CandidateShard`\\ s (eager: one
fused pass over the rows per step; lazy: stale upper bounds, refresh only what can win), reduced
per step as ``max score, ties → smallest index``. Every engine decides by the same canonical
per-row score (:mod:`spice_ray.select.state`), so eager, lazy, sharded, GPU, windowed-pool and
resumed runs make identical picks. Progress can be checkpointed (the picks so far) and resumed
(:mod:`spice_ray.select.resume`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from spice_ray.select.budget import as_costs, budget_greedy, fit_in_order
from spice_ray.select.device_engine import DeviceGreedy
from spice_ray.select.diagnostics import diagnose
from spice_ray.select.engines import CandidateShard, _resolve_device, row_norms_sq
from spice_ray.select.quota import (
    QuotaShards,
    fixed_order_with_quotas,
    group_rows,
    quota_counts,
)
from spice_ray.select.resume import PickCheckpoint, fingerprint_data
from spice_ray.select.state import SelectedState, Winner
from spice_ray.select.target import target_cosine

log = logging.getLogger(__name__)

METHODS = ("spice", "logdet", "random", "gradnorm", "longest", "less", "windowed")
GREEDY_METHODS = ("spice", "logdet", "windowed")
STOP_REASONS = ("budget", "exhausted", "early_stop")
DEFAULT_POOL_SIZE = 10_000


@dataclass
class Selection:
    """The picks of one selection run, in order, with the per-step trace and diagnostics.

    ``gains[t]``, ``conflicts[t]`` and ``scores[t]`` are measured against the set selected before
    pick ``t``; ``logdets[t]`` is ``log det(I + α F_S)`` after it (so ``logdet == logdets[-1]``);
    ``eps[t] = gains[t] − bases[t]`` and ``eps_bound[t]`` its first-order bound (see
    :mod:`spice_ray.select.diagnostics`).
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
    eps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    eps_bound: np.ndarray = field(default_factory=lambda: np.zeros(0))
    diagnostics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

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
            "budget": self.params.get("budget"),
            "diagnostics": dict(self.diagnostics),
            "engine": dict(self.stats),
        }


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


class ShardGroup(Protocol):
    """What the greedy driver needs from the candidates, however they are spread."""

    n: int

    def best(self) -> Winner | None: ...

    def exact(self, index: int) -> Winner: ...

    def update(self, w: Winner) -> None: ...


class LocalShards:
    """Shards in this process; ``best`` reduces their winners (max score, ties → smallest index)."""

    def __init__(self, shards: Sequence[CandidateShard]) -> None:
        self.shards = list(shards)
        self.n = sum(len(s) for s in self.shards)

    def best(self) -> Winner | None:
        best: Winner | None = None
        for shard in self.shards:
            w = shard.best()
            if w is not None and w.beats(best):
                best = w
        return best

    def exact(self, index: int) -> Winner:
        for shard in self.shards:
            if shard.local(index) is not None:
                return shard.exact(index)
        raise KeyError(f"row {index} is in no shard")

    def update(self, w: Winner) -> None:
        for shard in self.shards:
            shard.update(w.u, w.g, w.q, w.index)

    @property
    def refreshed(self) -> int:
        return sum(s.refreshed for s in self.shards)


class Recorder:
    """Collects the trace of picks; checkpoints every ``every`` picks; calls ``on_step``."""

    def __init__(
        self,
        checkpoint: PickCheckpoint | None = None,
        every: int = 1000,
        on_step: Callable[[int, int], None] | None = None,
        bar: _Progress | None = None,
    ) -> None:
        self.picks: list[int] = []
        self.gains: list[float] = []
        self.conflicts: list[float] = []
        self.scores: list[float] = []
        self.rows: list[np.ndarray] = []
        self.first_gain: float | None = None
        self.checkpoint = checkpoint
        self.every = max(1, int(every))
        self.on_step = on_step
        self.bar = bar

    def record(self, w: Winner) -> None:
        self.picks.append(int(w.index))
        self.gains.append(float(w.gain))
        self.conflicts.append(float(w.conflict))
        self.scores.append(float(w.score))
        self.rows.append(w.g)
        if self.first_gain is None:
            self.first_gain = float(w.gain)
        if self.checkpoint is not None and len(self.picks) % self.every == 0:
            self.checkpoint.save(self.picks)
        if self.bar is not None:
            self.bar.step()
        if self.on_step is not None:
            self.on_step(len(self.picks) - 1, int(w.index))


def run_greedy(
    group: ShardGroup, steps: int, *, omega: float | None, rec: Recorder, forced: list[int] | None = None
) -> bool:
    """Run up to ``steps`` greedy steps over ``group``; returns True if stopped early by ω.

    ``forced``: picks to replay first (from a checkpoint), consumed from the front.
    """
    for _ in range(steps):
        if forced:
            w = group.exact(forced.pop(0))
        else:
            best = group.best()
            if best is None:
                break
            w = best
            if omega is not None and rec.first_gain is not None and w.gain <= omega * rec.first_gain:
                return True
        rec.record(w)
        group.update(w)
    return False


def run_device_greedy(
    engine: DeviceGreedy, steps: int, *, omega: float | None, rec: Recorder, forced: list[int]
) -> bool:
    """:func:`run_greedy` for the block engine (its picks come out verified, a block at a time).

    ``forced``: picks to replay first, consumed from the front; returns True if stopped early by ω
    (the rest of the engine's block is dropped).
    """
    replay = forced[:steps]
    del forced[: len(replay)]
    for w, replayed in engine.picks(steps, replay):
        if not replayed and omega is not None and rec.first_gain is not None and w.gain <= omega * rec.first_gain:
            return True
        rec.record(w)
    return False


def _as_matrix(sketches: np.ndarray) -> np.ndarray:
    G = np.asarray(sketches)
    if G.ndim != 2:
        raise ValueError(f"sketches must be a 2-d (N, d) array, got shape {G.shape}")
    if G.dtype not in (np.float32, np.float64):
        G = G.astype(np.float32)
    if not np.isfinite(G).all():
        raise ValueError("sketches contain NaN or inf")
    return np.ascontiguousarray(G)


def pool_quotas(n: int, k: int, pool_size: int) -> list[tuple[int, int, int]]:
    """``(start, end, quota)`` of each pool of the windowed schedule.

    ``quota ≈ round(k · m / N)`` per pool of m rows, distributed by cumulative rounding
    (``round(k·end/N) − round(k·start/N)``, half up) so that the quotas add up to exactly k.
    """
    out = []
    for a in range(0, n, pool_size):
        b = min(n, a + pool_size)
        quota = math.floor(k * b / n + 0.5) - math.floor(k * a / n + 0.5)
        out.append((a, b, min(quota, b - a)))
    return out


def build_selection(
    rec: Recorder,
    *,
    method: str,
    params: dict[str, Any],
    n: int,
    k_requested: int,
    k_eff: int,
    early: bool,
    diagnostics: bool,
    stats: dict[str, Any] | None = None,
) -> Selection:
    """The :class:`Selection` (trace, log-dets, diagnostics) of a recorded run."""
    alpha = float(params["alpha"])
    d_rows = rec.rows[0].shape[0] if rec.rows else 0
    rows = np.stack(rec.rows) if rec.rows else np.zeros((0, d_rows))
    gains = np.asarray(rec.gains, dtype=np.float64)
    conflicts = np.asarray(rec.conflicts, dtype=np.float64)
    bases = np.log1p(alpha * np.einsum("ij,ij->i", rows, rows)) if len(rows) else np.zeros(0)
    logdets = np.cumsum(gains)
    if diagnostics:
        eps, bound, diag = diagnose(rows, gains, bases, conflicts, alpha)
    else:
        eps, bound, diag = gains - bases, np.full(len(gains), np.nan), {}
    if early:
        stop_reason = "early_stop"
    elif len(rec.picks) >= n:
        stop_reason = "exhausted"
    else:
        stop_reason = "budget"
    return Selection(
        indices=np.asarray(rec.picks, dtype=np.int64),
        gains=gains,
        bases=bases,
        conflicts=conflicts,
        scores=np.asarray(rec.scores, dtype=np.float64),
        logdets=logdets,
        logdet=float(logdets[-1]) if len(logdets) else 0.0,
        stop_reason=stop_reason,
        method=method,
        params=params,
        n_candidates=n,
        k_requested=k_requested,
        eps=eps,
        eps_bound=bound,
        diagnostics=diag,
        stats=dict(stats or {}),
    )


def _fixed_order(method: str, G: np.ndarray, k: int, norm_sq: np.ndarray, seed: int, target: np.ndarray | None,
                 lengths: np.ndarray | None = None) -> np.ndarray:
    n = G.shape[0]
    if method == "random":
        return np.random.default_rng(seed).permutation(n)[:k].astype(np.int64)
    if method == "gradnorm":  # largest norm first, ties by index (stable sort of −‖g‖)
        return np.argsort(-norm_sq, kind="stable")[:k].astype(np.int64)
    if method == "longest":  # most loss tokens first, ties by index; the sketches are not looked at
        if lengths is None or len(lengths) != n:
            raise ValueError("method 'longest' needs each row's loss tokens (lengths=, n values)")
        return np.argsort(-np.asarray(lengths, dtype=np.float64), kind="stable")[:k].astype(np.int64)
    # less: top-k cosine to the target set's mean sketch, ties by index
    if target is None:
        raise ValueError("method 'less' needs target sketches (target=(M, d) array)")
    cos = target_cosine(G, target, norm_sq)
    return np.argsort(-cos, kind="stable")[:k].astype(np.int64)


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
    target: np.ndarray | None = None,
    pool_size: int | None = None,
    lazy: bool | None = None,
    device: str | None = "numpy",
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    on_step: Callable[[int, int], None] | None = None,
    diagnostics: bool = True,
    groups: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    costs: np.ndarray | None = None,
    max_cost: float | None = None,
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

    Engine (greedy methods; the picks do not depend on it): ``lazy`` (None: lazy when running
    with numpy, eager on a torch device), ``device`` (``numpy`` | ``cpu`` | ``cuda[:i]`` |
    ``auto`` — torch for the eager pass when not numpy: for spice/logdet the block engine of
    :mod:`spice_ray.select.device_engine`, whole steps on the device with one host round trip per
    block of steps; the windowed schedule, group quotas and the shards use the per-step torch
    pass). ``checkpoint_dir`` (greedy methods): save the picks every ``checkpoint_every`` steps,
    atomically, and resume from what is there when it was written for the same sketches and
    parameters (the engine may differ); the resumed run ends with the same picks and trace as an
    uninterrupted one. ``on_step(step, index)`` is called
    after each pick (replayed ones included). ``diagnostics``: compute the ε bound, conflict–gain
    Spearman and curvature (O(k·d²); see :mod:`spice_ray.select.diagnostics`). ``groups``: a label
    per row (e.g. its source); each group gets its share of ``k`` by largest remainder and the method
    picks within it (:mod:`spice_ray.select.quota`; not with ``windowed``).

    ``max_cost``: a budget in ``costs`` (each row's loss tokens) instead of ``k`` rows
    (:mod:`spice_ray.select.budget`): fixed orders keep the rows that fit in their order; spice and
    logdet run the per-token and the unit-cost greedy and keep the larger objective. numpy only; not
    with quotas, ``windowed``, ``omega`` or a checkpoint (a budgeted run of a pool is seconds).
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
    if pool_size is not None and pool_size <= 0:
        raise ValueError(f"pool_size must be > 0, got {pool_size}")
    G = _as_matrix(sketches)
    n, d = G.shape
    if max_cost is not None:
        _check_budget(method, n, costs, max_cost, groups, omega, device)
        k, checkpoint_dir = n, None  # the budget, not k, ends the run
    k_eff = min(int(k), n)
    lam_eff = 0.0 if method == "logdet" else float(lam)
    greedy = method in GREEDY_METHODS
    dev = _resolve_device(device) if greedy and max_cost is None else "numpy"
    use_lazy = (dev == "numpy") if lazy is None else bool(lazy)
    params: dict[str, Any] = {"alpha": float(alpha), "lam": lam_eff, "omega": omega, "seed": int(seed)}
    if method == "windowed":
        params["pool_size"] = int(pool_size or DEFAULT_POOL_SIZE)
    if greedy:
        params.update(lazy=use_lazy, device="numpy" if use_lazy else dev)
    if omega is not None and not greedy:
        log.info("omega=%s is ignored by the %s baseline (no greedy gain to stop on)", omega, method)

    t0 = time.perf_counter()
    norm_sq = row_norms_sq(G)
    ckpt = None
    forced: list[int] = []
    if checkpoint_dir is not None and greedy:
        fp = {
            "method": method, "n": n, "d": d, "k": k_eff, "alpha": float(alpha), "lam": lam_eff, "omega": omega,
            "seed": int(seed) if method == "windowed" else None, "pool_size": params.get("pool_size"),
            "data": fingerprint_data(G, norm_sq),
        }
        if groups is not None:
            fp["groups"] = hashlib.sha256("\n".join(map(str, np.asarray(groups).tolist())).encode()).hexdigest()
        ckpt = PickCheckpoint(checkpoint_dir, fp)
        forced = ckpt.load()
    bar = _Progress(progress, k_eff, f"select[{method}]")
    rec = Recorder(ckpt, checkpoint_every, on_step, bar)
    early = False
    refreshed = 0
    engine_stats: dict[str, Any] = {}
    replayed = len(forced)
    if groups is not None:
        if method == "windowed":
            raise ValueError("per-group quotas and the windowed schedule do not combine")
        params["quota"] = "groups"
    try:
        if max_cost is not None:
            order, engine_stats = _within_budget(method, G, as_costs(costs, n), max_cost, alpha, lam_eff, norm_sq, seed, target, lengths)
            params["budget"] = {"max_cost": float(max_cost), **engine_stats}
            _replay(order, G, alpha, lam_eff, rec)
        elif groups is not None and method in ("spice", "logdet"):
            early, refreshed = _with_quotas(G, k_eff, groups, alpha, lam_eff, omega, use_lazy, dev, rec, forced)
        elif method in ("spice", "logdet") and not use_lazy and dev != "numpy":
            engine = DeviceGreedy(G, alpha=alpha, lam=lam_eff, max_updates=k_eff, device=dev)
            early = run_device_greedy(engine, k_eff, omega=omega, rec=rec, forced=forced)
            refreshed = engine.refreshed
            engine_stats = engine.stats()
        elif method in ("spice", "logdet"):
            shard = CandidateShard(G, alpha=alpha, lam=lam_eff, max_updates=k_eff, lazy=use_lazy, device=dev)
            group = LocalShards([shard])
            early = run_greedy(group, k_eff, omega=omega, rec=rec, forced=forced)
            refreshed = group.refreshed
        elif method == "windowed":
            early, refreshed = _windowed(G, k_eff, alpha, lam_eff, omega, seed, params["pool_size"], use_lazy, dev, rec, forced)
        else:
            order = _fixed_order(method, G, n if groups is not None else k_eff, norm_sq, seed, target, lengths)
            if groups is not None:
                order = fixed_order_with_quotas(order, groups, k_eff)
            _replay(order, G, alpha, lam_eff, rec)
        if forced:
            raise ValueError(f"checkpoint has {len(forced)} picks that do not fit this run")
        if ckpt is not None:
            ckpt.save(rec.picks, complete=True)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    stats = {"seconds": round(elapsed, 4), "replayed": replayed}
    if greedy and max_cost is None:
        stats.update(lazy=use_lazy, device=params["device"], scored=int(refreshed), **engine_stats)
    sel = build_selection(
        rec, method=method, params=params, n=n, k_requested=int(k), k_eff=k_eff, early=early,
        diagnostics=diagnostics, stats=stats,
    )
    log.info(
        "select[%s]: %d of %d (d=%d) in %.2fs, logdet=%.4f, stop=%s",
        method, len(sel), n, d, elapsed, sel.logdet, sel.stop_reason,
    )
    return sel


def _replay(order: np.ndarray, G: np.ndarray, alpha: float, lam: float, rec: Recorder) -> None:
    """Record picks made in a fixed order with their canonical values (the same trace as a greedy)."""
    state = SelectedState(G.shape[1], max(1, len(order)), alpha, lam)
    for i in np.asarray(order).tolist():
        w = state.winner(G[[i]].astype(np.float64), np.array([i]))
        rec.record(w)
        state.add(w.u, w.g, w.q)


def _check_budget(method: str, n: int, costs: np.ndarray | None, max_cost: float, groups: np.ndarray | None,
                  omega: float | None, device: str | None) -> None:
    if costs is None or len(costs) != n:
        raise ValueError(f"a budget in tokens needs each row's cost (costs=, {n} values)")
    if not max_cost >= 0:
        raise ValueError(f"max_cost must be >= 0, got {max_cost}")
    refused = {"windowed": method == "windowed", "per-group quotas": groups is not None, "omega": omega is not None,
               f"device {device}": device not in (None, "numpy")}
    if any(refused.values()):
        raise ValueError(f"a budget in tokens does not combine with {', '.join(k for k, v in refused.items() if v)}")


def _within_budget(method: str, G: np.ndarray, costs: np.ndarray, max_cost: float, alpha: float, lam: float,
                   norm_sq: np.ndarray, seed: int, target: np.ndarray | None, lengths: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The picks within ``max_cost`` and what the budgeted run reports."""
    if method in ("spice", "logdet"):
        kept, other = budget_greedy(G, costs, max_cost, alpha=alpha, lam=lam)
        stats = {"rule": kept.rule, "cost": kept.cost, "objective": kept.objective, "scored": kept.scored + other.scored,
                 "other_rule": {"rule": other.rule, "objective": other.objective, "cost": other.cost, "k": len(other.picks)}}
        return np.asarray(kept.picks, dtype=np.int64), stats
    order = fit_in_order(_fixed_order(method, G, G.shape[0], norm_sq, seed, target, lengths), costs, max_cost)
    return order, {"rule": "in order", "cost": float(costs[order].sum())}


def _with_quotas(
    G: np.ndarray, k: int, groups: np.ndarray, alpha: float, lam: float, omega: float | None,
    lazy: bool, device: str, rec: Recorder, forced: list[int],
) -> tuple[bool, int]:
    """One joint greedy over one shard per group, each group capped at its quota; (stopped early, rows scored)."""
    rows = group_rows(groups)
    shards = [CandidateShard(G[r], alpha=alpha, lam=lam, max_updates=k, indices=r, lazy=lazy, device=device) for r in rows]
    group = QuotaShards(shards, quota_counts(groups, k))
    early = run_greedy(group, k, omega=omega, rec=rec, forced=forced)
    return early, group.refreshed


def _windowed(
    G: np.ndarray, k: int, alpha: float, lam: float, omega: float | None, seed: int, pool_size: int,
    lazy: bool, device: str, rec: Recorder, forced: list[int],
) -> tuple[bool, int]:
    """The windowed schedule (see :func:`select`); returns (stopped early, rows scored)."""
    n, d = G.shape
    perm = np.random.default_rng(seed).permutation(n)
    state = SelectedState(d, k, alpha, lam)
    refreshed = 0
    for a, b, quota in pool_quotas(n, k, pool_size):
        if quota <= 0:
            continue
        rows = np.sort(perm[a:b])
        shard = CandidateShard(G[rows], alpha=alpha, lam=lam, max_updates=k, indices=rows, lazy=lazy, device=device, state=state)
        in_pool = set(rows.tolist())
        pool_forced: list[int] = []
        while forced and len(pool_forced) < quota and forced[0] in in_pool:
            pool_forced.append(forced.pop(0))
        early = run_greedy(LocalShards([shard]), quota, omega=omega, rec=rec, forced=pool_forced)
        refreshed += shard.refreshed
        if early:
            return True, refreshed
    return False, refreshed


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
    bar = _Progress(progress, k_eff, f"select[{method}, sharded]")
    rec = Recorder(checkpoint, checkpoint_every, on_step, bar)
    t0 = time.perf_counter()
    try:
        early = run_greedy(group, k_eff, omega=omega, rec=rec, forced=forced)
        if checkpoint is not None:
            checkpoint.save(rec.picks, complete=True)
    finally:
        bar.close()
    params = {"alpha": float(alpha), "lam": float(lam), "omega": omega, "seed": 0}
    stats = {"seconds": round(time.perf_counter() - t0, 4), "replayed": replayed}
    return build_selection(
        rec, method=method, params=params, n=group.n, k_requested=int(k), k_eff=k_eff, early=early,
        diagnostics=diagnostics, stats=stats,
    )


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
