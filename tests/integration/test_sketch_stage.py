"""The sketch stage on a real Ray Data actor pool: the cache, worker counts, batch order, warm-up."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spice_ray.config import load_config
from spice_ray.select import read_sketches
from spice_ray.sketch.stage import run_sketch_stage


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is {i} plus {i * 3}?" + " Explain." * (i % 5)},
            {"role": "assistant", "content": f"{i} plus {i * 3} is {i * 4}."},
        ]
        rows.append({"uid": f"{i:04d}", "messages": messages, "n_tokens": 10 + (i * 7) % 13})
    return rows


def write_records(path, n=24, shuffle_seed: int | None = None):
    rows = make_rows(n)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def sketch(cfg_overrides, records, out, executor=None, **kwargs):
    from spice_ray.ray_executor import RayExecutor

    cfg = load_config(None, ["sketch.dim=64", "sketch.batch_size=4", "sketch.max_tokens_per_batch=256", *cfg_overrides])
    model = str(kwargs.pop("model"))
    result = run_sketch_stage(cfg, executor or RayExecutor(), records_path=str(records), model_path=model, tokenizer_path=model,
                              out_dir=str(out), **kwargs)
    uids, sketches = read_sketches(str(out / "sketches"))
    return result, uids, sketches


def test_cache_grown_corpus_worker_counts_and_order(ray_session, tiny_model_dir, tmp_path):
    """Run 1 sketches 16 records into the cache; run 2 (2 workers) over a grown, shuffled corpus of
    24 computes only the 8 new ones, and all 24 equal a plain in-process computation in another
    order and batching; a rerun over the first 16 computes nothing and outputs exactly those 16."""
    from spice_ray.config import ModelConfig, SketchConfig
    from spice_ray.sketch.worker import SketchWorker

    cache = tmp_path / "cache"
    small = write_records(tmp_path / "r16.parquet", n=16)
    grown = write_records(tmp_path / "r24.parquet", n=24, shuffle_seed=3)
    r1, u1, s1 = sketch(["sketch.fidelity_sample=8"], small, tmp_path / "run1", model=tiny_model_dir, cache_dir=str(cache))
    assert (r1["n_records"], r1["n_cached"], r1["n_computed"]) == (16, 0, 16)
    assert r1["projection"]["kind"] == "kronecker-gaussian" and r1["projection"]["dim"] == 64 and r1["projection"]["layers"]
    fid = r1["fidelity"]
    assert fid["n"] == 8 and fid["pearson_inner"] > 0 and np.isfinite(fid["pair_error_median"])

    r2, u2, s2 = sketch(["sketch.fidelity_sample=0", "sketch.num_workers=2"], grown, tmp_path / "run2",
                        model=tiny_model_dir, cache_dir=str(cache))
    assert (r2["n_records"], r2["n_cached"], r2["n_computed"]) == (24, 16, 8)
    assert r2["spec_hash"] == r1["spec_hash"]
    assert u2.tolist() == [f"{i:04d}" for i in range(24)]
    np.testing.assert_array_equal(s2[:16], s1)  # cached rows: the same bytes
    table = pq.read_table(tmp_path / "run2" / "sketches").to_pandas()
    assert len(table) == 24 and (table["grad_norm"] > 0).all() and (table["loss"] > 0).all()

    worker = SketchWorker(str(tiny_model_dir), str(tiny_model_dir), ModelConfig().model_dump(),
                          SketchConfig(dim=64).model_dump(), max_tokens=1024)
    direct = worker(pa.Table.from_pylist(make_rows(24)))
    np.testing.assert_allclose(np.stack(direct.column("sketch").to_numpy(zero_copy_only=False)), s2, rtol=1e-4, atol=1e-6)

    # two runs that appended the same uids concurrently leave duplicates: the output keeps one row each
    from spice_ray.sketch.cache import SketchCache

    spec_cache = SketchCache(str(cache / r1["spec_hash"]))
    first = pq.read_table(sorted((cache / r1["spec_hash"] / "parts").glob("*.parquet"))[0])
    spec_cache.add(first.slice(0, 2).replace_schema_metadata({"copy": "1"}))  # same uids, other bytes
    r3, u3, s3 = sketch(["sketch.fidelity_sample=0"], small, tmp_path / "run3", model=tiny_model_dir, cache_dir=str(cache))
    assert (r3["n_cached"], r3["n_computed"]) == (16, 0)
    assert u3.tolist() == u1.tolist()
    np.testing.assert_array_equal(s3, s1)


def test_warmup_then_adam_sketches(local_executor, tiny_model_dir, tmp_path):
    """A one-step warm-up (one worker, the plain-torch engine: a safetensors checkpoint), then Adam
    sketches from its checkpoint: the moments read back line up with the weights they moved. In
    process: the same torch engine under Ray Train is the e2e pipeline's train stage."""
    from spice_ray.config import ModelConfig, SketchConfig
    from spice_ray.sketch.optimizer_state import load_training_state
    from spice_ray.sketch.worker import build_model

    records = write_records(tmp_path / "records.parquet", n=24)
    overrides = [
        "sketch.gradient=adam", "sketch.warmup_fraction=0.5", "sketch.warmup_steps=1", "sketch.fidelity_sample=4",
        "train.num_workers=2", "train.micro_batch_size=4", "train.lr=0.01", "train.max_grad_norm=1000",
    ]
    result, _, sketches = sketch(overrides, records, tmp_path / "sk", local_executor, model=tiny_model_dir,
                                    cache_dir=str(tmp_path / "cache"))
    warm = result["warmup"]
    assert warm["n_records"] == 12 and warm["steps"] == 1
    assert pq.read_table(warm["selection"]).num_rows == 12
    assert result["gradient"] == "adam" and result["n_computed"] == 24 and result["state"] == warm["checkpoint"]
    assert np.isfinite(sketches).all() and np.abs(sketches).max() > 0
    assert result["fidelity"]["n"] == 4

    cfg = SketchConfig(gradient="adam", warmup_fraction=0.5)
    model = build_model(str(tiny_model_dir), ModelConfig(), cfg, "cpu")
    state = load_training_state(warm["checkpoint"], model)
    assert state.format == "torch" and state.step == 1 and state.weights
    # one AdamW step from B = 0 with lr 0.01: B = −lr·m̂/(√v̂ + ε) = −lr·sign(g) where |g| ≫ ε
    for name, w in state.weights.items():
        if "lora_B" not in name:
            continue
        m = state.exp_avg[name]
        big = m.abs() > 1e-5
        assert big.any()
        torch.testing.assert_close(w[big], -0.01 * torch.sign(m[big]), rtol=1e-2, atol=1e-5)
    # rerun in the same stage directory: the warm-up and every sketch are reused
    overrides[3] = "sketch.fidelity_sample=0"
    again, _, again_sketches = sketch(overrides, records, tmp_path / "sk", local_executor, model=tiny_model_dir,
                                      cache_dir=str(tmp_path / "cache"))
    assert again["warmup"] == warm
    assert again["n_computed"] == 0 and again["spec_hash"] == result["spec_hash"]
    np.testing.assert_array_equal(again_sketches, sketches)
