"""Selection aimed at a target set (spice_ray/select/target.py): the target's rows are never picked,
by any method; spice/logdet choose among the rows closest in direction to the target's mean."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import SelectConfig
from spice_ray.select.greedy import select
from spice_ray.select.sharding import refusal
from spice_ray.select.stage import select_to_dir
from spice_ray.select.target import closest_rows, target_cosine

N, D = 120, 6
BIG = [11, 23, 35, 47, 59, 71, 83, 95]


def _pool(tmp_path, seed: int = 3) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    G = (rng.standard_normal((N, D)) * rng.lognormal(0, 0.7, (N, 1))).astype(np.float32)
    G[5] = 0.0  # a zero row: cosine 0
    tokens = rng.integers(1, 60, N)
    G[BIG] *= 10  # the longest rows with the largest gradients: every ranking wants them
    tokens[BIG] = 100
    uids = [f"u{i:03d}" for i in range(N)]
    values = pa.array(G.reshape(-1), type=pa.float32())
    pq.write_table(pa.table({"uid": uids, "sketch": pa.FixedSizeListArray.from_arrays(values, D),
                             "n_loss_tokens": pa.array(tokens, type=pa.int64())}), tmp_path / "pool.parquet")
    return uids, G, tokens


def _picks(tmp_path, out: str, **fields) -> tuple[list[str], dict]:
    import json

    summary = select_to_dir(str(tmp_path / "pool.parquet"), str(tmp_path / out), SelectConfig(**({"k": 10} | fields)))
    assert summary == json.loads((tmp_path / out / "summary.json").read_text())
    return pq.read_table(tmp_path / out / "selection.parquet").column("uid").to_pylist(), summary


def test_target_cosine_and_closest_rows():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((50, 4))
    G[7] = 0
    T = rng.standard_normal((3, 4))
    m = T.mean(0)
    want = np.array([g @ m / (np.linalg.norm(g) * np.linalg.norm(m)) if g.any() else 0.0 for g in G])
    cos = target_cosine(G.astype(np.float32), T)
    np.testing.assert_allclose(cos, want, rtol=1e-6, atol=1e-7)
    assert cos[7] == 0.0
    top = closest_rows(cos, 0.2)
    assert len(top) == 10 and set(top) == set(np.argsort(-cos, kind="stable")[:10]) and (np.diff(top) > 0).all()
    assert len(closest_rows(cos, 0.2, at_least=17)) == 17  # at least the budget
    costs = np.full(50, 10.0)
    assert len(closest_rows(cos, 0.1, costs=costs, max_cost=201.0)) == 21  # enough to hold the token budget
    tied = closest_rows(np.zeros(6), 0.5)
    assert tied.tolist() == [0, 1, 2]  # ties: the smaller index
    with pytest.raises(ValueError, match="mean is zero"):
        target_cosine(G, np.zeros((2, 4)))


@pytest.mark.parametrize("method", ["random", "gradnorm", "longest", "less", "spice", "logdet"])
@pytest.mark.parametrize("budget", ["records", "tokens"])
def test_the_target_rows_are_never_picked(tmp_path, method, budget):
    uids, G, tokens = _pool(tmp_path)
    target = [uids[i] for i in BIG]
    (tmp_path / "target.txt").write_text("\n".join(target) + "\n")
    fields = {"method": method, "target": str(tmp_path / "target.txt"), "budget": budget}
    if budget == "tokens":
        fields |= {"k": None, "fraction": 0.2}
    picked, summary = _picks(tmp_path, "out", **fields)
    assert picked and not set(picked) & set(target)
    assert summary["target_rows_excluded"] == 8
    if method in ("gradnorm", "longest", "spice", "logdet"):
        untargeted, _ = _picks(tmp_path, "plain", **(fields | {"target": None}))
        assert set(untargeted) & set(target), "without a target these rows would have been picked"


def test_spice_with_a_target_selects_among_the_closest_rows(tmp_path):
    uids, G, _ = _pool(tmp_path)
    rows = [3, 17, 40, 77]
    (tmp_path / "target.txt").write_text("\n".join(uids[i] for i in rows) + "\n")
    others = np.array([i for i in range(N) if i not in rows])
    common = {"method": "spice", "target": str(tmp_path / "target.txt"), "lam": 0.3, "scale": "none", "alpha": 0.5}

    picked, summary = _picks(tmp_path, "p03", **common, target_pool=0.3)
    near = others[closest_rows(target_cosine(G[others], G[rows]), 0.3, at_least=10)]
    assert summary["target_pool_rows"] == len(near) == 35
    want = select(G[near], 10, lam=0.3, alpha=0.5).indices
    assert picked == [uids[near[i]] for i in want]

    whole, summary = _picks(tmp_path, "p1", **common, target_pool=1.0)  # 1: the direction is ignored
    assert whole == [uids[others[i]] for i in select(G[others], 10, lam=0.3, alpha=0.5).indices]
    assert "target_pool_rows" not in summary
    # the default α (auto) is resolved on all candidates, not only the near ones
    _, auto = _picks(tmp_path, "auto", method="spice", target=str(tmp_path / "target.txt"), target_pool=0.3)
    _, auto_all = _picks(tmp_path, "auto_all", method="spice", target=str(tmp_path / "target.txt"), target_pool=1.0)
    assert auto["alpha"] == auto_all["alpha"]


def test_a_target_selection_is_not_sharded():
    assert "one worker" in refusal("spice", "ray", "records", "t.txt")
    assert refusal("spice", "ray", "records", None) is None
