"""Driver side of the train stage: selected records → tokenized, ordered rows → the executor's train loop.

``run_train_stage`` reads the records, keeps the selected uids, tokenizes them (response-only
labels), puts them in a seeded order (``train.seed``) and writes them to ``<out_dir>/rows.parquet``:
the exact rows and order that are trained on, known (and checked) before any worker starts. The
executor then runs the worker function it is given, ``spice_ray.train.loop.run_loop``, over them:
``train.num_workers`` Ray Train workers (Ray), or one worker in this process (local). The engine is plain torch at one worker and
DeepSpeed ZeRO where sharding or offload is needed (``spice_ray.train.engine``).

Layout under ``out_dir`` (the pipeline gives every set of training inputs its own ``out_dir``):

    rows.parquet       the tokenized rows in training order
    checkpoints/       checkpoints (Ray Train storage, or the local executor's), the latest few kept
    model/             the final model, Hugging Face format (merged LoRA or full weights)
    metrics.jsonl      one line per optimizer step (step, epoch, loss, lr, tokens, elapsed_s)
    train_summary.json the returned dict

A rerun with the same ``out_dir`` resumes from its latest checkpoint; a different ``out_dir`` starts
fresh. ``out_dir`` must be a path every node can write (on a multi-node cluster: shared storage),
since rank 0 writes the export there.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.config import Config, TrainConfig
from spice_ray.executor import Executor, Resources, resources_of
from spice_ray.storage import is_uri

logger = logging.getLogger(__name__)

ROWS_FILE = "rows.parquet"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"


def tokenize_selection(table: pa.Table, tokenizer: Any, max_tokens: int) -> pa.Table:
    """``uid``, ``input_ids``, ``labels``, ``n_tokens`` of the records in ``table`` (``uid``,
    ``messages``). Rows whose labels are all masked (no response token survived ``max_tokens``) are
    left out: they carry no loss, and a micro-batch made only of them would give a NaN loss. A
    record the tokenizer refuses is skipped with a warning."""
    from spice_ray.corpus.tokenize import EncodeError, encode, encode_batch

    uids = table.column("uid").to_pylist()
    messages = table.column("messages").to_pylist()
    try:
        encoded: list[Any] = encode_batch(tokenizer, messages, max_tokens=max_tokens, loss_on="response")
    except EncodeError:
        encoded = []  # find the bad record(s): encode one by one
        for uid, msgs in zip(uids, messages, strict=True):
            try:
                encoded.append(encode(tokenizer, msgs, max_tokens=max_tokens, loss_on="response"))
            except EncodeError as e:
                logger.warning("record %s skipped: %s", uid, e)
                encoded.append(None)
    keep = [(u, e) for u, e in zip(uids, encoded, strict=True) if e is not None and e.n_loss_tokens > 0]
    return pa.table(
        {
            "uid": pa.array([u for u, _ in keep], type=pa.string()),
            "input_ids": pa.array([e.input_ids for _, e in keep], type=pa.list_(pa.int32())),
            "labels": pa.array([e.labels for _, e in keep], type=pa.list_(pa.int32())),
            "n_tokens": pa.array([e.n_tokens for _, e in keep], type=pa.int32()),
        }
    )


def _selected_uids(selection_path: str) -> list[str]:
    from spice_ray.storage import resolve_filesystem

    fs, path = resolve_filesystem(selection_path)
    table = pq.read_table(path, columns=["uid"], filesystem=fs)
    return [u for u in table.column("uid").to_pylist() if u is not None]


def training_rows(records_path: str, selection_path: str, tokenizer: Any, *, max_tokens: int, seed: int) -> tuple[pa.Table, int]:
    """The selected records tokenized, in the seeded training order; and the number of selected uids."""
    from spice_ray.executor import RecordBatches, read_record_batches
    from spice_ray.sketch.projection import stable_seed

    uids = _selected_uids(selection_path)
    if not uids:
        raise ValueError(f"the selection {selection_path} is empty")
    batches = read_record_batches(RecordBatches(records_path, ("uid", "messages"), frozenset(uids), 1 << 30))
    if not batches:
        raise ValueError(f"none of the {len(uids)} selected uids is in the records {records_path}")
    rows = tokenize_selection(pa.concat_tables(batches).sort_by("uid"), tokenizer, max_tokens)
    order = np.random.default_rng(stable_seed(seed, "train-order")).permutation(rows.num_rows)
    return rows.take(pa.array(order, pa.int64())), len(uids)


def _abs(path: str) -> str:
    """A local path made absolute (workers run elsewhere); a URI or hub id unchanged."""
    local = os.path.expanduser(path)
    return os.path.abspath(local) if not is_uri(path) and os.path.exists(local) else path


def plan_steps(n_rows: int, tcfg: TrainConfig) -> dict[str, int]:
    """Rows per worker, micro-batches per epoch and optimizer steps of a run over ``n_rows`` rows.

    ``streaming_split(equal=True)`` gives each worker floor(n_rows / num_workers) rows; the loop cuts
    them into ceil(rows / micro_batch_size) micro-batches per epoch (length windows hold whole
    micro-batches), and an optimizer step takes ``grad_accum`` of them (a partial accumulation at
    an epoch's end carries over into the next epoch).
    """
    rows_per_worker = n_rows // tcfg.num_workers
    micro_per_epoch = math.ceil(rows_per_worker / tcfg.micro_batch_size)
    steps = (micro_per_epoch * tcfg.epochs) // tcfg.grad_accum
    if tcfg.max_steps is not None:
        steps = min(steps, tcfg.max_steps)
    return {"rows_per_worker": rows_per_worker, "micro_per_epoch": micro_per_epoch, "planned_steps": steps}


def loop_config(
    cfg: Config,
    *,
    model_path: str,
    tokenizer_path: str,
    export_dir: str,
    use_gpu: bool,
    pad_id: int | None,
    total_steps: int,
) -> dict[str, Any]:
    """The plain dict ``train_loop_per_worker`` / ``run_loop`` read (see spice_ray.train.loop)."""
    return {
        "train": cfg.train.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "model_path": _abs(model_path),
        "tokenizer_path": _abs(tokenizer_path),
        "export_dir": export_dir,
        "use_gpu": bool(use_gpu),
        "pad_id": pad_id,
        "total_steps": int(total_steps),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
    }


def run_train_stage(
    cfg: Config,
    executor: Executor,
    *,
    records_path: str,
    selection_path: str,
    model_path: str,
    out_dir: str,
    max_tokens: int = 1024,
    tokenizer_path: str | None = None,
    callbacks: list[Any] | None = None,
    data_config: Any | None = None,
    resources: Resources | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` on the selected records; returns the summary (also written to
    ``<out_dir>/train_summary.json``) with the export path ``<out_dir>/model``.

    ``records_path``: the ingest output (``uid``, ``messages``). ``selection_path``: a parquet with a
    ``uid`` column. ``max_tokens``: truncation length unless ``train.max_length`` is set.
    ``callbacks`` / ``data_config``: Ray Train fault drills (Ray executor only). Resumes from the
    latest checkpoint under ``<out_dir>/checkpoints`` when one exists. ``resources``: each worker's
    (default: ``resources_of(cfg.train)``).
    """
    from spice_ray.models import load_tokenizer
    from spice_ray.storage import Store
    from spice_ray.train.loop import run_loop

    t0 = time.time()
    tcfg = cfg.train
    store = Store(out_dir)
    tokenizer_path = tokenizer_path or cfg.model.tokenizer or model_path
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    resources = resources or resources_of(tcfg)
    use_gpu = executor.gpus(resources) > 0

    rows, n_selected = training_rows(records_path, selection_path, tokenizer, max_tokens=tcfg.max_length or max_tokens, seed=tcfg.seed)
    plan = checked_plan(rows.num_rows, n_selected, tcfg)
    write_rows(store, rows)
    logger.info("train: %d rows (%d selected), %d workers x %d rows, %d steps planned, gpu=%s",
                rows.num_rows, n_selected, tcfg.num_workers, plan["rows_per_worker"], plan["planned_steps"], use_gpu)

    export_dir = f"{store.uri()}/model"
    config = loop_config(
        cfg, model_path=model_path, tokenizer_path=tokenizer_path, export_dir=export_dir, use_gpu=use_gpu,
        pad_id=tokenizer.pad_token_id, total_steps=plan["planned_steps"],
    )
    ret, checkpoint = executor.train(
        run_loop, config, rows=store.uri(ROWS_FILE), storage=store.uri(CHECKPOINTS), resources=resources,
        max_failures=tcfg.max_failures, keep=tcfg.keep_checkpoints, **fault_drills(callbacks, data_config),
    )
    store.write_text(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in ret["history"]))
    summary = train_summary(
        ret, checkpoint, store=store, tcfg=tcfg, plan=plan, n_selected=n_selected, n_rows=rows.num_rows,
        executor_name=executor.name, use_gpu=use_gpu, export_dir=export_dir, t0=t0,
    )
    store.write_text(SUMMARY_FILE, json.dumps(summary, indent=2))
    logger.info("train: %d steps, final loss %s, model at %s", summary["steps"], summary["loss"], export_dir)
    return summary


def checked_plan(n_rows: int, n_selected: int, tcfg: TrainConfig) -> dict[str, int]:
    """:func:`plan_steps` for ``n_rows`` training rows, refusing a run in which a worker would get no
    row or no optimizer step would run; a warning when selected uids gave no row."""
    if n_rows < tcfg.num_workers:
        raise ValueError(
            f"{n_rows} trainable records (of {n_selected} selected uids) for {tcfg.num_workers} train workers; "
            "check that the selection's uids are in the records and that responses survive max_tokens"
        )
    if n_rows < n_selected:
        logger.warning("%d of %d selected uids became train rows (missing from records or no response tokens)", n_rows, n_selected)
    plan = plan_steps(n_rows, tcfg)
    if plan["planned_steps"] == 0:
        raise ValueError(
            f"{n_rows} rows give {plan['micro_per_epoch']} micro-batches per worker per epoch, fewer than "
            f"grad_accum={tcfg.grad_accum} x epochs: no optimizer step would run"
        )
    return plan


def write_rows(store: Any, rows: pa.Table) -> None:
    """The training rows, in order, to ``<out_dir>/rows.parquet`` (what the executor's workers read)."""
    buf = io.BytesIO()
    pq.write_table(rows, buf)
    store.write_bytes(ROWS_FILE, buf.getvalue())


def fault_drills(callbacks: list[Any] | None, data_config: Any | None) -> dict[str, Any]:
    """The fault-drill keywords of ``executor.train`` that are set (none: the executor's defaults)."""
    extra: dict[str, Any] = {"callbacks": callbacks} if callbacks else {}
    if data_config is not None:
        extra["data_config"] = data_config
    return extra


def train_summary(
    ret: dict[str, Any],
    checkpoint: str | None,
    *,
    store: Any,
    tcfg: TrainConfig,
    plan: dict[str, int],
    n_selected: int,
    n_rows: int,
    executor_name: str,
    use_gpu: bool,
    export_dir: str,
    t0: float,
) -> dict[str, Any]:
    """``train_summary.json``: the run's outcome (rank 0's return ``ret``), its plan and where its
    files are; ``t0``: when the stage started."""
    final = ret["final"]
    return {
        "model": export_dir,
        "loss": final.get("loss"),
        "steps": final.get("step", 0),
        "epoch": final.get("epoch", 0),
        "tokens": final.get("tokens", 0),
        "planned_steps": plan["planned_steps"],
        "resumed_from_step": ret.get("resumed_from_step"),
        "n_selected": n_selected,
        "n_train_rows": n_rows,
        "executor": executor_name,
        "engine": ret.get("engine"),
        "world_size": ret.get("world_size"),
        "use_gpu": use_gpu,
        "zero_stage": ret.get("zero_stage"),
        "dtype": ret.get("dtype"),
        "lora": tcfg.lora,
        "effective_batch": tcfg.micro_batch_size * tcfg.grad_accum * tcfg.num_workers,
        "trainable_params": ret.get("trainable_params"),
        "dropped_rows": ret.get("dropped_rows"),
        "padding_fraction": ret.get("padding_fraction"),
        "tokens_per_s": ret.get("tokens_per_s"),
        "step_seconds": ret.get("step_seconds"),
        "peak_memory_gb": ret.get("peak_memory_gb"),
        "peak_memory_kind": ret.get("peak_memory_kind"),
        "export_max_abs_diff": ret.get("export_max_abs_diff"),
        "checkpoint": checkpoint,
        "metrics": store.uri(METRICS_FILE),
        "rows": store.uri(ROWS_FILE),
        "wall_seconds": round(time.time() - t0, 3),
    }
