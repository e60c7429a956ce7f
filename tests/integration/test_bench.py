"""``spice-ray bench`` end to end on a tiny corpus (local executor): cells, the summary's statistics,
and a resumed bench that reuses every finished cell."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from spice_ray.bench import BenchSection, load_bench, paired, run_bench, summarize
from spice_ray.executor import LocalExecutor

BENCH = {
    "corpus": {"demo_size": 240, "holdout_validation": 0.1, "holdout_test": 0.15},
    "sketch": {"dim": 32, "batch_size": 32, "fidelity_sample": 0},
    "select": {"fraction": 0.1},
    "train": {"micro_batch_size": 2, "epochs": 1},
    "run": {"executor": "local"},
    "bench": {
        "arms": [
            {"name": "random", "select": {"method": "random"}},
            {"name": "spice", "select": {"method": "spice"}},
            {"name": "spice-tokens", "select": {"method": "spice", "scale": "tokens", "alpha": "auto", "quota": "source"}},
            {"name": "full", "select": {"method": "random"}, "fraction": 1.0},
        ],
        "seeds": [0, 1],
    },
}


class NoTraining(LocalExecutor):
    def train(self, *a, **k):
        raise AssertionError("a finished cell was trained again")


def test_bench_end_to_end_and_resume(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(BENCH))
    cfg, bench = load_bench(path, [f"run.root={tmp_path / 'root'}"])
    summary = run_bench(cfg, bench, LocalExecutor())
    assert len(summary["cells"]) == 8
    for split in ("validation", "test"):
        rows = {r["arm"]: r for r in summary["splits"][split]}
        assert set(rows) == {"random", "spice", "spice-tokens", "full"}
        assert all(math.isfinite(r["loss"]) and r["seeds"] == 2 for r in rows.values())
        assert rows["full"]["steps"] > rows["random"]["steps"] == rows["spice"]["steps"]  # same budget, same steps
        assert "vs_baseline" not in rows["random"] and rows["spice"]["vs_baseline"]["n"] == 2
        assert 0 <= rows["spice"]["sources_not_worse"] <= rows["spice"]["sources"]
        assert summary["base"][split] > 0
    cell = summary["cells"][0]
    assert cell["eval"]["test"]["overall"]["tokens"] == sum(v["tokens"] for v in cell["eval"]["test"]["sources"].values())
    out = tmp_path / "root" / "bench"
    assert (out / "results.md").read_text().count("| spice |") == 2 and (out / "index.html").exists()
    assert json.loads((out / "results.json").read_text())["splits"] == json.loads(json.dumps(summary["splits"]))
    assert not any((out / "cells").rglob("model.safetensors"))  # models are dropped once evaluated

    again = run_bench(cfg, bench, NoTraining())  # every cell is reused
    assert again["splits"] == summary["splits"]

    more = BenchSection.model_validate(BENCH["bench"] | {"seeds": [0, 1, 2]})
    with pytest.raises(AssertionError, match="trained again"):
        run_bench(cfg, more, NoTraining())  # a new seed is new work


def test_bench_at_a_token_budget(tmp_path):
    """Arms under a budget in loss tokens: spice per token, longest, and random matched to spice's
    tokens (match_tokens); each selection stays within its budget, the matched one within spice's."""
    data = BENCH | {"bench": {"arms": [
        {"name": "random", "select": {"method": "random"}},
        {"name": "spice", "select": {"method": "spice"}},
        {"name": "spice-tok", "select": {"method": "spice", "budget": "tokens"}},
        {"name": "longest-tok", "select": {"method": "longest", "budget": "tokens"}},
        {"name": "random-eqtok", "select": {"method": "random"}, "match_tokens": "spice"},
    ], "seeds": [0], "splits": ["test"], "full": None}}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg, bench = load_bench(path, [f"run.root={tmp_path / 'root'}"])
    summary = run_bench(cfg, bench, LocalExecutor())
    cells = {c["arm"]: c for c in summary["cells"]}
    spice_tokens = cells["spice"]["selection"]["loss_tokens"]
    matched = cells["random-eqtok"]["selection"]
    assert matched["budget"]["max_cost"] == spice_tokens >= matched["loss_tokens"] > 0.8 * spice_tokens
    assert matched["budget"]["rule"] == "in order"
    for arm in ("spice-tok", "longest-tok"):
        info = cells[arm]["selection"]["budget"]
        assert cells[arm]["selection"]["loss_tokens"] == info["cost"] <= info["max_cost"]
    assert cells["spice-tok"]["selection"]["budget"]["rule"] in ("per-token", "unit-cost")
    with pytest.raises(Exception, match="match_tokens"):
        run_bench(cfg, BenchSection.model_validate(data["bench"] | {"arms": [{"name": "random"}, {"name": "x", "match_tokens": "nope"}]}),
                  LocalExecutor())


def test_paired_difference_and_gap_closed():
    assert paired([-0.02, -0.01, -0.03]) == pytest.approx(
        {"mean": -0.02, "sd": 0.01, "n": 3, "ci_low": -0.02 - 4.303 * 0.01 / math.sqrt(3), "ci_high": -0.02 + 4.303 * 0.01 / math.sqrt(3)})
    bench = BenchSection.model_validate({"arms": [{"name": "random"}, {"name": "a"}, {"name": "full", "fraction": 1.0}],
                                         "seeds": [0, 1], "splits": ["test"]})

    def cell(arm, fraction, seed, loss, per_source):
        return {"arm": arm, "fraction": fraction, "seed": seed, "source_mix": {"x": 1}, "train": {"tokens": 10, "steps": 5},
                "eval": {"test": {"overall": {"loss": loss, "tokens": 10}, "sources": {s: {"loss": v, "tokens": 5} for s, v in per_source.items()}}}}

    cells = [cell("random", 0.1, 0, 3.0, {"x": 3.0, "y": 3.0}), cell("random", 0.1, 1, 3.2, {"x": 3.2, "y": 3.2}),
             cell("a", 0.1, 0, 2.9, {"x": 2.8, "y": 3.1}), cell("a", 0.1, 1, 3.1, {"x": 3.0, "y": 3.3}),
             cell("full", 1.0, 0, 2.5, {"x": 2.5, "y": 2.5}), cell("full", 1.0, 1, 2.7, {"x": 2.7, "y": 2.7})]
    base = {"eval": {"test": {"overall": {"loss": 4.0}, "sources": {"x": {"loss": 4.0}, "y": {"loss": 4.0}}}}}
    rows = {r["arm"]: r for r in summarize(cells, base, bench)["splits"]["test"]}
    assert rows["a"]["vs_baseline"]["mean"] == pytest.approx(-0.1)
    assert rows["a"]["gap_closed"] == pytest.approx(0.1 / 0.5)
    assert (rows["a"]["sources_not_worse"], rows["a"]["sources"]) == (1, 2)


def test_bench_aimed_at_a_target(tmp_path):
    """The targeted setting's mechanics: select.target (pool uids) is never picked by any arm, and
    bench.sources scores the named held-out source only."""
    import pyarrow.parquet as pq

    from spice_ray.pipeline import run_pipeline

    data = BENCH | {"bench": {"arms": [
        {"name": "random", "select": {"method": "random"}},
        {"name": "less", "select": {"method": "less"}},
        {"name": "spice", "select": {"method": "spice", "target_pool": 0.5}},
    ], "seeds": [0], "splits": ["test"], "full": None, "sources": ["arithmetic"]}}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg, _ = load_bench(path, [f"run.root={tmp_path / 'root'}"])
    sketches = run_pipeline(cfg, stages=["ingest", "sketch"], executor=LocalExecutor(), record=False)["sketch"].result["sketches"]
    uids = sorted(pq.read_table(sketches, columns=["uid"]).column("uid").to_pylist())
    target = uids[::20]
    (tmp_path / "target.txt").write_text("\n".join(target) + "\n")
    cfg, bench = load_bench(path, [f"run.root={tmp_path / 'root'}", f"select.target={tmp_path / 'target.txt'}"])
    summary = run_bench(cfg, bench, LocalExecutor())
    for cell in summary["cells"]:
        assert set(cell["eval"]["test"]["sources"]) == {"arithmetic"}
        picked = pq.read_table(tmp_path / "root" / "bench" / "cells" / cell["arm"] / "f0.1" / "s0" / "select" / "selection.parquet")
        assert not set(picked.column("uid").to_pylist()) & set(target)
        assert cell["k"] == round(0.1 * (len(uids) - len(target)))
    with pytest.raises(Exception, match="no held-out rows of nope"):
        run_bench(cfg, BenchSection.model_validate(data["bench"] | {"sources": ["nope"]}), LocalExecutor())
