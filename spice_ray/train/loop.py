"""The per-worker train loop: DeepSpeed ZeRO on the selection, under Ray Train or in one plain process.

``run_loop(config, session)`` is the loop, the worker function the train stage hands its executor
(``executor.train(run_loop, config, ...)``, as one hands ``TorchTrainer`` its ``train_func``), with
``session`` the only thing that differs between Ray Train (:class:`RaySession`) and
one process without Ray (:class:`LocalSession`, used by ``benchmarks/train_overhead.py`` to measure
what the Ray Train wrapper costs). ``config`` is a plain dict built by
``spice_ray.train.trainer.loop_config``:

    train          TrainConfig.model_dump()
    model          ModelConfig.model_dump()
    model_path     local directory of the target model (Hugging Face layout)
    tokenizer_path directory of its tokenizer (saved beside the exported model)
    export_dir     where rank 0 writes the final model (Hugging Face format)
    use_gpu        bool, resolved on the driver
    pad_id         the tokenizer's pad id (default: the model config's, else 0)
    total_steps    optimizer steps the LR schedule spans (planned on the driver)
    torch_extensions_dir  optional cache for DeepSpeed's JIT-built C++ ops
    torch_threads  optional torch.set_num_threads (benchmarks)

``run_loop`` reads top to bottom: build the engine (:mod:`spice_ray.train.engine`), resume from the
latest checkpoint, then per epoch the micro-batches every rank runs alike
(:class:`~spice_ray.train.data.EpochBatches`), forward/backward/step on each, and at each optimizer
step the metrics (all-reduced over the ranks), a checkpoint or a metric-only report
(:class:`~spice_ray.train.session.Reporter`); at the end a last checkpoint, the run's totals and the
export (:mod:`spice_ray.train.export`).

Data (:mod:`spice_ray.train.data`): each worker reads its shard in windows of ``micro_batch_size ×
length_window`` rows; with ``group_by_length`` a window is sorted by length and cut into
micro-batches whose order is then shuffled (seeded by seed, epoch, rank and window). Before each
window the ranks all-reduce (MIN) how many micro-batches they have, run that many, and count the
rest as dropped; a rank whose shard has run out offers 0, which ends the epoch on every rank. A
resumed run skips as many micro-batches of the interrupted epoch as had been consumed.

Checkpoints (:mod:`spice_ray.train.session`): every ``checkpoint_every`` optimizer steps and at the
end, every rank calls ``engine.save_checkpoint`` into its own temporary directory (DeepSpeed writes
per-rank ZeRO shards; rank 0 also writes the module states and ``train_state.json``) and then
``ray.train.report`` with it; Ray Train merges the ranks' files into one checkpoint directory and
keeps the latest ``keep_checkpoints``. With LoRA, frozen base weights are left out
(``exclude_frozen_parameters``). On start, the latest checkpoint of the same ``RunConfig(name,
storage_path)`` (``get_checkpoint``: after a worker failure within one ``fit``, or on a rerun) is
loaded and training continues from its step, with the optimizer, LR schedule and metric history it
had.

Metric-only reports: Ray Train V2 holds one unconsumed report per worker and its controller takes
one per health check (every 2 s); a worker that reports faster blocks in ``report``. So the loop
reports metrics without a checkpoint at most every ``report_interval_s`` seconds (rank 0 decides; the
decision rides on the per-step all-reduce of the metrics) and keeps every step in its own history,
which is written to ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from spice_ray.config import ModelConfig, TrainConfig
from spice_ray.train.data import EpochBatches, TokenCounts, all_reduce, collate, micro_batches, padding_fraction
from spice_ray.train.engine import (
    DEFAULT_TORCH_EXTENSIONS_DIR,
    STALE_LOCK_S,
    build_engine,
    clear_stale_extension_locks,
    torch_extensions_dir,
)
from spice_ray.train.engine import build_model as _build_model  # noqa: F401 - tests import it from here
from spice_ray.train.export import export_model, publish_dir
from spice_ray.train.session import (
    STATE_FILE,
    LocalSession,
    Progress,
    RaySession,
    Reporter,
    local_process_group,
    ray_train_worker,
    resume,
)

logger = logging.getLogger(__name__)

# Importable from here as before the split into session, data, engine and export.
__all__ = [
    "DEFAULT_TORCH_EXTENSIONS_DIR", "STALE_LOCK_S", "STATE_FILE", "LocalSession", "RaySession", "build_engine", "clear_stale_extension_locks",
    "export_model", "local_process_group", "micro_batches", "padding_fraction", "publish_dir", "resume", "run_loop",
    "torch_extensions_dir", "train_loop_per_worker",
]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """``run_loop`` on a Ray Train worker (what the Ray executor runs, given ``run_loop``)."""
    return ray_train_worker(run_loop, config)


def run_loop(config: dict[str, Any], session: Any) -> dict[str, Any] | None:
    """One worker's loop. Returns (on rank 0) the metric history, throughput, memory and export info."""
    t_enter = time.time()
    tcfg, mcfg = set_up_worker(config, session.rank)
    rank, world_size = session.rank, session.world_size
    engine, facts = build_engine(config, world_size)
    timings = {"setup": round(time.time() - t_enter, 3)}
    logger.info("rank %d: %s engine ready in %.1f s (%d trainable params)", rank, facts["engine"], timings["setup"], facts["trainable_params"])
    state, resumed_from = resume(engine, session, tcfg, facts["total_steps"], world_size)
    if resumed_from is not None:
        logger.info("rank %d: resumed from step %d (epoch %d, batch %d)", rank, state["step"], state["epoch"], state["batches_in_epoch"])
    progress = Progress.from_state(state, tcfg)
    device = engine.device
    engine.train()
    meter = Meter(device)
    reporter = Reporter(session, engine, tcfg, checkpointed_step=resumed_from)

    while progress.epoch < tcfg.epochs and not progress.done(tcfg):
        batches = EpochBatches(session, tcfg, progress.epoch, device, skip=progress.skip)
        for window, rows in batches:
            inputs = collate(window, rows, facts["pad_id"], tcfg.max_length, device)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = train_micro_batch(engine, inputs, meter)
            if not boundary:
                continue
            progress.step = engine.global_steps
            report_due = meter.end_step(progress, lr, reporter.report_due())
            log_step(rank, progress.metrics)
            reporter.after_step(progress, batches.consumed, report_due)
            if progress.done(tcfg):
                break
        if progress.done(tcfg):  # left the epoch early (max_steps): keep the position within the epoch
            progress.skip = batches.consumed
        else:
            end_epoch(batches, progress, world_size)
        meter.dropped_rows += batches.dropped_rows

    reporter.checkpoint_unless_saved(progress)
    timings["train"] = round(time.time() - t_enter, 3)
    totals = meter.run_totals(rank)
    export = export_trained_model(engine, config, tcfg, mcfg, facts)
    timings["export"] = round(time.time() - t_enter, 3)
    logger.info("rank %d: seconds since the loop started: %s", rank, timings)
    if rank != 0:
        return None
    return {
        "timings": timings,
        "history": progress.history,
        "final": progress.metrics,
        "resumed_from_step": resumed_from,
        "trainable_params": facts["trainable_params"],
        "world_size": world_size,
        "zero_stage": facts["zero_stage"],
        "engine": facts["engine"],
        "dtype": facts["dtype"],
        "total_steps": facts["total_steps"],
        **totals,
        **export,
    }


# --------------------------------------------------------------------------------- the loop's steps


def set_up_worker(config: dict[str, Any], rank: int) -> tuple[TrainConfig, ModelConfig]:
    """This process's settings for the loop (DeepSpeed's op cache, threads, the seed); the configs."""
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir(config.get("torch_extensions_dir"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    if config.get("torch_threads"):  # benchmarks and the local executor pin it
        torch.set_num_threads(int(config["torch_threads"]))
    torch.manual_seed(tcfg.seed + rank)
    return tcfg, mcfg


def train_micro_batch(engine: Any, inputs: dict[str, torch.Tensor], meter: Meter) -> float:
    """Forward, backward and ``engine.step()`` (an optimizer step at an accumulation boundary) on
    one micro-batch; returns the LR it ran with."""
    loss = engine(**inputs).loss
    engine.backward(loss)
    lr = float(engine.get_lr()[0])  # engine.step() advances the schedule
    engine.step()
    meter.add_micro_batch(loss, inputs["attention_mask"])
    return lr


def log_step(rank: int, metrics: dict[str, Any]) -> None:
    """Rank 0 logs steps 1, 10, 20, ...; every rank stops the run on a non-finite loss."""
    step = metrics["step"]
    if rank == 0 and (step == 1 or step % 10 == 0):
        logger.info("step %d epoch %d loss %.4f lr %.3g", step, metrics["epoch"], metrics["loss"], metrics["lr"])
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")


def end_epoch(batches: EpochBatches, progress: Progress, world_size: int) -> None:
    """After an epoch run to its end: the rest of the shard read, the next epoch from its start."""
    batches.drain()
    if batches.consumed == 0:
        raise RuntimeError(
            f"epoch {progress.epoch}: a train worker's data shard is empty, so no micro-batch could run on every "
            f"worker ({world_size} workers); use fewer workers or select more records"
        )
    progress.epoch += 1
    progress.skip = 0


def export_trained_model(engine: Any, config: dict[str, Any], tcfg: TrainConfig, mcfg: ModelConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """:func:`~spice_ray.train.export.export_model` to ``config["export_dir"]`` (collective; rank 0 writes and logs)."""
    export = export_model(
        engine,
        tcfg=tcfg,
        mcfg=mcfg,
        model_path=config["model_path"],
        tokenizer_path=config.get("tokenizer_path") or config["model_path"],
        export_dir=config["export_dir"],
        dtype=facts["dtype"],
        zero_stage=facts["zero_stage"],
    )
    if "export_seconds" in export:  # rank 0
        logger.info("exported the trained model to %s in %.1f s", export["export_dir"], export["export_seconds"])
    return export


class Meter:
    """The loss and tokens of the micro-batches since the last optimizer step, and the run's totals:
    tokens, rows dropped, and (time, global tokens) after each of this process's steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.losses: list[float] = []
        self.tokens = TokenCounts()
        self.dropped_rows = 0
        self.t_start = time.time()
        self.steady: list[tuple[float, int]] = []

    def add_micro_batch(self, loss: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.losses.append(float(loss.detach()))
        self.tokens.add_micro_batch(attention_mask)

    def end_step(self, progress: Progress, lr: float, report_due: float) -> bool:
        """All-reduce the step's loss and tokens (and rank 0's ``report_due``); record the step's
        metrics in ``progress``. Returns whether a metric-only report is due."""
        loss_sum, n, real, padded, due = all_reduce(
            [sum(self.losses), len(self.losses), self.tokens.step_real, self.tokens.step_padded, report_due], self.device
        )
        progress.tokens += int(real)
        self.tokens.add_step(real, padded)
        self.losses = []
        now = time.time()
        self.steady.append((now, progress.tokens))
        progress.record({
            "step": progress.step,
            "epoch": progress.epoch,
            "loss": loss_sum / n,
            "lr": lr,
            "tokens": progress.tokens,
            "elapsed_s": round(now - self.t_start, 3),
        })
        return due > 0

    def run_totals(self, rank: int) -> dict[str, Any]:
        """Rows dropped, padding, throughput and peak memory of the run (collective)."""
        dropped, padded, real = all_reduce([self.dropped_rows, self.tokens.run_padded, self.tokens.run_real], self.device)
        if dropped:
            logger.warning("rank %d: %d rows were left out so that every rank ran the same micro-batches", rank, int(dropped))
        peak_gb, peak_kind = _peak_memory_gb(self.device)
        (peak_max,) = all_reduce([peak_gb], self.device, op="max")
        # steady-state throughput: from the end of this process's first step to its last
        tokens_per_s = step_seconds = None
        if len(self.steady) >= 2:
            (t_a, tok_a), (t_b, tok_b) = self.steady[0], self.steady[-1]
            tokens_per_s = round((tok_b - tok_a) / max(t_b - t_a, 1e-9), 1)
            step_seconds = round((t_b - t_a) / (len(self.steady) - 1), 4)
        return {
            "dropped_rows": int(dropped),
            "padding_fraction": round(1.0 - real / padded, 4) if padded else None,
            "tokens_per_s": tokens_per_s,
            "step_seconds": step_seconds,
            "steps_this_process": len(self.steady),
            "peak_memory_gb": round(peak_max, 3),
            "peak_memory_kind": peak_kind,
        }


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"  # ru_maxrss: KiB on Linux
