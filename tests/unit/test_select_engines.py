"""Selection at scale: eager vs lazy vs torch vs shards, checkpoint/resume, windowed, LESS, diagnostics.

Every engine must make *identical* picks (ties to the smallest index), and all must equal a
brute-force slogdet oracle on problems small enough to brute-force.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.select import (
    CandidateShard,
    LocalShards,
    PickCheckpoint,
    SelectedState,
    logdet_of,
    pool_quotas,
    read_sketches,
    select,
    select_shards,
)
from spice_ray.select.diagnostics import (
    cross_energy,
    curvature,
    leave_one_out_gains,
    spearman,
)
from spice_ray.select.io import read_sketch_uids
from spice_ray.testing import sketch_like


def oracle(
    G: np.ndarray, k: int, *, alpha: float, lam: float, candidates=None, picks=None
) -> list[int]:
    """Brute force: each step recomputes every candidate's log-det gain by slogdet and its conflict
    from the explicit mean of the selected rows; argmax, ties to the smallest index. ``candidates``
    restricts the ground set (ascending); ``picks`` is a selected set to start from."""
    G = np.asarray(G, dtype=np.float64)
    n, d = G.shape
    picks = list(picks or [])
    cands = list(range(n)) if candidates is None else sorted(candidates)
    new: list[int] = []
    for _ in range(k):
        S = picks + new
        F = G[S].T @ G[S] if S else np.zeros((d, d))
        base = np.linalg.slogdet(np.eye(d) + alpha * F)[1]
        mean = G[S].mean(axis=0) if S else np.zeros(d)
        best, best_score = -1, -np.inf
        for i in cands:
            if i in S:
                continue
            gain = np.linalg.slogdet(np.eye(d) + alpha * (F + np.outer(G[i], G[i])))[1] - base
            ni, nm = np.linalg.norm(G[i]), np.linalg.norm(mean)
            conflict = max(0.0, -float(G[i] @ mean) / (ni * nm)) if ni > 0 and nm > 0 else 0.0
            if gain - lam * conflict > best_score:
                best, best_score = i, gain - lam * conflict
        if best < 0:
            break
        new.append(best)
    return new


def tie_problem(seed: int, n: int = 48, d: int = 6) -> np.ndarray:
    """Many exact ties: duplicated rows, negated rows (tie for λ = 0), zero rows."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 4, d)) * rng.uniform(0.5, 2.0, size=(n // 4, 1))
    G = np.concatenate([base, base[::-1], -base, base])[:n]
    G[rng.choice(n, size=3, replace=False)] = 0.0
    return G[rng.permutation(n)]


ENGINES = [
    {"lazy": False, "device": "numpy"},
    {"lazy": True},
    {"lazy": False, "device": "cpu"},  # the torch path, on the CPU
]


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_sketch_like_matches_brute_force(seed: int, lam: float) -> None:
    G = sketch_like(seed, n=50, d=12)
    want = oracle(G, 14, alpha=1.0, lam=lam)  # k ≥ d: the dense M⁻¹
    for eng in ENGINES:
        assert select(G, 14, lam=lam, **eng).indices.tolist() == want, eng
    want_f = oracle(G, 8, alpha=0.5, lam=lam)  # k < d: the factored M⁻¹
    assert select(G, 8, alpha=0.5, lam=lam, lazy=True).indices.tolist() == want_f


def test_lazy_eager_torch_identical_many_seeds() -> None:
    mismatches = []
    for seed in range(24):
        G = sketch_like(seed, n=70, d=8, dup=6, zeros=3) if seed % 2 else tie_problem(seed)
        if seed % 3 == 0:
            G = G.astype(np.float64)
        lam = (0.0, 0.1, 1.0)[seed % 3]
        k = (5, 20, 40)[seed % 3]  # factored, dense, and past d
        picks = [select(G, k, lam=lam, alpha=0.8, **eng).indices.tolist() for eng in ENGINES]
        if not picks[0] == picks[1] == picks[2]:
            mismatches.append((seed, picks))
    assert not mismatches


def test_ties_follow_the_oracle() -> None:
    for seed in range(3):
        G = tie_problem(seed, n=24, d=4)
        for lam in (0.0, 1.0):
            want = oracle(G, 10, alpha=1.0, lam=lam)
            for eng in ENGINES:
                assert select(G, 10, lam=lam, **eng).indices.tolist() == want, (seed, lam, eng)


def test_canonical_scores_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(0)
    for k in (3, 40):  # factored, dense
        st = SelectedState(16, k, alpha=0.7, lam=0.3)
        G = rng.normal(size=(30, 16))
        for i in range(3):
            w = st.winner(G[[i]], np.array([i]))
            st.add(w.u, w.g, w.q)
        full = st.exact(G)
        for a, b in ((0, 1), (5, 9), (11, 30)):
            part = st.exact(G[a:b].copy())
            for key in ("u", "q", "score"):
                assert np.array_equal(part[key], full[key][a:b])
        gain, conflict, score = st.fresh(G)  # BLAS approximation: within the margin
        assert np.abs(score - full["score"]).max() <= st.margin(float((G * G).sum(1).max()), 2.0**-53)


def test_eager_blocks_over_threads_and_replay_blocks() -> None:
    from spice_ray.select.engines import EagerNumpy

    G = sketch_like(16, n=1000, d=12)
    want = select(G, 90, lam=0.3, lazy=True).indices.tolist()
    shard = CandidateShard(G, alpha=1.0, lam=0.3, max_updates=90)
    shard.engine = EagerNumpy(shard.G, shard.indices, shard.state, chunk=64, threads=3)
    assert select_shards(LocalShards([shard]), 90, alpha=1.0, lam=0.3).indices.tolist() == want
    # many pending updates at once (a resume) are applied in blocks of products
    shard = CandidateShard(G, alpha=1.0, lam=0.3, max_updates=90)
    shard.engine = EagerNumpy(shard.G, shard.indices, shard.state, chunk=100, threads=2)
    for i in want[:80]:
        w = shard.exact(i)
        shard.update(w.u, w.g, w.q, w.index)
    assert [shard.best().index] == want[80:81]


def test_lazy_scores_fewer_rows_than_eager() -> None:
    G = sketch_like(3, n=3000, d=16, dup=0, zeros=0)
    eager = select(G, 60, lam=0.1, lazy=False)
    lazy = select(G, 60, lam=0.1, lazy=True)
    assert lazy.indices.tolist() == eager.indices.tolist()
    assert lazy.stats["scored"] < eager.stats["scored"] / 5


@pytest.mark.parametrize("size,grow_below", [(4, 0), (8, 64), (64, 4)])
def test_lazy_frontier_rebuilds_keep_eager_picks(size: int, grow_below: int) -> None:
    """A frontier far smaller than N, rebuilt many times (growing, or never): the picks stay the eager
    engine's, with conflicts active (λ = 0.3), duplicates, zero rows and ties."""
    from spice_ray.select.engines import LazyEngine

    for seed, (n, d, k) in enumerate(((600, 8, 120), (400, 24, 200), (300, 6, 300))):
        G = sketch_like(seed, n=n, d=d, dup=8, zeros=3)
        G[: n // 4] += 0.5 * G[0]  # a shared direction in a quarter of the rows: real conflicts
        eager = select(G, k, lam=0.3, alpha=0.7, lazy=False).indices.tolist()
        shard = CandidateShard(G, alpha=0.7, lam=0.3, max_updates=k, lazy=True)
        shard.engine = LazyEngine(shard.G, shard.indices, shard.state, size=size, grow_below=grow_below)
        picks = []
        for _ in range(k):
            w = shard.best()
            picks.append(w.index)
            shard.update(w.u, w.g, w.q, w.index)
        assert picks == eager
        assert shard.best() is None or k < n
        assert shard.engine.rebuilds > 1


# ------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("n_shards", [2, 3])
def test_local_shards_equal_single(n_shards: int) -> None:
    for seed, lam in ((0, 0.0), (1, 0.3), (2, 1.0)):
        G = sketch_like(seed, n=90, d=10, dup=6)
        k = 25
        single = select(G, k, lam=lam, alpha=0.9)
        edges = np.linspace(0, len(G), n_shards + 1).astype(int)
        shards = [
            CandidateShard(G[a:b], alpha=0.9, lam=lam, max_updates=k, offset=a, lazy=bool(j % 2))
            for j, (a, b) in enumerate(zip(edges[:-1], edges[1:]))
        ]
        sel = select_shards(LocalShards(shards), k, alpha=0.9, lam=lam)
        assert sel.indices.tolist() == single.indices.tolist()
        assert np.array_equal(sel.gains, single.gains) and sel.logdet == single.logdet


def test_shard_with_scattered_indices() -> None:
    G = sketch_like(4, n=60, d=8)
    rows = np.arange(0, 60, 2)
    sh = CandidateShard(G[rows], alpha=1.0, lam=0.2, max_updates=10, indices=rows)
    sel = select_shards(LocalShards([sh]), 10, alpha=1.0, lam=0.2)
    assert sel.indices.tolist() == oracle(G, 10, alpha=1.0, lam=0.2, candidates=rows.tolist())
    with pytest.raises(ValueError, match="ascending"):
        CandidateShard(G[:3], alpha=1.0, lam=0.0, max_updates=2, indices=np.array([2, 1, 3]))


def _write(path, uids: list[str], G: np.ndarray) -> None:
    values = pa.array(G.astype(np.float32).reshape(-1), type=pa.float32())
    pq.write_table(
        pa.table({"uid": pa.array(uids), "sketch": pa.FixedSizeListArray.from_arrays(values, G.shape[1])}), path
    )


def test_read_sketches_uid_range(tmp_path) -> None:
    G = sketch_like(0, n=40, d=5)
    uids = [f"{i * 7919 % 1000:04d}" for i in range(40)]
    _write(tmp_path / "a.parquet", uids[:25], G[:25])
    _write(tmp_path / "b.parquet", uids[25:], G[25:])
    all_uids, all_G = read_sketches(str(tmp_path))
    assert read_sketch_uids(str(tmp_path)).tolist() == all_uids.tolist()
    lo, hi = all_uids[10], all_uids[30]
    part_uids, part = read_sketches(str(tmp_path), uid_range=(lo, hi))
    assert part_uids.tolist() == all_uids[10:30].tolist() and np.array_equal(part, all_G[10:30])
    assert read_sketches(str(tmp_path), uid_range=(None, lo))[0].tolist() == all_uids[:10].tolist()
    assert read_sketches(str(tmp_path), uid_range=(hi, None))[0].tolist() == all_uids[30:].tolist()




# -------------------------------------------------------------------------------- checkpoint/resume
class _Kill(Exception):
    pass


@pytest.mark.parametrize("method", ["spice", "windowed"])
@pytest.mark.parametrize("lazy", [True, False])
def test_resume_after_exception_equals_uninterrupted(tmp_path, method: str, lazy: bool) -> None:
    G = sketch_like(6, n=120, d=10)
    kw = dict(method=method, lam=0.4, pool_size=50, seed=2, lazy=lazy)
    full = select(G, 30, **kw)

    def boom(step: int, index: int) -> None:
        if step == 17:
            raise _Kill

    ck = tmp_path / "ck"
    with pytest.raises(_Kill):
        select(G, 30, checkpoint_dir=str(ck), checkpoint_every=5, on_step=boom, **kw)
    saved = json.loads((ck / "picks.json").read_text())
    assert saved["picks"] == full.indices[:15].tolist() and not saved["complete"]
    resumed = select(G, 30, checkpoint_dir=str(ck), checkpoint_every=5, **{**kw, "lazy": not lazy})
    assert resumed.stats["replayed"] == 15
    assert resumed.indices.tolist() == full.indices.tolist()
    assert np.array_equal(resumed.gains, full.gains) and np.array_equal(resumed.conflicts, full.conflicts)
    assert json.loads((ck / "picks.json").read_text())["complete"]
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]


def test_checkpoint_of_another_problem_is_ignored(tmp_path) -> None:
    G = sketch_like(8, n=40, d=6)
    select(G, 10, lam=0.1, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    other = select(G, 10, lam=0.2, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    assert other.stats["replayed"] == 0
    assert other.indices.tolist() == select(G, 10, lam=0.2).indices.tolist()
    ck = PickCheckpoint(str(tmp_path), {"x": 1})
    assert ck.load() == []
    ck.save([3, 1, 2])
    assert ck.load() == [3, 1, 2]
    ck.clear()
    assert not tmp_path.exists() or ck.load() == []


# ----------------------------------------------------------------------------------------- windowed
def test_pool_quotas() -> None:
    for n, k, m in ((100, 10, 30), (100, 10, 15), (1000, 7, 333), (10, 10, 3), (50, 0, 7)):
        q = pool_quotas(n, k, m)
        assert sum(x for _, _, x in q) == k
        assert all(0 <= x <= b - a for a, b, x in q)
        assert q[0][2] in (int(np.floor(k * m / n)), int(np.ceil(k * m / n))) or m >= n
    assert [x for *_, x in pool_quotas(100, 10, 20)] == [2, 2, 2, 2, 2]


def test_windowed_matches_pooled_brute_force() -> None:
    G = sketch_like(9, n=45, d=6)
    k, m, seed, lam = 12, 15, 4, 0.5
    perm = np.random.default_rng(seed).permutation(len(G))
    want: list[int] = []
    for a, b, quota in pool_quotas(len(G), k, m):
        want += oracle(G, quota, alpha=1.0, lam=lam, candidates=perm[a:b].tolist(), picks=want)
    for lazy in (True, False):
        sel = select(G, k, method="windowed", lam=lam, pool_size=m, seed=seed, lazy=lazy)
        assert sel.indices.tolist() == want
        assert sel.params["pool_size"] == m
    # one pool holding every row is plain SPICE
    assert select(G, k, method="windowed", lam=lam, pool_size=len(G)).indices.tolist() == select(G, k, lam=lam).indices.tolist()


# --------------------------------------------------------------------------------------------- LESS
def test_less_top_k_cosine_to_target_mean() -> None:
    G = sketch_like(10, n=60, d=8)
    T = sketch_like(11, n=7, d=8, dup=0, zeros=0)
    sel = select(G, 10, method="less", target=T)
    mean = T.astype(np.float64).mean(0)
    g = G.astype(np.float64)
    norms = np.linalg.norm(g, axis=1)
    cos = np.where(norms > 0, g @ mean / (np.where(norms > 0, norms, 1) * np.linalg.norm(mean)), 0.0)
    assert sel.indices.tolist() == np.argsort(-cos, kind="stable")[:10].tolist()
    assert sel.logdet == pytest.approx(logdet_of(G, sel.indices), rel=1e-8)
    with pytest.raises(ValueError, match="target"):
        select(G, 5, method="less")
    with pytest.raises(ValueError, match="target"):
        select(G, 5, method="less", target=np.ones((2, 3)))



def test_every_method_from_config(tmp_path) -> None:
    """The SelectConfig fields reach the engine: select_to_dir (what the actor runs) equals select()."""
    from spice_ray.config import SelectConfig
    from spice_ray.select.stage import select_to_dir

    G = sketch_like(13, n=90, d=6)
    uids = [f"u{i:03d}" for i in range(90)]
    _write(tmp_path / "pool.parquet", uids, G)
    target_uids = ["u007", "u042", "u081"]
    (tmp_path / "target.txt").write_text("\n".join(target_uids) + "\n")
    T = sketch_like(14, n=5, d=6, dup=0, zeros=0)
    _write(tmp_path / "target.parquet", [f"t{i}" for i in range(5)], T)

    def picks(out: str, **fields) -> list[str]:
        select_to_dir(str(tmp_path / "pool.parquet"), str(tmp_path / out), SelectConfig(k=12, **({"scale": "none", "alpha": 1.0} | fields)))
        return pq.read_table(tmp_path / out / "selection.parquet").column("uid").to_pylist()

    def names(indices) -> list[str]:
        return [uids[i] for i in indices]

    want = names(select(G, 12, lam=0.3).indices)
    assert picks("eager", lam=0.3, lazy=False) == want == picks("lazy", lam=0.3, lazy=True, checkpoint_every=3)
    assert picks("torch", lam=0.3, device="cpu") == want
    assert picks("windowed", method="windowed", lam=0.3, pool_size=20, seed=5) == names(
        select(G, 12, method="windowed", lam=0.3, pool_size=20, seed=5).indices
    )
    rows = [uids.index(u) for u in target_uids]
    others = [i for i in range(90) if i not in rows]  # the target's own rows are never candidates
    assert picks("less_uids", method="less", target=str(tmp_path / "target.txt")) == [
        uids[others[i]] for i in select(G[others], 12, method="less", target=G[rows]).indices
    ]
    assert picks("less_sketches", method="less", target=str(tmp_path / "target.parquet")) == names(
        select(G, 12, method="less", target=T).indices
    )
    (tmp_path / "bad.txt").write_text("u007\nnot-a-uid\n")
    with pytest.raises(ValueError, match="1 of 2 target uids are not in the pool"):
        picks("bad", method="less", target=str(tmp_path / "bad.txt"))

# -------------------------------------------------------------------------------------- diagnostics
def test_diagnostics() -> None:
    G = sketch_like(12, n=80, d=10)
    alpha = 0.6
    sel = select(G, 20, lam=0.3, alpha=alpha)
    g = G.astype(np.float64)[sel.indices]
    # ε and its bound, step by step from the explicit selected rows
    for t in (0, 5, 19):
        cross = sum(float(g[t] @ g[j]) ** 2 for j in range(t))
        assert sel.eps_bound[t] == pytest.approx(alpha**2 * cross / (1 + alpha * g[t] @ g[t]), rel=1e-9, abs=1e-15)
        assert sel.eps[t] == pytest.approx(sel.gains[t] - sel.bases[t], abs=1e-12)
    assert np.allclose(cross_energy(g)[1:], [sum((g[t] @ g[:t].T) ** 2) for t in range(1, 20)])
    diag = sel.summary()["diagnostics"]
    holds = np.abs(sel.eps) <= sel.eps_bound * (1 + 1e-9) + 1e-12 * (1 + sel.bases)
    assert diag["eps_bound_holds"] == pytest.approx(holds.mean())
    assert diag["conflict_gain_spearman"] == pytest.approx(spearman(sel.conflicts, sel.gains))
    # leave-one-out gains and curvature against direct log-dets
    loo = leave_one_out_gains(g, alpha)
    picks = sel.indices.tolist()
    full = logdet_of(G, picks, alpha)
    for i in (0, 7, 19):
        assert loo[i] == pytest.approx(full - logdet_of(G, picks[:i] + picks[i + 1 :], alpha), rel=1e-7)
    kappa = 1 - min(loo[i] / np.log1p(alpha * g[i] @ g[i]) for i in range(20) if g[i] @ g[i] > 0)
    assert diag["curvature"] == pytest.approx(kappa, rel=1e-9)
    assert 0 <= diag["curvature"] <= 1 and diag["steps"] == 20
    json.dumps(sel.summary())
    # Spearman: ranks with ties, constant input
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 2, 3]), np.array([3.0, 2, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.zeros(5), np.arange(5.0)) is None
    assert curvature(g[:1], alpha) is None


# --------------------------------------------------------------------------------------- submodlib
def test_logdet_equals_submodlib() -> None:
    """submodlib's LogDeterminantFunction is f(A) = log det(S_A + λ I) over a similarity kernel S.
    With S = α G Gᵀ (dense, ``sijs``) and ``lambdaVal = 1``, f(A) = log det(I_t + α G_A G_Aᵀ) =
    log det(I_d + α Σ_{i∈A} g_i g_iᵀ) (Sylvester), so NaiveGreedy picks the λ = 0 greedy's rows."""
    submodlib = pytest.importorskip("submodlib", reason="submodlib-py not installed (pip install -e .[dev])")
    G = sketch_like(13, n=80, d=10, dup=0, zeros=0).astype(np.float64)
    alpha = 0.7
    f = submodlib.LogDeterminantFunction(n=len(G), mode="dense", lambdaVal=1, sijs=alpha * (G @ G.T))
    res = f.maximize(budget=15, optimizer="NaiveGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, show_progress=False)
    ours = select(G, 15, method="logdet", alpha=alpha)
    assert [int(i) for i, _ in res] == ours.indices.tolist()
    assert np.allclose([gain for _, gain in res], ours.gains, rtol=1e-5)


# --------------------------------------------------------------------------------------------- gpu
@pytest.mark.gpu
def test_cuda_eager_equals_numpy() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    G = sketch_like(14, n=2000, d=32)
    want = select(G, 50, lam=0.2, lazy=False).indices.tolist()
    assert select(G, 50, lam=0.2, lazy=False, device="cuda").indices.tolist() == want
    assert select(G, 50, lam=0.2, device="auto").params["device"] == "cuda"


def test_device_auto_and_errors() -> None:
    G = sketch_like(15, n=30, d=4)
    with pytest.raises(ValueError, match="device"):
        select(G, 3, device="tpu")
    sel = select(G, 3, device="auto")
    assert sel.params["device"] in ("numpy", "cuda")
    assert sel.indices.tolist() == select(G, 3).indices.tolist()
