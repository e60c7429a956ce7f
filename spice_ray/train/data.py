"""A train worker's rows: windows of its shard cut into micro-batches, the same number on every rank.

Each worker reads its shard in windows of ``micro_batch_size × length_window`` rows
(:func:`window_rows`). With ``group_by_length`` a window is sorted by length and cut into
micro-batches whose order is then shuffled (seeded by seed, epoch, rank and window), so a
micro-batch holds rows of similar length (little padding) while the order of lengths stays random
(:func:`micro_batches`).

Every rank must run the same number of micro-batches, or a ZeRO collective waits forever for a
rank that has run out of data: Ray Train's default split (``streaming_split(equal=True)``) gives
every rank the same number of rows, and :class:`EpochBatches` guards on top of that: before each
window the ranks all-reduce (MIN) how many micro-batches they have, run that many, and count the
rest as dropped; a rank whose shard has run out offers 0, which ends the epoch on every rank. Which
rows a rank gets is decided at run time (blocks go to whichever shard asks), so a resumed run skips
as many micro-batches of the interrupted epoch as had been consumed, not exactly the same rows.

:func:`collate` pads a micro-batch's token ids into tensors; :class:`TokenCounts` counts its real
and padded tokens; :func:`all_reduce` is the one collective the loop uses for its scalars.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import torch

from spice_ray.config import TrainConfig

# ------------------------------------------------------------------------------------- collectives


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """All-reduce a few scalars (a no-op at world size 1). float64 on CPU, float32 on GPU (NCCL)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in t.cpu()]


# ------------------------------------------------------------------------------------ micro-batches


def micro_batches(lengths: list[int], micro_batch_size: int, *, group: bool, rng: random.Random) -> list[list[int]]:
    """Row indices of one window's micro-batches.

    Without grouping: consecutive rows. With grouping: rows sorted by length (stable), cut into
    micro-batches, and the micro-batches' order shuffled with ``rng``. Either way every micro-batch
    but the last holds ``micro_batch_size`` rows, so the count is ceil(rows / micro_batch_size).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if group else list(range(len(lengths)))
    chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group:
        rng.shuffle(chunks)
    return chunks


def padding_fraction(lengths: list[int], chunks: list[list[int]]) -> float:
    """Share of padding tokens when ``chunks`` are right-padded to their longest row."""
    real = sum(lengths)
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks if c)
    return 1.0 - real / padded if padded else 0.0


def window_rows(tcfg: TrainConfig) -> int:
    """Rows a worker reads at a time: ``micro_batch_size`` × ``length_window`` when grouping by length."""
    return tcfg.micro_batch_size * (tcfg.length_window if tcfg.group_by_length else 1)


class EpochBatches:
    """One epoch of a worker's micro-batches, as ``(window, row indices)``; as many on every rank.

    Counts ``consumed`` (micro-batches of this epoch run, or skipped on resume: equal on every rank)
    and ``dropped_rows`` (rows left out so that every rank runs the same micro-batches). The first
    ``skip`` micro-batches (run before the checkpoint resumed from) are counted but not yielded.
    Iterating runs one all-reduce (MIN) per window, so every rank must iterate alike."""

    def __init__(self, session: Any, tcfg: TrainConfig, epoch: int, device: torch.device, *, skip: int = 0) -> None:
        self.session, self.tcfg, self.epoch, self.device, self.skip = session, tcfg, epoch, device, skip
        self.consumed = 0
        self.dropped_rows = 0
        self._windows: Iterator[dict[str, Any]] = iter(())
        self._exhausted = False

    def __iter__(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        self._windows = iter(self.session.iter_windows(window_rows(self.tcfg)))
        for w_index in itertools.count():
            window = next(self._windows, None)
            self._exhausted = window is None
            chunks = [] if window is None else self._cut(window, w_index)
            (n_common,) = all_reduce([len(chunks)], self.device, op="min")
            n_common = int(n_common)
            self.dropped_rows += sum(len(c) for c in chunks[n_common:])
            if n_common == 0:
                return
            for rows in chunks[:n_common]:
                self.consumed += 1
                if self.consumed > self.skip:
                    yield window, rows

    def _cut(self, window: dict[str, Any], w_index: int) -> list[list[int]]:
        tcfg = self.tcfg
        lengths = [len(x) for x in window["input_ids"]]
        rng = random.Random(f"{tcfg.seed}:{self.epoch}:{self.session.rank}:{w_index}")
        return micro_batches(lengths, tcfg.micro_batch_size, group=tcfg.group_by_length, rng=rng)

    def drain(self) -> None:
        """After an epoch that another rank's shard ended first: read the rest of this one (counted
        as dropped) so that the next epoch starts clean."""
        if not self._exhausted:
            for window in self._windows:
                self.dropped_rows += len(window["input_ids"])


# --------------------------------------------------------------------------------------- tokens


def collate(window: dict[str, Any], rows: list[int], pad_id: int, max_length: int | None, device: torch.device) -> dict[str, torch.Tensor]:
    """The micro-batch of ``rows`` of ``window``, cut to ``max_length`` and right-padded, on ``device``."""
    from spice_ray.corpus.tokenize import Encoded, pad_batch

    encodeds = []
    for i in rows:
        ids = [int(t) for t in window["input_ids"][i]][:max_length]
        labels = [int(t) for t in window["labels"][i]][:max_length]
        encodeds.append(Encoded(input_ids=ids, labels=labels, n_tokens=len(ids)))
    padded = pad_batch(encodeds, pad_id)
    return {k: v.to(device) for k, v in padded.items()}


class TokenCounts:
    """Real and padded tokens: of this rank's micro-batches since the last optimizer step
    (``step_real``, ``step_padded``), and of the run's steps summed over the ranks (``run_real``,
    ``run_padded``)."""

    def __init__(self) -> None:
        self.step_real = self.step_padded = 0
        self.run_real = self.run_padded = 0

    def add_micro_batch(self, attention_mask: torch.Tensor) -> None:
        self.step_real += int(attention_mask.sum())
        self.step_padded += int(attention_mask.numel())

    def add_step(self, real: float, padded: float) -> None:
        """The step's tokens summed over the ranks; starts counting the next step's."""
        self.run_real += int(real)
        self.run_padded += int(padded)
        self.step_real = self.step_padded = 0
