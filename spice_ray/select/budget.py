"""Selection under a budget in tokens (``select.budget: tokens``): what a GPU hour buys.

Pure numpy, no Ray. Each row costs its loss tokens (at least 1); the picks' costs add up to at most
``max_cost``.

- Fixed orders (random, gradnorm, longest, less) walk their order and keep every row that still
  fits (:func:`fit_in_order`).
- The greedy methods (spice, logdet) run :func:`cost_greedy` twice: the **cost-benefit** greedy
  (each step takes the fitting row with the largest score per token) and the **unit-cost** greedy
  (the largest score among the rows that fit), both to the same budget, and keep the run whose
  objective — the sum of its step scores, i.e. ``log det(I + α Σ g gᵀ)`` minus λ × the conflicts —
  is larger (:func:`budget_greedy`). For ``logdet`` (λ = 0) the objective is monotone submodular
  and the better of the two runs is within (1 − 1/e)/2 of the best subset that fits (Khuller, Moss
  & Naor 1999; Leskovec et al. 2007, CELF). With λ > 0 the conflict term is not submodular and no
  such guarantee holds.

Both runs are *lazy* and exact: a row's gain only shrinks as the selected set grows (log det is
submodular) and its score is its gain minus a non-negative conflict, so a gain computed earlier
bounds the row's score (and score per token) at every later step. Each step pops the rows with the
largest bounds in batches, scores them canonically (:meth:`SelectedState.exact`, the same per-row
values every engine decides by) and stops once the best fresh value beats every remaining bound
(ties to the smallest index), so the picks are those of the eager greedy that scores every fitting
row at every step (:func:`eager_cost_greedy`, the reference the tests compare against).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from spice_ray.select.state import SelectedState

BATCH = 64  # rows scored per pop while looking for a step's winner
_SLACK = 1e-9  # relative slack on stored bounds: canonical gains may round up by an ulp as S grows


@dataclass
class BudgetRun:
    picks: list[int]
    objective: float  # Σ of the step scores (log det − λ Σ conflicts)
    cost: float
    rule: str  # "per-token" | "unit-cost"
    scored: int = 0  # rows scored canonically (the lazy work)


def as_costs(costs: np.ndarray, n: int) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (n,) or not np.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"costs must be {n} finite values >= 0")
    return np.maximum(c, 1.0)  # a row with no loss token still takes a slot: it costs one


def fit_in_order(order: np.ndarray, costs: np.ndarray, max_cost: float) -> np.ndarray:
    """The rows of ``order`` that fit, taken in order (a row that no longer fits is skipped)."""
    left, out = float(max_cost), []
    for i in np.asarray(order, dtype=np.int64).tolist():
        if costs[i] <= left:
            out.append(i)
            left -= costs[i]
    return np.asarray(out, dtype=np.int64)


def _max_picks(costs: np.ndarray, max_cost: float) -> int:
    """The most rows any subset within budget can hold (the cheapest ones): the state's capacity."""
    return int(np.searchsorted(np.cumsum(np.sort(costs)), max_cost, side="right"))


def _value(score: np.ndarray, costs: np.ndarray, per_cost: bool) -> np.ndarray:
    return score / costs if per_cost else score


def cost_greedy(G: np.ndarray, costs: np.ndarray, max_cost: float, *, alpha: float, lam: float, per_cost: bool) -> BudgetRun:
    """The lazy greedy to ``max_cost``: per token (``per_cost``) or per row; exact (see the module)."""
    n, d = G.shape
    state = SelectedState(d, max(1, _max_picks(costs, max_cost)), alpha, lam)
    gain = np.empty(n, dtype=np.float64)
    for a in range(0, n, 1 << 14):
        gain[a : a + (1 << 14)] = state.exact(G[a : a + (1 << 14)])["gain"]
    bound = _value(gain, costs, per_cost) * (1 + _SLACK) + _SLACK
    heap = [(-float(b), i) for i, b in enumerate(bound.tolist())]
    heapq.heapify(heap)
    left, picks, objective, scored = float(max_cost), [], 0.0, n
    while True:
        best, popped = None, []  # best: (value, index, canonical values)
        while heap:
            top_bound, top_i = -heap[0][0], heap[0][1]
            if best is not None and (top_bound < best[0] or (top_bound == best[0] and top_i > best[1])):
                break
            batch = []
            while heap and len(batch) < BATCH:
                b, i = heapq.heappop(heap)
                if costs[i] <= left:  # a row that no longer fits never will: dropped for good
                    batch.append(i)
            if not batch:
                continue
            batch.sort()
            ex = state.exact(G[batch])
            scored += len(batch)
            values = _value(ex["score"], costs[batch], per_cost)
            for j, i in enumerate(batch):
                popped.append((i, float(ex["gain"][j])))
                if best is None or values[j] > best[0] or (values[j] == best[0] and i < best[1]):
                    best = (float(values[j]), i, {k: v[j] for k, v in ex.items()})
        if best is None:
            break
        _, i, w = best
        state.add(w["u"], G[i], float(w["q"]))
        picks.append(i)
        objective += float(w["score"])
        left -= costs[i]
        for j, g in popped:
            if j != i and costs[j] <= left:
                heapq.heappush(heap, (-(_value(np.array(g), costs[j], per_cost) * (1 + _SLACK) + _SLACK), j))
    return BudgetRun(picks, objective, float(max_cost) - left, "per-token" if per_cost else "unit-cost", scored)


def eager_cost_greedy(G: np.ndarray, costs: np.ndarray, max_cost: float, *, alpha: float, lam: float, per_cost: bool) -> list[int]:
    """The reference: every fitting row scored at every step (O(N) rows a step), ties to the smallest index."""
    n, d = G.shape
    state = SelectedState(d, max(1, _max_picks(costs, max_cost)), alpha, lam)
    left, picks = float(max_cost), []
    while True:
        fit = np.flatnonzero(costs <= left)
        fit = fit[~np.isin(fit, picks)]
        if fit.size == 0:
            return picks
        ex = state.exact(G[fit])
        j = int(np.argmax(_value(ex["score"], costs[fit], per_cost)))
        i = int(fit[j])
        state.add(ex["u"][j], G[i], float(ex["q"][j]))
        picks.append(i)
        left -= costs[i]


def budget_greedy(G: np.ndarray, costs: np.ndarray, max_cost: float, *, alpha: float, lam: float) -> tuple[BudgetRun, BudgetRun]:
    """(the kept run, the other): the per-token and the unit-cost greedy to ``max_cost``, the larger objective kept
    (ties: per-token)."""
    G = np.ascontiguousarray(G, dtype=np.float64)
    per_token = cost_greedy(G, costs, max_cost, alpha=alpha, lam=lam, per_cost=True)
    unit = cost_greedy(G, costs, max_cost, alpha=alpha, lam=lam, per_cost=False)
    return (per_token, unit) if per_token.objective >= unit.objective else (unit, per_token)
