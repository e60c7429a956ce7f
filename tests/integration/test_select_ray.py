"""The selection on Ray: one selection task against the direct call, and shard actors against one process."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.select import logdet_of, select
from spice_ray.testing import select_problem, write_sketches


def test_selector_task_matches_direct_select(ray_executor, tmp_path) -> None:
    from spice_ray.config import SelectConfig
    from spice_ray.select.stage import run_select_stage

    rng = np.random.default_rng(1)
    n = 120
    G = select_problem(11, n=n, d=16).astype(np.float32)
    uids = [f"{rng.integers(1 << 60):016x}" for _ in range(n)]
    sketches = tmp_path / "sketches"
    sketches.mkdir()
    write_sketches(sketches / "part-0.parquet", uids[:70], G[:70])
    write_sketches(sketches / "part-1.parquet", uids[70:], G[70:])
    cfg = SelectConfig(method="spice", fraction=0.1, lam=0.5, scale="none", alpha=1.0)
    out = tmp_path / "selection"

    summary = run_select_stage(str(sketches), str(out), cfg, ray_executor)

    order = np.argsort(uids)
    direct = select(G[order], cfg.max_records(n), method="spice", alpha=cfg.alpha, lam=cfg.lam)
    table = pq.read_table(out / "selection.parquet")
    assert table.column_names == [
        "uid", "rank", "gain", "base", "conflict", "score", "logdet", "eps", "eps_bound"
    ]
    assert np.allclose(table.column("eps").to_numpy(), direct.eps)
    assert table.column("uid").to_pylist() == [uids[i] for i in order[direct.indices]]
    assert table.column("rank").to_pylist() == list(range(12))
    assert np.allclose(table.column("gain").to_numpy(), direct.gains)
    assert summary["k_selected"] == 12 and summary["stop_reason"] == "budget"
    assert summary["logdet"] == pytest.approx(direct.logdet, rel=1e-12)
    assert summary["logdet"] == pytest.approx(logdet_of(G[order], direct.indices), rel=1e-8)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["logdet"] == summary["logdet"] and on_disk["method"] == "spice"
    assert not [p for p in out.iterdir() if p.name.startswith((".", "_"))]  # no temp files or checkpoint left
    assert on_disk["diagnostics"]["steps"] == 12 and "curvature" in on_disk["diagnostics"]


def test_ray_shard_actors_equal_single(ray_session, tmp_path) -> None:
    from spice_ray.select.ray_shards import select_sharded

    G = select_problem(5, n=150, d=12).astype(np.float32)  # stored as float32
    rng = np.random.default_rng(0)
    uids = [f"{rng.integers(1 << 60):016x}" for _ in range(len(G))]
    write_sketches(tmp_path / "part-0.parquet", uids[:80], G[:80])
    write_sketches(tmp_path / "part-1.parquet", uids[80:], G[80:])
    order = np.argsort(uids)
    single = select(G[order], 20, lam=0.3)
    # each of 3 shard actors reads its own uid range; one replays from a checkpoint
    sel, got_uids = select_sharded(
        str(tmp_path), 20, n_shards=3, lam=0.3, num_cpus=0.5, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=5
    )
    assert got_uids.tolist() == sorted(uids)
    assert sel.indices.tolist() == single.indices.tolist()
    assert np.array_equal(sel.gains, single.gains) and sel.stats["shards"] == 3
    arr, _ = select_sharded(G[order], 20, n_shards=2, lam=0.3, lazy=False, num_cpus=0.5)
    assert arr.indices.tolist() == single.indices.tolist()
    # resume: the checkpoint holds all 20 picks; a rerun replays them and ends the same
    again, _ = select_sharded(str(tmp_path), 20, n_shards=2, lam=0.3, num_cpus=0.5, checkpoint_dir=str(tmp_path / "ck"))
    assert again.indices.tolist() == single.indices.tolist() and again.stats["replayed"] == 20


def test_sharded_stage_default_config_equals_one_worker(ray_executor, tmp_path) -> None:
    """``select.shards=2`` with the default config (scale=tokens, α auto) runs on shard actors and
    picks what one worker picks."""
    from spice_ray.config import SelectConfig
    from spice_ray.select.stage import run_select_stage

    rng = np.random.default_rng(4)
    n = 160
    G = select_problem(7, n=n, d=12).astype(np.float32)
    tokens = rng.integers(3, 300, size=n)
    uids = [f"{rng.integers(1 << 60):016x}" for _ in range(n)]
    sketches = tmp_path / "sketches"
    sketches.mkdir()
    write_sketches(sketches / "part-0.parquet", uids, G)
    table = pq.read_table(sketches / "part-0.parquet")
    pq.write_table(table.append_column("n_loss_tokens", pa.array(tokens, type=pa.int32())), sketches / "part-0.parquet")
    one = run_select_stage(str(sketches), str(tmp_path / "one"), SelectConfig(fraction=0.15), ray_executor)
    cfg = SelectConfig(fraction=0.15, shards=2, num_cpus=0.5)
    assert cfg.scale == "tokens" and cfg.alpha == "auto"
    two = run_select_stage(str(sketches), str(tmp_path / "two"), cfg, ray_executor)
    assert two["engine"]["shards"] == 2 and two["alpha"] == one["alpha"]
    picks = [pq.read_table(tmp_path / d / "selection.parquet").column("uid").to_pylist() for d in ("one", "two")]
    assert picks[0] == picks[1] and len(picks[0]) == 24
