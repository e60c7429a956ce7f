"""Determinism (issue #7): the same config and seed give the same sketches, bit for bit, and the same
picks, whatever the number of sketch workers and whatever the order of the input rows.

A record's sketch must not depend on its batch mates: the stage's batches differ with the worker
count (the repartition) and with the input order (ties of the length sort), and each record is
padded to a width set by its own length (``sketch.worker.padded_width``), never by its batch's
longest record, so the reductions over the sequence see the same shapes wherever it lands.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq

from spice_ray.config import load_config
from spice_ray.corpus import generate_demo_corpus
from spice_ray.pipeline import run_pipeline
from spice_ray.select import read_sketches

N_ROWS = 100


def test_a_records_sketch_does_not_depend_on_its_batch_mates(tiny_model_dir):
    """The worker alone (no Ray): any batching of the same records gives the same sketches, bit for bit."""
    import pyarrow as pa
    import torch

    from spice_ray.config import ModelConfig, SketchConfig
    from spice_ray.corpus import canonical_uid, normalize_row
    from spice_ray.sketch.worker import SketchWorker

    chats = [normalize_row(r) for r in generate_demo_corpus(n=48, seed=3)]
    chats = list({canonical_uid(m): m for m in chats}.values())
    table = pa.table({"uid": [canonical_uid(m) for m in chats], "messages": chats})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a sketch actor of <= 1 CPU
    try:
        worker = SketchWorker(
            model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir), model_cfg=ModelConfig().model_dump(),
            sketch_cfg=SketchConfig(dim=64).model_dump(), max_tokens=1024,
        )

        def sketch(batches) -> dict[str, np.ndarray]:
            out = {}
            for idx in batches:
                t = worker(table.take(idx))
                out.update(zip(t.column("uid").to_pylist(), np.asarray(t.column("sketch").to_pylist(), np.float32)))
            return out

        n = table.num_rows
        ref = sketch([list(range(n))])
        record_sub_batches = worker.stats["sub_batches"]
        perm = np.random.default_rng(0).permutation(n).tolist()
        for size in (1, 3, 7):
            got = sketch([perm[i : i + size] for i in range(0, n, size)])
            differ = [u for u in ref if not np.array_equal(ref[u], got[u])]
            assert not differ, f"batches of {size}: {len(differ)} of {n} sketches differ"

        # sketch.padding=batch (the GPU setting): pads to each sub-batch's longest record instead,
        # in fewer sub-batches; the same sketches up to float rounding
        worker = SketchWorker(
            model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir), model_cfg=ModelConfig().model_dump(),
            sketch_cfg=SketchConfig(dim=64, padding="batch").model_dump(), max_tokens=1024,
        )
        got = sketch([list(range(n))])
        assert worker.stats["sub_batches"] < record_sub_batches
        for u in ref:
            np.testing.assert_allclose(got[u], ref[u], rtol=1e-4, atol=1e-6 * np.abs(ref[u]).max())
        # ... which the sketch cache keeps apart
        from spice_ray.config import load_config
        from spice_ray.sketch.stage import sketch_spec, spec_hash

        def key(padding: str) -> str:
            cfg = load_config(None, ["sketch.dim=64", f"sketch.padding={padding}"])
            path = str(tiny_model_dir)
            return spec_hash(sketch_spec(cfg, model_path=path, tokenizer_path=path, model_fingerprint="m", state_path=None)[0])

        assert key("record") != key("batch")
    finally:
        torch.set_num_threads(threads)


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(root, corpus, *extra):
    cfg = load_config(
        None,
        [
            f"run.root={root}", f"corpus.paths=[{corpus}]", "sketch.dim=64", "sketch.batch_size=8",
            "sketch.fidelity_sample=0", "select.fraction=0.2", "run.stages=[ingest,sketch,select]", *extra,
        ],
    )
    outcomes = run_pipeline(cfg)
    uids, G = read_sketches(str(root / "sketch" / "sketches"))
    sketches = pq.read_table(root / "sketch" / "sketches").sort_by("uid")
    return {
        "uids": uids.tolist(),
        "G": G,
        "loss": sketches.column("loss").to_numpy(),
        "grad_norm": sketches.column("grad_norm").to_numpy(),
        "selection": pq.read_table(root / "select" / "selection.parquet"),
        "record_order": pq.read_table(root / "ingest" / "records.parquet", columns=["uid"]).column("uid").to_pylist(),
        "workers": outcomes["sketch"].manifest["result"]["num_workers"],
    }


def test_same_sketches_and_picks_for_any_worker_count_and_input_order(ray_session, tmp_path):
    rows = generate_demo_corpus(n=N_ROWS, seed=0)
    orders = {
        "forward": rows,
        "shuffled": random.Random(7).sample(rows, len(rows)),
        "reversed": rows[::-1],
    }
    runs = {}
    for (name, ordered), workers in zip(orders.items(), (1, 2, 4)):
        corpus = tmp_path / f"{name}.jsonl"
        _write(corpus, ordered)
        extra = [f"sketch.num_workers={workers}"] + (["sketch.num_cpus_per_worker=0.25"] if workers == 4 else [])
        runs[(name, workers)] = _run(tmp_path / f"run-{name}-{workers}", corpus, *extra)

    (ref_key, ref), *others = runs.items()
    assert ref["workers"] == 1 and len(ref["uids"]) > 0.9 * N_ROWS
    for key, run in others:
        assert run["workers"] == key[1]
        assert run["record_order"] != ref["record_order"]  # the input order did change
        assert sorted(run["record_order"]) == sorted(ref["record_order"])
        assert run["uids"] == ref["uids"], key  # same records
        differ = [u for u, a, b in zip(ref["uids"], ref["G"], run["G"]) if not np.array_equal(a, b)]
        assert not differ, f"{key}: {len(differ)} of {len(ref['uids'])} sketches differ from {ref_key}"
        assert np.array_equal(run["loss"], ref["loss"]) and np.array_equal(run["grad_norm"], ref["grad_norm"])
        assert run["selection"].equals(ref["selection"]), key  # same picks, gains and trace
