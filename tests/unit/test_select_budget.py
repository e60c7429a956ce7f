"""Selection under a budget in tokens (spice_ray/select/budget.py): exact lazy greedy, checked against
the eager greedy and, on small instances, against every subset that fits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from spice_ray.config import SelectConfig
from spice_ray.select import logdet_of, select
from spice_ray.select import budget as budget_module
from spice_ray.select.budget import as_costs, budget_greedy, cost_greedy, eager_cost_greedy, fit_in_order


def _problem(seed: int, n: int = 40, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d)) * rng.lognormal(sigma=0.7, size=(n, 1))
    G[: n // 4] += 2.0 * rng.normal(size=d)  # a shared direction: conflicts are real
    G[5] = G[3]  # a duplicate
    G[7] = 0.0  # a zero row
    costs = rng.integers(1, 30, size=n).astype(np.float64)
    return G, costs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("per_cost", [True, False])
def test_lazy_budget_greedy_makes_the_eager_picks(seed, lam, per_cost, monkeypatch):
    monkeypatch.setattr(budget_module, "BATCH", 3)  # many pops per step, so the stopping rule decides
    G, costs = _problem(seed)
    budget = 0.3 * costs.sum()
    lazy = cost_greedy(G, costs, budget, alpha=0.5, lam=lam, per_cost=per_cost)
    assert lazy.picks == eager_cost_greedy(G, costs, budget, alpha=0.5, lam=lam, per_cost=per_cost)
    assert lazy.cost == pytest.approx(costs[lazy.picks].sum()) and lazy.cost <= budget
    assert not (costs[np.setdiff1d(np.arange(len(G)), lazy.picks)] <= budget - lazy.cost).any(), "stops only when nothing fits"
    assert lazy.scored < len(G) * len(lazy.picks), "lazy: fewer rows scored than the eager pass"


@pytest.mark.parametrize("seed", range(8))
def test_the_kept_run_is_within_the_knapsack_guarantee_of_the_best_subset(seed):
    """log det (λ = 0) under a budget: max(per-token, unit-cost) ≥ (1 − 1/e)/2 × the best subset that fits."""
    G, costs = _problem(100 + seed, n=10, d=4)
    budget = 0.35 * costs.sum()
    best = max(logdet_of(G, list(s), alpha=0.5) for r in range(len(G) + 1) for s in itertools.combinations(range(len(G)), r)
               if costs[list(s)].sum() <= budget)
    kept, other = budget_greedy(G, costs, budget, alpha=0.5, lam=0.0)
    assert kept.objective == pytest.approx(logdet_of(G, kept.picks, alpha=0.5), rel=1e-9)
    assert kept.objective >= other.objective
    assert kept.objective >= (1 - 1 / math.e) / 2 * best - 1e-12
    assert kept.objective <= best + 1e-9


def test_per_token_and_unit_cost_differ_where_they_should():
    """A long record with the largest gain against short ones with nearly as much: unit cost takes the
    long one, per token the short ones; the larger objective is kept."""
    G = np.array([[3.0, 0, 0, 0], [0, 2.9, 0, 0], [0, 0, 2.9, 0], [0, 0, 0, 2.9]])
    costs = np.array([30.0, 10.0, 10.0, 10.0])
    assert cost_greedy(G, costs, 30, alpha=1.0, lam=0.0, per_cost=False).picks[0] == 0
    kept, other = budget_greedy(G, costs, 30, alpha=1.0, lam=0.0)
    assert (kept.rule, sorted(kept.picks)) == ("per-token", [1, 2, 3]) and other.rule == "unit-cost"


def test_fixed_orders_keep_what_fits_in_their_order():
    assert fit_in_order(np.array([0, 1, 2, 3]), np.array([5.0, 10.0, 3.0, 1.0]), 9).tolist() == [0, 2, 3]
    assert fit_in_order(np.array([1, 0]), np.array([5.0, 10.0]), 4).tolist() == []
    assert as_costs(np.array([0, 3]), 2).tolist() == [1.0, 3.0], "a row without loss tokens still costs one"
    with pytest.raises(ValueError):
        as_costs(np.array([1.0, -1.0]), 2)


@pytest.mark.parametrize("method", ["random", "gradnorm", "longest", "spice", "logdet"])
def test_select_under_a_token_budget(method):
    G, costs = _problem(7, n=60)
    budget = 0.2 * costs.sum()
    sel = select(G, 3, method=method, lam=0.2, alpha=0.5, costs=costs, max_cost=budget, lengths=costs)
    assert costs[sel.indices].sum() <= budget and len(sel) > 3, "the budget, not k, ends the run"
    assert len(set(sel.indices.tolist())) == len(sel)
    info = sel.summary()["budget"]
    assert info["max_cost"] == budget and info["cost"] == pytest.approx(costs[sel.indices].sum())
    if method in ("spice", "logdet"):
        assert sel.scores.sum() == pytest.approx(info["objective"]) and info["other_rule"]["rule"] != info["rule"]
    if method == "longest":  # the longest rows, as many as fit
        assert sel.indices.tolist() == fit_in_order(np.argsort(-costs, kind="stable"), costs, budget).tolist()


def test_budget_refusals_are_one_line():
    G, costs = _problem(1)
    for kwargs, word in [({"method": "windowed"}, "windowed"), ({"groups": np.array(["a", "b"] * 20)}, "quotas"),
                         ({"omega": 0.5}, "omega"), ({"device": "cpu"}, "device"), ({"costs": None}, "cost")]:
        with pytest.raises(ValueError, match=word):
            select(G, 5, **({"costs": costs, "max_cost": 50.0} | kwargs))
    with pytest.raises(ValueError, match="does not combine with quota: source"):
        SelectConfig(budget="tokens", quota="source")
    assert SelectConfig(budget="tokens", fraction=0.1).max_tokens(12345) == 1234
    assert SelectConfig(budget="tokens", k=500).max_tokens(300) == 300
