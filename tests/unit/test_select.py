"""Greedy selection (SPICE, log-det, baselines) against a brute-force slogdet oracle; the selector actor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spice_ray.select import Selection, logdet_of, read_sketches, select
from spice_ray.testing import select_problem, write_sketches


def brute_force_select(sketches: np.ndarray, k: int, *, alpha: float, lam: float) -> list[int]:
    """Oracle: every step recomputes each candidate's log-det gain from scratch and its conflict
    from the explicit mean of the selected sketches, then takes the argmax (smallest index on ties)."""
    G = np.asarray(sketches, dtype=np.float64)
    n, d = G.shape
    picks: list[int] = []
    for _ in range(min(k, n)):
        F = G[picks].T @ G[picks] if picks else np.zeros((d, d))
        base = np.linalg.slogdet(np.eye(d) + alpha * F)[1]
        mean = G[picks].mean(axis=0) if picks else np.zeros(d)
        best, best_score = -1, -np.inf
        for i in range(n):
            if i in picks:
                continue
            gain = np.linalg.slogdet(np.eye(d) + alpha * (F + np.outer(G[i], G[i])))[1] - base
            ni, nm = np.linalg.norm(G[i]), np.linalg.norm(mean)
            conflict = max(0.0, -float(G[i] @ mean) / (ni * nm)) if ni > 0 and nm > 0 else 0.0
            score = gain - lam * conflict
            if score > best_score:
                best, best_score = i, score
        picks.append(best)
    return picks




@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0, 5.0])
def test_greedy_matches_brute_force(seed: int, lam: float) -> None:
    G = select_problem(seed)
    sel = select(G, 10, method="spice", alpha=1.0, lam=lam)
    assert sel.indices.tolist() == brute_force_select(G, 10, alpha=1.0, lam=lam)


@pytest.mark.parametrize("seed", [0, 1])
def test_logdet_method_is_spice_with_lambda_zero(seed: int) -> None:
    G = select_problem(seed)
    a = select(G, 10, method="logdet", lam=5.0)
    b = select(G, 10, method="spice", lam=0.0)
    assert a.indices.tolist() == b.indices.tolist() == brute_force_select(G, 10, alpha=1.0, lam=0.0)
    assert a.params["lam"] == 0.0 and np.allclose(a.scores, a.gains)


def test_conflict_changes_picks() -> None:
    differs = 0
    for seed in range(4):
        G = select_problem(seed)
        spice = select(G, 10, method="spice", lam=5.0)
        logdet = select(G, 10, method="logdet")
        differs += spice.indices.tolist() != logdet.indices.tolist()
        assert logdet.conflicts.max() > 0  # the log-det greedy does pick conflicting rows
        assert spice.conflicts.sum() <= logdet.conflicts.sum()
    assert differs >= 1


@pytest.mark.parametrize(
    ("n", "d", "k", "alpha"),
    [(12, 20, 8, 1.0), (12, 20, 12, 0.5), (30, 6, 15, 2.0), (25, 5, 25, 1.0)],
)
def test_shapes_n_below_d_and_k_above_d(n: int, d: int, k: int, alpha: float) -> None:
    # k < d uses the factored inverse, k >= d the dense one; both must match the oracle.
    G = select_problem(n + d + k, n=n, d=d, anti=3)
    for lam in (0.0, 1.0):
        sel = select(G, k, alpha=alpha, lam=lam)
        assert sel.indices.tolist() == brute_force_select(G, k, alpha=alpha, lam=lam)
        assert sel.logdet == pytest.approx(logdet_of(G, sel.indices, alpha), rel=1e-8)


@pytest.mark.parametrize("method", ["spice", "logdet", "random", "gradnorm", "less", "windowed"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_trace_is_consistent(method: str, dtype: type) -> None:
    G = select_problem(7, n=60, d=10).astype(dtype)
    alpha, lam = 0.7, 0.3
    target = select_problem(8, n=8, d=10, anti=2)
    sel = select(G, 15, method=method, alpha=alpha, lam=lam, seed=3, target=target, pool_size=20)
    assert isinstance(sel, Selection) and sel.indices.dtype == np.int64
    assert len(set(sel.indices.tolist())) == len(sel) == 15
    assert sel.logdet == pytest.approx(logdet_of(G, sel.indices, alpha), rel=1e-8)
    # running log-dets are the direct log-dets of the prefixes, and increase
    for t in (0, 4, 14):
        assert sel.logdets[t] == pytest.approx(logdet_of(G, sel.indices[: t + 1], alpha), rel=1e-8)
    assert np.all(np.diff(sel.logdets) > 0)
    g64 = G.astype(np.float64)[sel.indices]
    assert np.allclose(sel.bases, np.log1p(alpha * (g64 * g64).sum(1)))
    assert np.all(sel.gains <= sel.bases + 1e-12) and sel.conflicts[0] == 0.0
    assert np.all((sel.conflicts >= 0) & (sel.conflicts <= 1))
    assert np.allclose(sel.scores, sel.gains - sel.params["lam"] * sel.conflicts)
    # conflicts against the explicit mean of the earlier picks
    for t in (3, 9):
        mean = g64[:t].mean(0)
        cos = g64[t] @ mean / (np.linalg.norm(g64[t]) * np.linalg.norm(mean))
        assert sel.conflicts[t] == pytest.approx(max(0.0, -cos), abs=1e-6)
    s = sel.summary()
    assert s["k_selected"] == 15 and s["n_candidates"] == 60 and s["method"] == method
    assert s["logdet"] == sel.logdet and s["stop_reason"] == "budget"
    json.dumps(s)


def test_logdet_gains_are_non_increasing() -> None:
    for seed in range(3):
        sel = select(select_problem(seed, n=80, d=12), 40, method="logdet")
        assert np.all(np.diff(sel.gains) <= 1e-12)


def test_early_stop() -> None:
    # Three orthogonal directions with decreasing norms: gains log(1+9), log(1+4), log(1+1), log(1+0.25)
    G = np.diag([3.0, 2.0, 1.0, 0.5])
    gains = np.log1p(np.array([9.0, 4.0, 1.0, 0.25]))
    omega = 0.4  # log(5)/log(10) = 0.70 > ω; log(2)/log(10) = 0.30 ≤ ω: stop before the third
    sel = select(G, 4, method="logdet", omega=omega)
    assert sel.stop_reason == "early_stop"
    assert sel.indices.tolist() == [0, 1]
    assert np.allclose(sel.gains, gains[:2])
    assert sel.summary()["omega"] == omega and sel.summary()["k_selected"] == 2
    # ω below every ratio: runs to the budget / exhausts the candidates
    assert select(G, 3, omega=0.05).stop_reason == "budget"
    assert select(G, 4, omega=0.05).stop_reason == "exhausted"
    # exactly at the threshold stops too (Δ ≤ ω Δ_first)
    at = select(G, 4, omega=float(gains[1] / gains[0]) + 1e-12)
    assert at.indices.tolist() == [0] and at.stop_reason == "early_stop"


def test_budget_exhausted() -> None:
    G = select_problem(0, n=9, d=4)
    target = select_problem(5, n=3, d=4, anti=1)
    for method in ("spice", "logdet", "random", "gradnorm", "less", "windowed"):
        sel = select(G, 20, method=method, target=target, pool_size=4)
        assert sel.stop_reason == "exhausted" and sorted(sel.indices.tolist()) == list(range(9))
        assert sel.summary()["k_requested"] == 20 and sel.summary()["k_selected"] == 9
    assert select(G, 9).stop_reason == "exhausted"
    assert select(G, 8).stop_reason == "budget"
    empty = select(G, 0)
    assert len(empty) == 0 and empty.logdet == 0.0 and empty.summary()["mean_gain"] == 0.0


def test_ties_pick_smallest_index() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    G = np.concatenate([base, base, base])  # rows i, i+4, i+8 identical
    for method, lam in (("logdet", 0.0), ("spice", 1.0)):
        sel = select(G, 8, method=method, lam=lam)
        assert sel.indices.tolist() == brute_force_select(G, 8, alpha=1.0, lam=lam)
        for t, i in enumerate(sel.indices.tolist()):  # a copy is taken only after its earlier twins
            assert all(j in sel.indices[:t] for j in range(i % 4, i, 4))
    # all-equal rows: the first pick is row 0, the second its first duplicate
    same = np.tile(rng.normal(size=(1, 5)), (6, 1))
    assert select(same, 2).indices.tolist() == [0, 1]
    assert select(same, 3, method="gradnorm").indices.tolist() == [0, 1, 2]


def test_random_is_seeded() -> None:
    G = select_problem(0)
    a = select(G, 10, method="random", seed=5)
    b = select(G, 10, method="random", seed=5)
    c = select(G, 10, method="random", seed=6)
    assert a.indices.tolist() == b.indices.tolist() != c.indices.tolist()
    assert a.indices.tolist() == np.random.default_rng(5).permutation(40)[:10].tolist()
    assert a.stop_reason == "budget" and a.params["seed"] == 5


def test_gradnorm_picks_largest_norms() -> None:
    G = select_problem(1)
    sel = select(G, 10, method="gradnorm")
    norms = np.linalg.norm(G, axis=1)
    assert sel.indices.tolist() == np.argsort(-norms, kind="stable")[:10].tolist()
    assert np.all(np.diff(norms[sel.indices]) <= 0)
    assert norms[sel.indices].min() >= np.delete(norms, sel.indices).max()


def test_longest_picks_most_loss_tokens_without_looking_at_gradients() -> None:
    G = select_problem(1, n=30)
    lengths = np.array([5, 40, 7, 40, 1] * 6)
    sel = select(G, 7, method="longest", lengths=lengths)
    assert sel.indices.tolist() == [1, 3, 6, 8, 11, 13, 16]  # 40s first, ties by index
    assert select(G[::-1].copy(), 7, method="longest", lengths=lengths).indices.tolist() == sel.indices.tolist()
    assert len(sel.gains) == 7 and np.isfinite(sel.logdets).all()  # the same trace as every method
    with pytest.raises(ValueError, match="loss tokens"):
        select(G, 7, method="longest")


def test_zero_rows_do_not_produce_nan() -> None:
    G = select_problem(2, n=20, d=5)
    G[[0, 3, 7]] = 0.0
    for method in ("spice", "logdet", "random", "gradnorm"):
        sel = select(G, 20, method=method, lam=1.0)
        for arr in (sel.gains, sel.bases, sel.conflicts, sel.scores, sel.logdets):
            assert np.isfinite(arr).all()
        assert sel.logdet == pytest.approx(logdet_of(G, sel.indices), rel=1e-8)
    zeros = select(np.zeros((5, 3)), 3, lam=1.0)
    assert zeros.indices.tolist() == [0, 1, 2] and zeros.logdet == 0.0
    assert not np.any(zeros.conflicts)
    # a selected set whose mean is exactly zero gives conflict 0, not NaN
    v = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert np.isfinite(select(v, 3, lam=1.0).conflicts).all()


def test_bad_arguments() -> None:
    G = select_problem(0)
    with pytest.raises(ValueError, match="unknown selection method"):
        select(G, 3, method="nope")
    with pytest.raises(ValueError):
        select(G, -1)
    with pytest.raises(ValueError):
        select(G[0], 3)
    with pytest.raises(ValueError, match="NaN"):
        select(np.full((3, 2), np.nan), 1)


def test_progress_bar_runs() -> None:
    sel = select(select_problem(0), 5, progress=True)
    assert len(sel) == 5


def test_read_sketches_sorts_and_handles_list_types(tmp_path) -> None:
    rng = np.random.default_rng(0)
    G = rng.normal(size=(30, 6)).astype(np.float32)
    uids = [f"u{i:03d}" for i in rng.permutation(30)]
    order = np.argsort(uids)
    d1 = tmp_path / "dir"
    d1.mkdir()
    write_sketches(d1 / "part-0.parquet", uids[:17], G[:17])
    write_sketches(d1 / "part-1.parquet", uids[17:], G[17:], fixed=False)
    (d1 / "manifest.json").write_text("{}")  # non-parquet files in the folder are ignored
    got_uids, got = read_sketches(str(d1))
    assert got.dtype == np.float32 and got.shape == (30, 6)
    assert got_uids.tolist() == sorted(uids)
    assert np.array_equal(got, G[order])
    # float16 sketches in a single file
    write_sketches(tmp_path / "h.parquet", uids, G.astype(np.float16))
    _, half = read_sketches(str(tmp_path / "h.parquet"))
    assert half.dtype == np.float32 and np.array_equal(half, G.astype(np.float16)[order].astype(np.float32))
    write_sketches(tmp_path / "dup.parquet", uids[:3] + uids[:1], G[:4])
    with pytest.raises(ValueError, match="duplicate"):
        read_sketches(str(tmp_path / "dup.parquet"))


