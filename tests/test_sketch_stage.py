"""The sketch stage on a real Ray Data actor pool: same sketches for any worker count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import load_config
from spice_ray.select import read_sketches
from spice_ray.sketch.stage import run_sketch_stage

pytestmark = pytest.mark.slow


def write_records(path, n=24):
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is {i} plus {i * 3}?" + " Explain." * (i % 5)},
            {"role": "assistant", "content": f"{i} plus {i * 3} is {i * 4}."},
        ]
        rows.append({"uid": f"{i:04d}", "messages": messages, "n_tokens": 10 + (i * 7) % 13})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_sketches_identical_for_one_and_two_workers(ray_session, tiny_model_dir, tmp_path):
    records = write_records(tmp_path / "records.parquet")
    results = {}
    for workers in (1, 2):
        cfg = load_config(None, [f"sketch.num_workers={workers}", "sketch.dim=64", "sketch.batch_size=4"])
        out = tmp_path / f"w{workers}"
        counts = run_sketch_stage(
            cfg, records_path=str(records), model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir), out_dir=str(out)
        )
        assert counts["n_sketches"] == 24
        uids, sketches = read_sketches(str(out / "sketches"))
        table = pq.read_table(out / "sketches").to_pandas().set_index("uid").loc[uids]
        assert np.isfinite(sketches).all() and (table["grad_norm"] > 0).all() and (table["loss"] > 0).all()
        results[workers] = (uids, sketches)
    assert results[1][0].tolist() == results[2][0].tolist() == [f"{i:04d}" for i in range(24)]
    np.testing.assert_allclose(results[1][1], results[2][1], rtol=1e-5, atol=1e-7)
