"""Which engine runs a selection: the one place that decides (:func:`make_engine`), the engines it
builds, and the stage's choices (:func:`refusal`: shard actors or one worker; :func:`stage_device`).

Pure numpy (torch only for a torch device), no Ray. Every engine is an
:class:`~spice_ray.select.loop.Engine` (``picks`` / ``stats`` / ``params``), run by the one greedy
loop of :mod:`spice_ray.select.loop`; every engine decides by the canonical per-row score
(:mod:`spice_ray.select.state`), so the picks do not depend on the choice. In the order decided:

1. a budget in tokens (``max_cost``) — :class:`BudgetEngine`: :mod:`spice_ray.select.budget`'s lazy
   cost greedy (spice, logdet) or a fixed order cut to the budget, replayed;
2. a fixed order (random, gradnorm, longest, less; :mod:`spice_ray.select.baselines`), per group
   under quotas — :class:`~spice_ray.select.baselines.OrderEngine`;
3. the windowed schedule — :class:`WindowedEngine`, one candidate shard per pool;
4. per-group quotas — a :class:`~spice_ray.select.loop.GroupEngine` over
   :class:`~spice_ray.select.quota.QuotaShards`, one shard per group;
5. eager on a torch device — :class:`BlockEngine`, :mod:`spice_ray.select.device_engine`'s block greedy;
6. otherwise one :class:`~spice_ray.select.engines.CandidateShard` (lazy numpy, eager numpy or per-step
   torch) in a :class:`~spice_ray.select.loop.GroupEngine`.

The sharded greedy (shard workers in this process or in Ray actors, :mod:`spice_ray.select.sharding`)
is a :class:`~spice_ray.select.loop.GroupEngine` over their :class:`~spice_ray.select.sharding.WorkerGroup`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from spice_ray.select.baselines import FIXED_ORDERS, OrderEngine, fixed_order
from spice_ray.select.budget import as_costs, budget_greedy, fit_in_order
from spice_ray.select.device_engine import DeviceGreedy
from spice_ray.select.engines import CandidateShard, _resolve_device
from spice_ray.select.loop import Engine, GroupEngine, LocalShards, Picks
from spice_ray.select.quota import QuotaShards, fixed_order_with_quotas, group_rows, quota_counts
from spice_ray.select.state import SelectedState

METHODS = ("spice", "logdet", "random", "gradnorm", "longest", "less", "windowed")
GREEDY_METHODS = ("spice", "logdet", "windowed")
SHARDABLE = ("spice", "logdet")
DEFAULT_POOL_SIZE = 10_000


@dataclass(frozen=True)
class SelectOptions:
    """How :func:`~spice_ray.select.greedy.select` runs (not what it picks).

    ``lazy`` (None: lazy with numpy, eager on a torch device), ``device`` (``numpy`` | ``cpu`` |
    ``cuda[:i]`` | ``auto``), ``pool_size`` (the windowed schedule's pool, default 10,000),
    ``checkpoint_dir`` / ``checkpoint_every`` (save the picks, resume from them), ``progress`` (a
    progress bar), ``on_step(step, index)`` (after each pick), ``diagnostics`` (the ε bound,
    Spearman, curvature).
    """

    lazy: bool | None = None
    device: str | None = "numpy"
    pool_size: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    progress: bool = False
    on_step: Callable[[int, int], None] | None = None
    diagnostics: bool = True

    @classmethod
    def of(cls, options: SelectOptions | None, keywords: dict[str, Any]) -> SelectOptions:
        """``options`` with the keyword form's fields (``select(..., lazy=True)``) applied over it."""
        known = {f.name for f in fields(cls)}
        for name in keywords:
            if name not in known:
                raise TypeError(f"select() got an unexpected keyword argument {name!r}")
        return replace(options or cls(), **keywords)


@dataclass
class Problem:
    """A validated selection problem: the sketches and what the method needs of them."""

    G: np.ndarray
    k: int  # the picks to make: min(k, N), or N under a token budget
    method: str
    alpha: float
    lam: float  # 0 for logdet
    norm_sq: np.ndarray
    seed: int = 0
    omega: float | None = None
    pool_size: int | None = None  # windowed only
    target: np.ndarray | None = None
    lengths: np.ndarray | None = None
    groups: np.ndarray | None = None
    costs: np.ndarray | None = None
    max_cost: float | None = None

    @property
    def greedy(self) -> bool:
        return self.method in GREEDY_METHODS


def resolve_engine(method: str, lazy: bool | None, device: str | None, budgeted: bool = False) -> tuple[bool, str]:
    """``(lazy, device)`` of a run: a greedy method resolves ``device`` (``auto``: cuda when torch sees
    one), and runs lazy when on numpy unless ``lazy`` says otherwise; the rest run numpy."""
    dev = _resolve_device(device) if method in GREEDY_METHODS and not budgeted else "numpy"
    return ((dev == "numpy") if lazy is None else bool(lazy)), dev


def make_engine(p: Problem, opts: SelectOptions) -> Engine:
    """The engine that runs ``p`` (see the module's list, in the order decided)."""
    use_lazy, dev = resolve_engine(p.method, opts.lazy, opts.device, p.max_cost is not None)
    run = {"lazy": use_lazy, "device": "numpy" if use_lazy else dev}  # where a greedy runs
    params = dict(run) if p.greedy else {}
    if p.max_cost is not None:
        return BudgetEngine(p, params)
    if not p.greedy:
        order = fixed_order(p.method, p.G, p.G.shape[0] if p.groups is not None else p.k, p.norm_sq, p.seed, p.target, p.lengths)
        if p.groups is not None:
            order = fixed_order_with_quotas(order, p.groups, p.k)
            params["quota"] = "groups"
        return OrderEngine(order, p.G, alpha=p.alpha, lam=p.lam, params=params)
    kw = dict(alpha=p.alpha, lam=p.lam, max_updates=p.k, lazy=use_lazy, device=dev)
    if p.method == "windowed" and p.groups is not None:
        raise ValueError("per-group quotas and the windowed schedule do not combine")
    if p.method == "windowed":
        return WindowedEngine(p, kw, {"pool_size": p.pool_size} | params, run)
    if p.groups is not None:
        shards = [CandidateShard(p.G[r], indices=r, **kw) for r in group_rows(p.groups)]
        return GroupEngine(QuotaShards(shards, quota_counts(p.groups, p.k)), params | {"quota": "groups"}, run)
    if not use_lazy and dev != "numpy":
        return BlockEngine(p, dev, params, run)
    return GroupEngine(LocalShards([CandidateShard(p.G, **kw)]), params, run)


class BlockEngine:
    """:class:`~spice_ray.select.device_engine.DeviceGreedy` as an engine (its picks come out
    verified, a block at a time; the replayed picks are handed over up front)."""

    def __init__(self, p: Problem, device: str, params: dict[str, Any], run: dict[str, Any]) -> None:
        self.engine = DeviceGreedy(p.G, alpha=p.alpha, lam=p.lam, max_updates=p.k, device=device)
        self.params, self.run = params, run

    def picks(self, steps: int, forced: list[int]) -> Picks:
        replay = forced[:steps]
        del forced[: len(replay)]
        yield from self.engine.picks(steps, replay)

    def stats(self) -> dict[str, Any]:
        return {**self.run, "scored": int(self.engine.refreshed), **self.engine.stats()}


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


class WindowedEngine:
    """The windowed schedule: rows shuffled by a permutation seeded with ``seed``, cut into pools of
    ``pool_size``; each pool's quota (:func:`pool_quotas`) picked by the greedy among its rows only,
    against the selected set carried over from the earlier pools (one shared state)."""

    def __init__(self, p: Problem, shard_kw: dict[str, Any], params: dict[str, Any], run: dict[str, Any]) -> None:
        self.p, self.shard_kw, self.params, self.run = p, shard_kw, params, run
        self.shards: list[CandidateShard] = []

    def picks(self, steps: int, forced: list[int]) -> Picks:
        p = self.p
        n, d = p.G.shape
        perm = np.random.default_rng(p.seed).permutation(n)
        state = SelectedState(d, p.k, p.alpha, p.lam)
        for a, b, quota in pool_quotas(n, p.k, int(p.pool_size or DEFAULT_POOL_SIZE)):
            if quota <= 0:
                continue
            rows = np.sort(perm[a:b])
            shard = CandidateShard(p.G[rows], indices=rows, state=state, **self.shard_kw)
            self.shards.append(shard)
            in_pool = set(rows.tolist())
            pool_forced: list[int] = []
            while forced and len(pool_forced) < quota and forced[0] in in_pool:
                pool_forced.append(forced.pop(0))
            yield from GroupEngine(LocalShards([shard])).picks(quota, pool_forced)

    def stats(self) -> dict[str, Any]:
        return {**self.run, "scored": int(sum(s.refreshed for s in self.shards))}


class BudgetEngine:
    """A budget in tokens: the picks within ``max_cost`` (:mod:`spice_ray.select.budget`), replayed
    as a fixed order; what the budgeted run found goes to ``params["budget"]``."""

    def __init__(self, p: Problem, params: dict[str, Any]) -> None:
        costs = as_costs(p.costs, p.G.shape[0])
        assert p.max_cost is not None
        if p.method in SHARDABLE:
            kept, other = budget_greedy(p.G, costs, p.max_cost, alpha=p.alpha, lam=p.lam)
            found = {"rule": kept.rule, "cost": kept.cost, "objective": kept.objective, "scored": kept.scored + other.scored,
                     "other_rule": {"rule": other.rule, "objective": other.objective, "cost": other.cost, "k": len(other.picks)}}
            order = np.asarray(kept.picks, dtype=np.int64)
        else:
            full = fixed_order(p.method, p.G, p.G.shape[0], p.norm_sq, p.seed, p.target, p.lengths)
            order = fit_in_order(full, costs, p.max_cost)
            found = {"rule": "in order", "cost": float(costs[order].sum())}
        self.params = params | {"budget": {"max_cost": float(p.max_cost), **found}}
        self.replay = OrderEngine(order, p.G, alpha=p.alpha, lam=p.lam)

    def picks(self, steps: int, forced: list[int]) -> Picks:
        return self.replay.picks(steps, forced)

    def stats(self) -> dict[str, Any]:
        return {}


def check_budget(p: Problem, device: str | None) -> None:
    """What a budget in tokens refuses (see :func:`~spice_ray.select.greedy.select`)."""
    n = p.G.shape[0]
    if p.costs is None or len(p.costs) != n:
        raise ValueError(f"a budget in tokens needs each row's cost (costs=, {n} values)")
    if not p.max_cost >= 0:  # type: ignore[operator]
        raise ValueError(f"max_cost must be >= 0, got {p.max_cost}")
    refused = {"windowed": p.method == "windowed", "per-group quotas": p.groups is not None, "omega": p.omega is not None,
               f"device {device}": device not in (None, "numpy")}
    if any(refused.values()):
        raise ValueError(f"a budget in tokens does not combine with {', '.join(k for k, v in refused.items() if v)}")


def refusal(method: str, executor: str, budget: str = "records", target: str | None = None) -> str | None:
    """Why ``select.shards > 1`` cannot shard this configuration, in one line (None: it can)."""
    if target:
        return "a selection with select.target runs in one worker (its candidates are chosen from all rows' cosines first)"
    if budget != "records":
        return f"a budget in {budget} runs in one worker (numpy): its greedy keeps a heap of all rows' bounds"
    if executor != "ray":
        return f"shard actors need the ray executor, not {executor}"
    if method == "windowed":
        return "method windowed runs its pools one after another over all rows; shards run spice or logdet"
    if method not in SHARDABLE:
        return f"method {method} is a fixed order (one pass over the rows, no greedy step to shard)"
    return None


def stage_device(device: str | None, gpus: float, budget: str = "records") -> str:
    """The select stage's device: ``select.device`` if set, else cuda when the worker has a GPU and the
    budget is in records (a token budget runs numpy), else numpy."""
    return device or ("cuda" if gpus > 0 and budget == "records" else "numpy")


def default_lazy(lazy: bool | None, device: str | None) -> bool:
    """The sharded path's lazy default: lazy unless a device other than numpy is named (``auto`` included)."""
    return (device in (None, "numpy")) if lazy is None else bool(lazy)
