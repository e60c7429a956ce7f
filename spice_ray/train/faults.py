"""Fault drills for the train stage: kill a worker process, give workers unequal shards.

They exist to prove, in tests and on a real cluster before a long job, that a run survives what
production does to it:

- :class:`KillWorkerAfterCheckpoint` (a Ray Train ``UserCallback``, run by the controller) sends a
  signal (SIGKILL by default) to one train worker's process right after the run's n-th checkpoint
  has been reported, once. With ``train.max_failures >= 1`` Ray Train restarts the worker group and
  the loop resumes from the latest checkpoint; the run ends with the same number of steps.
  The worker's pid comes from the metrics the loop reports (``worker_pid``); the signal is sent from
  the controller's node, so the drill needs the worker on that node (one machine, or rank 0's node).
- :class:`UnevenShards` (a ``ray.train.DataConfig``) cuts the train dataset at fixed row counts
  instead of Ray Train's equal split, so ranks hold different numbers of rows. The loop's MIN
  all-reduce per window must then end every rank's epoch together instead of leaving one rank in a
  ZeRO collective that the others never reach.

Use: ``run_train_stage(cfg, ..., callbacks=[KillWorkerAfterCheckpoint()], data_config=UnevenShards([..]))``.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from ray.train import DataConfig, UserCallback

logger = logging.getLogger(__name__)


class KillWorkerAfterCheckpoint(UserCallback):
    """Send ``sig`` to worker ``rank``'s process after the ``after``-th reported checkpoint, once."""

    def __init__(self, rank: int = 1, after: int = 1, sig: int = signal.SIGKILL) -> None:
        self.rank = rank
        self.after = after
        self.sig = sig
        self.checkpoints_seen = 0
        self.killed_pid: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.killed_pid is not None or checkpoint is None:
            return
        self.checkpoints_seen += 1
        if self.checkpoints_seen < self.after:
            return
        rank = min(self.rank, len(metrics) - 1)
        pid = metrics[rank].get("worker_pid")
        if not pid:
            logger.warning("fault drill: rank %d reported no worker_pid; nothing killed", rank)
            return
        logger.warning("fault drill: sending signal %d to train worker rank %d (pid %d) after checkpoint %s",
                       self.sig, rank, pid, getattr(checkpoint, "path", checkpoint))
        os.kill(int(pid), self.sig)
        self.killed_pid = int(pid)


class UnevenShards(DataConfig):
    """Give rank i the rows ``[cuts[i-1], cuts[i])`` of the train dataset (``cuts`` has world_size - 1
    increasing row counts), in place of Ray Train's equal split."""

    def __init__(self, cuts: list[int]) -> None:
        super().__init__()
        self.cuts = list(cuts)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # noqa: ANN001
        if len(self.cuts) != world_size - 1:
            raise ValueError(f"UnevenShards needs {world_size - 1} cuts for {world_size} workers, got {self.cuts}")
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for i, part in enumerate(ds.split_at_indices(self.cuts)):
                output[i][name] = part.iterator()
        return output
