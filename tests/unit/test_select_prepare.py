"""What the selection sees of the sketches (scaling, α auto, per-source quotas), the paper's
candidate-level diagnostics against brute force, and the holdout split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from spice_ray.select import select
from spice_ray.select.diagnostics import (
    candidate_diagnostics,
    candidate_scores,
    spearman,
)
from spice_ray.select.prepare import quotas, resolve_alpha, scale_sketches


def _problem(n: int = 240, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.05, 1.5, size=(n, 1))).astype(np.float32)


def test_scalings_and_auto_alpha() -> None:
    G = _problem()
    tokens = np.arange(1, len(G) + 1)
    unit = scale_sketches(G, None, "unit")
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    summed = scale_sketches(G, tokens, "tokens")
    assert np.allclose(summed, G * (tokens / tokens.mean())[:, None], rtol=1e-5)
    root = scale_sketches(G, tokens, "sqrt_tokens")
    assert np.allclose(root, G * (np.sqrt(tokens) / np.sqrt(tokens).mean())[:, None], rtol=1e-5)
    assert scale_sketches(G, None, "none") is G
    with pytest.raises(ValueError, match="n_loss_tokens"):
        scale_sketches(G, None, "tokens")
    alpha = resolve_alpha(G, "auto")
    assert np.median(alpha * (G.astype(np.float64) ** 2).sum(axis=1)) == pytest.approx(1.0)
    assert resolve_alpha(G, 2.5) == 2.5


def test_quotas_largest_remainder() -> None:
    assert quotas(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 3, 10) == {"a": 5, "b": 3, "c": 2, "d": 0}
    assert quotas(["a"] * 2 + ["b"] * 8, 10) == {"a": 2, "b": 8}  # never above a group's size
    assert sum(quotas(["x"] * 7 + ["y"] * 7 + ["z"] * 7, 10).values()) == 10


def _brute_quota_greedy(G: np.ndarray, groups: np.ndarray, k: int, alpha: float, lam: float) -> list[int]:
    """The joint greedy under per-group quotas, one float64 solve per candidate per step."""
    q = quotas([str(g) for g in groups.tolist()], k)
    picked: list[int] = []
    X = G.astype(np.float64)
    for _ in range(k):
        M = np.eye(G.shape[1]) + alpha * X[picked].T @ X[picked]
        mean = X[picked].mean(axis=0) if picked else None
        best, best_score = None, -np.inf
        for i in range(len(G)):
            if i in picked or q[str(groups[i])] == sum(str(groups[j]) == str(groups[i]) for j in picked):
                continue
            gain = np.log1p(alpha * X[i] @ np.linalg.solve(M, X[i]))
            conflict = 0.0
            if mean is not None and np.linalg.norm(mean) > 0 and np.linalg.norm(X[i]) > 0:
                conflict = max(0.0, -float(X[i] @ mean) / (np.linalg.norm(X[i]) * np.linalg.norm(mean)))
            score = gain - lam * conflict
            if score > best_score + 1e-12:
                best, best_score = i, score
        picked.append(best)
    return picked


@pytest.mark.parametrize("lazy", [True, False])
def test_quota_greedy_matches_brute_force(lazy: bool) -> None:
    G = _problem(n=90, d=6, seed=3)
    groups = np.array(["p3"] * 50 + ["dolly"] * 25 + ["gsm8k"] * 15, dtype=object)
    sel = select(G, 12, method="spice", alpha=2.0, lam=0.3, groups=groups, lazy=lazy)
    assert sel.indices.tolist() == _brute_quota_greedy(G, groups, 12, 2.0, 0.3)
    assert Counter(groups[sel.indices].tolist()) == Counter(quotas(groups.tolist(), 12))
    for method in ("random", "gradnorm"):
        fixed = select(G, 12, method=method, groups=groups)
        assert Counter(groups[fixed.indices].tolist()) == Counter(quotas(groups.tolist(), 12))
    top = select(G, 90, method="gradnorm").indices.tolist()  # gradnorm within a group keeps its order
    got = select(G, 12, method="gradnorm", groups=groups).indices.tolist()
    assert got == [i for i in top if i in set(got)]


def test_candidate_diagnostics_match_brute_force() -> None:
    G = _problem(n=80, d=5, seed=7)
    alpha = 1.5
    sel = select(G, 10, method="spice", alpha=alpha, lam=0.2)
    diag = candidate_diagnostics(G, sel.indices, sel.gains, alpha, steps=[3, 7])
    X = G.astype(np.float64)
    for entry in diag["candidate_steps"]:
        S = sel.indices[: entry["step"]].tolist()
        M = np.eye(5) + alpha * X[S].T @ X[S]
        mean = X[S].mean(axis=0)
        free = [i for i in range(80) if i not in S]
        gain = np.array([np.log1p(alpha * X[i] @ np.linalg.solve(M, X[i])) for i in free])
        base = np.array([np.log1p(alpha * X[i] @ X[i]) for i in free])
        cos = np.array([X[i] @ mean / (np.linalg.norm(X[i]) * np.linalg.norm(mean)) for i in free])
        conflict = np.maximum(0.0, -cos)
        assert entry["candidates"] == len(free)
        assert entry["rho_conflict_gain"] == pytest.approx(spearman(conflict, gain))
        assert entry["rho_conflict_abs_eps"] == pytest.approx(spearman(conflict, np.abs(gain - base)))
    scores = candidate_scores(G, sel.indices[:4], alpha)
    assert scores["gain"][sel.indices[4]] == pytest.approx(sel.gains[4], rel=1e-9)
    halving = diag["gain_halving_step"]
    assert halving is None or (sel.gains[halving] <= sel.gains[0] / 2 and (sel.gains[:halving] > sel.gains[0] / 2).all())


def test_holdout_split_is_stable_disjoint_and_proportional() -> None:
    from spice_ray.corpus.split import split_records

    uids = [f"{i:06d}" for i in range(4000)]
    sources = ["a" if i % 4 else "b" for i in range(4000)]
    table = pa.table({"uid": uids, "source": sources})
    split = split_records(table, seed=0, validation=0.05, test=0.1, pool_fraction=0.5)
    parts = {name: set(t.column("uid").to_pylist()) for name, t in split.tables.items()}
    assert sum(len(p) for p in parts.values()) == 4000
    assert all(not (parts[a] & parts[b]) for a in parts for b in parts if a < b)
    assert abs(split.counts["test"] - 400) < 60 and abs(split.counts["validation"] - 200) < 45
    assert abs(split.counts["pool"] - 0.85 * 0.5 * 4000) < 120
    assert abs(split.sources["test"]["b"] / split.counts["test"] - 0.25) < 0.06  # each source in proportion
    # stable: a grown, reordered corpus puts every old record in the same split
    grown = pa.table({"uid": uids[::-1] + [f"new{i}" for i in range(500)], "source": sources[::-1] + ["c"] * 500})
    again = split_records(grown, seed=0, validation=0.05, test=0.1, pool_fraction=0.5)
    for name, members in parts.items():
        assert members <= set(again.tables[name].column("uid").to_pylist())
    other_seed = split_records(table, seed=1, validation=0.05, test=0.1, pool_fraction=0.5)
    assert set(other_seed.tables["test"].column("uid").to_pylist()) != parts["test"]


# ----------------------------------------------------------------------------- sharded preparation
@pytest.mark.parametrize(
    "scale,alpha,quota,method,lazy",
    [
        ("tokens", "auto", False, "spice", True),  # the default config
        ("sqrt_tokens", "auto", True, "spice", True),
        ("unit", 0.7, True, "logdet", False),
        ("none", "auto", False, "spice", False),
    ],
)
def test_sharded_workers_pick_as_one_worker(scale: str, alpha: float | str, quota: bool, method: str, lazy: bool) -> None:
    """The Ray shard actors' logic in-process: each worker scales its slice (global token factors),
    α auto comes from all workers' norms, quotas count per source across workers — the picks, gains
    and α are the single worker's (:func:`select_to_dir`'s preparation) on the same sketches."""
    from spice_ray.select.sharding import local_call, local_workers, select_over_workers

    rng = np.random.default_rng(3)
    G = _problem(n=301, d=10, seed=3)
    G[:70] += 0.6 * G[0]  # a shared direction: conflicts matter
    tokens = rng.integers(5, 400, size=len(G))
    groups = np.asarray([["web", "code", "chat"][i % 3] for i in range(len(G))], dtype=object) if quota else None
    k = 45
    scaled = scale_sketches(G, tokens, scale)
    single = select(scaled, k, method=method, alpha=resolve_alpha(scaled, alpha), lam=0.3, lazy=lazy, groups=groups)
    for n_shards in (2, 3):
        workers = local_workers(G, n_shards, scale=scale, loss_tokens=tokens, groups=groups)
        sel = select_over_workers(
            local_call(workers), k, method=method, alpha=alpha, lam=0.3, lazy=lazy, groups=groups
        )
        assert sel.indices.tolist() == single.indices.tolist()
        assert np.array_equal(sel.gains, single.gains) and sel.params["alpha"] == single.params["alpha"]
        assert sel.stats["shards"] == n_shards
    if groups is not None:
        assert Counter(groups[sel.indices].tolist()) == {"web": 15, "code": 15, "chat": 15}


def test_shard_refusals_say_why() -> None:
    from spice_ray.select.sharding import refusal

    assert refusal("spice", "ray") is None and refusal("logdet", "ray") is None
    assert "ray executor" in refusal("spice", "local")
    assert "windowed" in refusal("windowed", "ray")
    assert "fixed order" in refusal("random", "ray")
