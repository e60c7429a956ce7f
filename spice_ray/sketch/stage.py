"""The sketch stage's Ray shell: records → (Ray Data actor pool of SketchWorkers) → sketch parquet."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import ray
from ray.data import ActorPoolStrategy

from spice_ray.config import Config
from spice_ray.sketch.worker import SketchWorker

logger = logging.getLogger(__name__)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def run_sketch_stage(cfg: Config, *, records_path: str, model_path: str, tokenizer_path: str, out_dir: str) -> dict:
    """Sketch every record; write ``out_dir/sketches/*.parquet``. Returns counts for the manifest."""
    s = cfg.sketch
    num_gpus = s.num_gpus_per_worker if s.num_gpus_per_worker is not None else (1 if cluster_has_gpus() else 0)
    ds = ray.data.read_parquet(records_path).select_columns(["uid", "messages", "n_tokens"])
    n_records = ds.count()
    # Sorting by length groups records of similar length into a batch (little padding); the
    # repartition spreads the work over the actors (one parquet file would be one block).
    n_blocks = max(1, min(n_records // max(1, s.batch_size), 4 * s.num_workers))
    ds = ds.sort("n_tokens").repartition(n_blocks)
    sketches = ds.map_batches(
        SketchWorker,
        fn_constructor_kwargs=dict(
            model_path=model_path,
            tokenizer_path=tokenizer_path,
            model_cfg=cfg.model.model_dump(),
            sketch_cfg=s.model_dump(),
            max_tokens=cfg.corpus.max_tokens,
        ),
        batch_size=s.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=s.num_workers),
        num_cpus=s.num_cpus_per_worker,
        num_gpus=num_gpus,
    )
    # write_parquet appends to what is there: write into a fresh temporary directory and rename
    # it into place only once every block is written, so a crash never leaves a half set.
    final = Path(out_dir) / "sketches"
    tmp = Path(out_dir) / "sketches.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sketches.write_parquet(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    n_sketches = ray.data.read_parquet(str(final)).count()
    if n_sketches != n_records:
        raise RuntimeError(f"sketch stage wrote {n_sketches} rows for {n_records} records")
    logger.info("sketched %d records with %d actor(s), d=%d", n_records, s.num_workers, s.dim)
    return {"n_records": n_records, "n_sketches": n_sketches, "num_workers": s.num_workers, "num_gpus_per_worker": num_gpus}
