"""A train worker's view of its run, and the loop's checkpoints through it.

A session is the only thing that differs between Ray Train and one plain process: the worker's
``rank`` and ``world_size``, its rows (``iter_windows``), the latest checkpoint of the run
(``latest_checkpoint``) and ``report(metrics, checkpoint_dir)``.

- :class:`RaySession`: a Ray Train worker (its dataset shard, ``ray.train.get_checkpoint`` and
  ``ray.train.report``; Ray Train merges the ranks' checkpoint files and keeps the latest few).
- :class:`LocalSession`: one process without Ray (the local executor, tests, benchmarks): rows
  from an in-memory table, checkpoints under a local directory. The DeepSpeed engine also needs
  torch.distributed at world size 1 (:func:`local_process_group`).

Checkpoints: :class:`Reporter` has every rank call ``engine.save_checkpoint`` into its own
temporary directory (DeepSpeed writes per-rank ZeRO shards; rank 0 also writes the module states
and ``train_state.json``, the loop's :class:`Progress`) and report it; between checkpoints it
reports metrics alone at most every ``report_interval_s`` seconds (Ray Train V2 holds one
unconsumed report per worker, and a worker that reports faster blocks). :func:`resume` loads the
latest checkpoint into a fresh engine and returns the progress it saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spice_ray.config import TrainConfig
from spice_ray.storage import replace_atomically

STATE_FILE = "train_state.json"


class RaySession:
    """The loop's view of a Ray Train worker: rank, data shard, latest checkpoint, report."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._shard = ray.train.get_dataset_shard("train")

    def iter_windows(self, rows: int) -> Iterator[dict[str, Any]]:
        return self._shard.iter_batches(batch_size=rows, batch_format="numpy", prefetch_batches=1)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def ray_train_worker(train_func: Callable[[dict[str, Any], Any], Any], config: dict[str, Any]) -> Any:
    """``train_func(config, RaySession())`` with INFO logging: what ``TorchTrainer`` runs on each
    worker (torch.distributed already set up by Ray Train), with ``train_func`` bound."""
    logging.basicConfig(level=logging.INFO)
    return train_func(config, RaySession())


class LocalSession:
    """One process without Ray Train: rows from an in-memory table, checkpoints under ``ckpt_root``
    (``checkpoint_000000``, ...). The DeepSpeed engine also needs torch.distributed initialized
    (world size 1, gloo: :func:`local_process_group`); the plain-torch engine needs nothing."""

    def __init__(self, table: Any, ckpt_root: str | Path, keep: int = 2) -> None:
        self.rank, self.world_size = 0, 1
        self.columns = {name: table.column(name).to_pylist() for name in ("input_ids", "labels")}
        self.n_rows = table.num_rows
        self.root = Path(ckpt_root)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    def iter_windows(self, rows: int) -> Iterator[dict[str, Any]]:
        for start in range(0, self.n_rows, rows):
            yield {name: col[start : start + rows] for name, col in self.columns.items()}

    def _checkpoints(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*")) if self.root.exists() else []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = self._checkpoints()
        yield str(found[-1]) if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is None:
            return
        found = self._checkpoints()
        index = int(found[-1].name.rsplit("_", 1)[1]) + 1 if found else 0
        tmp = self.root / f".tmp-checkpoint_{index:06d}"  # a crash mid-copy leaves no half checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        replace_atomically(tmp, self.root / f"checkpoint_{index:06d}")
        for old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def local_process_group(rendezvous_file: str | Path) -> Iterator[None]:
    """torch.distributed with gloo at world size 1 in this process (what a ``LocalSession`` needs),
    with the environment DeepSpeed reads (RANK, LOCAL_RANK, WORLD_SIZE); undone on exit. Once per
    process: DeepSpeed caches its process groups, so engines of a later group would fail."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"file://{Path(rendezvous_file).resolve()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- progress, resume


@dataclass
class Progress:
    """Where the loop is. ``skip``: micro-batches of the current epoch already run (a checkpoint
    saves it as ``batches_in_epoch``); ``metrics``: the latest step's (``history[-1]``), or a
    placeholder with a NaN loss before the first step."""

    step: int
    epoch: int
    tokens: int
    history: list[dict[str, Any]]
    skip: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: dict[str, Any], tcfg: TrainConfig) -> Progress:
        """The progress a checkpoint's ``train_state.json`` (or a fresh run's) describes; its
        position in the interrupted epoch counted in micro-batches of this run's size."""
        history = list(state.get("history", []))
        step, epoch = int(state["step"]), int(state["epoch"])
        saved_micro_batch = int(state.get("micro_batch_size", tcfg.micro_batch_size))
        skip = math.ceil(int(state["batches_in_epoch"]) * saved_micro_batch / tcfg.micro_batch_size)
        metrics = history[-1] if history else {"step": step, "epoch": epoch, "loss": float("nan")}
        return cls(step=step, epoch=epoch, tokens=int(state["tokens"]), history=history, skip=skip, metrics=metrics)

    def done(self, tcfg: TrainConfig) -> bool:
        """Whether ``train.max_steps`` is reached."""
        return tcfg.max_steps is not None and self.step >= tcfg.max_steps

    def record(self, metrics: dict[str, Any]) -> None:
        """An optimizer step's metrics: the latest, and kept in the history."""
        self.metrics = metrics
        self.history.append(metrics)


def resume(engine: Any, session: Any, tcfg: TrainConfig, total_steps: int, world_size: int) -> tuple[dict[str, Any], int | None]:
    """The loop state of the session's latest checkpoint, loaded into ``engine`` (a fresh state if
    none); and the step resumed from (None: a fresh start)."""
    from spice_ray.train.deepspeed_config import LRSchedule
    from spice_ray.train.engine import set_schedule

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "history": []}
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is None:
            return state, None
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state.get("world_size", world_size) != world_size:
            raise RuntimeError(
                f"the checkpoint was written by {state['world_size']} workers and this run has {world_size}: "
                "DeepSpeed ZeRO shards cannot be loaded at another world size; keep train.num_workers or "
                "start a fresh run (a new out_dir)"
            )
        load_path, _ = engine.load_checkpoint(
            ckpt_dir, tag=state["tag"], load_module_strict=not tcfg.lora, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"could not load the checkpoint {state['tag']} from {ckpt_dir}")
        if engine.global_steps != state["step"]:
            raise RuntimeError(f"checkpoint step mismatch: engine {engine.global_steps} vs state {state['step']}")
    # the schedule of this run's config (a rerun may have changed max_steps or epochs)
    set_schedule(engine.lr_scheduler, LRSchedule(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler))
    return state, int(state["step"])


# -------------------------------------------------------------------------- checkpoints, reports


class Reporter:
    """One worker's checkpoints and metric-only reports to its session.

    ``checkpointed_step``: the step of the latest checkpoint (the one resumed from; None for none).
    Metric-only reports go out at most every ``report_interval_s`` seconds; rank 0 decides
    (:meth:`report_due`) and the decision reaches the other ranks with the step's all-reduce."""

    def __init__(self, session: Any, engine: Any, tcfg: TrainConfig, checkpointed_step: int | None) -> None:
        self.session, self.engine, self.tcfg = session, engine, tcfg
        self.checkpointed_step = -1 if checkpointed_step is None else checkpointed_step
        self.last_report = time.time()
        self.pid = os.getpid()  # in the reports: the fault drills find the worker's process by it

    def report_due(self) -> float:
        """1.0 on rank 0 when a metric-only report is due, else 0.0 (a value to all-reduce)."""
        return 1.0 if self.session.rank == 0 and time.time() - self.last_report >= self.tcfg.report_interval_s else 0.0

    def after_step(self, progress: Progress, batches_in_epoch: int, report_due: bool) -> None:
        """A checkpoint every ``checkpoint_every`` steps; else the metrics when a report is due."""
        if progress.step % self.tcfg.checkpoint_every == 0:
            self.checkpoint(progress, batches_in_epoch)
        elif report_due:
            self.session.report({**progress.metrics, "worker_pid": self.pid})
            self.last_report = time.time()

    def checkpoint_unless_saved(self, progress: Progress) -> None:
        """The final checkpoint, unless the latest one is of this step already."""
        if self.checkpointed_step != progress.step:
            self.checkpoint(progress, progress.skip)

    def checkpoint(self, progress: Progress, batches_in_epoch: int) -> None:
        """Every rank saves its part of the engine's state and reports it with the step's metrics."""
        tag = f"step_{progress.step:08d}"
        with tempfile.TemporaryDirectory(prefix="spice-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=self.tcfg.lora)
            if self.session.rank == 0:
                saved = {
                    "tag": tag,
                    "step": progress.step,
                    "epoch": progress.epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "tokens": progress.tokens,
                    "history": progress.history,
                    "world_size": self.session.world_size,
                    "micro_batch_size": self.tcfg.micro_batch_size,
                }
                (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            self.session.report({**progress.metrics, "worker_pid": self.pid}, tmp)
        self.checkpointed_step = progress.step
        self.last_report = time.time()
