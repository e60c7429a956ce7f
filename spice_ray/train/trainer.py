"""Driver side of the train stage: selected records → tokenized Ray Dataset → TorchTrainer.

``run_train_stage`` reads the records, keeps the selected uids, tokenizes them (response-only
labels) in an actor pool that loads the tokenizer once per actor, shuffles them once with the train
seed and materializes the result, then runs ``train_loop_per_worker`` on ``train.num_workers``
Ray Train workers with DeepSpeed.

Why materialize: the row count is known (and checked) before any worker starts, later epochs do
not re-read and re-tokenize, and no tokenizer actor competes with the train workers for CPUs while
they run (on a small machine that starves one or the other).

Layout under ``out_dir``:

    ray_train/train/   Ray Train storage: DeepSpeed checkpoints (the ``train.keep_checkpoints`` latest)
    model/             the final model, Hugging Face format (merged LoRA or full weights)
    metrics.jsonl      one line per optimizer step (step, epoch, loss, lr, tokens, elapsed_s)
    train_summary.json the returned dict

A rerun with the same ``out_dir`` resumes from the latest checkpoint (``RunConfig(name="train",
storage_path=<out_dir>/ray_train)``); within one run, ``FailureConfig(max_failures=train.max_failures)``
restarts a failed worker group (a killed process, a lost node) from the latest checkpoint. ``out_dir``
must be a path every node can write (on a multi-node cluster: shared storage), since rank 0 writes
the export there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from spice_ray.config import Config, TrainConfig

logger = logging.getLogger(__name__)

RUN_NAME = "train"


class SelectAndTokenize:
    """Ray Data UDF: keep the selected uids and tokenize them (``input_ids``, ``labels``).

    Rows whose labels are all masked (no response token survived ``max_tokens``) are dropped: they
    carry no loss and a micro-batch made only of them would give a NaN loss.
    """

    def __init__(self, tokenizer_path: str, uids_ref: Any, max_tokens: int, trust_remote_code: bool = False) -> None:
        import ray

        from spice_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        uids = ray.get(uids_ref) if isinstance(uids_ref, ray.ObjectRef) else uids_ref
        self.uids = frozenset(uids)
        self.max_tokens = max_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from spice_ray.corpus.tokenize import EncodeError, encode, encode_batch

        uids = batch.column("uid").to_pylist()
        keep = [i for i, u in enumerate(uids) if u in self.uids]
        messages = batch.column("messages").take(pa.array(keep, type=pa.int64())).to_pylist() if keep else []
        try:
            encoded = encode_batch(self.tokenizer, messages, max_tokens=self.max_tokens, loss_on="response")
        except EncodeError:
            encoded = []  # find the bad record(s): encode one by one, skip (and log) what fails
            for i, msgs in zip(keep, messages, strict=True):
                try:
                    encoded.append(encode(self.tokenizer, msgs, max_tokens=self.max_tokens, loss_on="response"))
                except EncodeError as e:
                    logger.warning("record %s skipped: %s", uids[i], e)
                    encoded.append(None)
        out_uid, out_ids, out_labels, out_n = [], [], [], []
        for i, enc in zip(keep, encoded, strict=True):
            if enc is None or enc.n_loss_tokens == 0:
                continue
            out_uid.append(uids[i])
            out_ids.append(enc.input_ids)
            out_labels.append(enc.labels)
            out_n.append(enc.n_tokens)
        return pa.table(
            {
                "uid": pa.array(out_uid, type=pa.string()),
                "input_ids": pa.array(out_ids, type=pa.list_(pa.int32())),
                "labels": pa.array(out_labels, type=pa.list_(pa.int32())),
                "n_tokens": pa.array(out_n, type=pa.int32()),
            }
        )


def _selected_uids(selection_path: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(selection_path, columns=["uid"])
    return [u for u in table.column("uid").to_pylist() if u is not None]


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _write_text(path: str, text: str) -> None:
    """Write a small text file locally (atomically) or to a pyarrow-fs URI."""
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as fh:
            fh.write(text.encode())
        return
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, dst)


def build_train_dataset(
    cfg: Config,
    *,
    records_path: str,
    selection_path: str,
    tokenizer_path: str,
    max_tokens: int = 1024,
):
    """The tokenized, shuffled and materialized train dataset and the number of selected uids."""
    import ray

    uids = _selected_uids(selection_path)
    if not uids:
        raise ValueError(f"the selection {selection_path} is empty")
    uids_ref = ray.put(frozenset(uids))
    ds = ray.data.read_parquet(_abs(records_path)).select_columns(["uid", "messages"])
    ds = ds.map_batches(
        SelectAndTokenize,
        fn_constructor_kwargs={
            "tokenizer_path": tokenizer_path,
            "uids_ref": uids_ref,
            "max_tokens": max_tokens,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.train.num_workers)),
        num_cpus=0.5,
    )
    ds = ds.random_shuffle(seed=cfg.train.seed).materialize()
    return ds, len(uids)


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
        "tokenizer_path": _abs(tokenizer_path) if os.path.exists(os.path.expanduser(tokenizer_path)) else tokenizer_path,
        "export_dir": export_dir,
        "use_gpu": bool(use_gpu),
        "pad_id": pad_id,
        "total_steps": int(total_steps),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
    }


def fit(
    cfg: Config,
    ds: Any,
    config: dict[str, Any],
    *,
    storage_path: str,
    callbacks: list[Any] | None = None,
    data_config: Any | None = None,
):
    """Run ``train_loop_per_worker`` on ``train.num_workers`` Ray Train workers; the Ray ``Result``.

    ``RunConfig(name="train", storage_path)``: a rerun with the same storage resumes from its latest
    checkpoint; ``FailureConfig(max_failures)``: a failed worker group is restarted (from the latest
    checkpoint) within this call. ``callbacks``: Ray Train ``UserCallback``s (e.g. the fault drills of
    ``spice_ray.train.faults``); ``data_config``: a ``ray.train.DataConfig`` in place of the default
    equal split.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spice_ray.train.loop import train_loop_per_worker

    tcfg = cfg.train
    kwargs: dict[str, Any] = {}
    if data_config is not None:
        kwargs["dataset_config"] = data_config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=bool(config["use_gpu"]),
            resources_per_worker={"CPU": tcfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets={"train": ds},
        **kwargs,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    _prune_unregistered_checkpoints(f"{storage_path}/{RUN_NAME}", result)
    return result


def _prune_unregistered_checkpoints(run_dir: str, result: Any) -> None:
    """Delete checkpoint directories Ray Train never registered: a worker group that died while
    a checkpoint was being reported can leave one behind, outside ``keep_checkpoints``. Ray never
    resumes from those (it resumes from its registered ones), so they only take space."""
    import shutil

    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    path = Path(run_dir)
    if "://" in run_dir or not kept or not path.is_dir():
        return
    for d in path.glob("checkpoint_*"):
        if d.is_dir() and d.name not in kept:
            logger.warning("removing %s: a checkpoint Ray Train never registered (interrupted report)", d)
            shutil.rmtree(d, ignore_errors=True)


def run_train_stage(
    cfg: Config,
    *,
    records_path: str,
    selection_path: str,
    model_path: str,
    out_dir: str,
    max_tokens: int = 1024,
    tokenizer_path: str | None = None,
    callbacks: list[Any] | None = None,
    data_config: Any | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_path`` on the selected records with Ray Train + DeepSpeed.

    ``records_path``: the ingest output (parquet with ``uid`` and ``messages``). ``selection_path``:
    the selection parquet (its ``uid`` column). ``model_path``: local directory of the target model
    (with its tokenizer unless ``tokenizer_path`` is given). ``max_tokens``: truncation length of the
    rows unless ``train.max_length`` is set. Returns the final metrics, counts, throughput, peak
    memory, wall time and the export path ``<out_dir>/model``; also writes ``metrics.jsonl`` and
    ``train_summary.json`` under ``out_dir``. Resumes from the latest checkpoint under
    ``<out_dir>/ray_train`` when one exists.
    """
    import ray

    from spice_ray.models import load_tokenizer

    t0 = time.time()
    tcfg = cfg.train
    out = _abs(out_dir)
    tokenizer_path = tokenizer_path or cfg.model.tokenizer or model_path
    use_gpu = tcfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    pad_id = load_tokenizer(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code).pad_token_id

    ds, n_selected = build_train_dataset(
        cfg,
        records_path=records_path,
        selection_path=selection_path,
        tokenizer_path=tokenizer_path,
        max_tokens=tcfg.max_length or max_tokens,
    )
    n_rows = ds.count()
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
    logger.info(
        "train: %d rows (%d selected), %d workers x %d rows, %d steps planned, ZeRO-%d, gpu=%s",
        n_rows, n_selected, tcfg.num_workers, plan["rows_per_worker"], plan["planned_steps"], tcfg.resolved_zero_stage, use_gpu,
    )

    export_dir = f"{out}/model"
    config = loop_config(
        cfg,
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        export_dir=export_dir,
        use_gpu=bool(use_gpu),
        pad_id=pad_id,
        total_steps=plan["planned_steps"],
    )
    result = fit(cfg, ds, config, storage_path=f"{out}/ray_train", callbacks=callbacks, data_config=data_config)
    ret = result.return_value
    if not ret:
        raise RuntimeError("the train loop returned nothing on rank 0")
    history = ret["history"]
    _write_text(f"{out}/metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    final = ret["final"]
    summary: dict[str, Any] = {
        "model": export_dir,
        "loss": final.get("loss"),
        "steps": final.get("step", 0),
        "epoch": final.get("epoch", 0),
        "tokens": final.get("tokens", 0),
        "planned_steps": plan["planned_steps"],
        "resumed_from_step": ret.get("resumed_from_step"),
        "n_selected": n_selected,
        "n_train_rows": n_rows,
        "world_size": ret.get("world_size"),
        "use_gpu": bool(use_gpu),
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
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "metrics": f"{out}/metrics.jsonl",
        "wall_seconds": round(time.time() - t0, 3),
    }
    _write_text(f"{out}/train_summary.json", json.dumps(summary, indent=2))
    logger.info("train: %d steps, final loss %s, model at %s", summary["steps"], summary["loss"], export_dir)
    return summary
