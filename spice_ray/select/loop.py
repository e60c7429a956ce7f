"""The greedy loop every selection runs, whatever the engine: the :class:`Engine` protocol, the loop
(:func:`run_loop`: ω stop, recording) and its callbacks (:class:`Recorder`: the trace, the pick
checkpoint, ``on_step``, the progress bar).

Pure numpy, no Ray. An engine yields ``(winner, replayed)`` pairs, the canonical winner of each step
in pick order (:class:`~spice_ray.select.state.Winner`); the first ones replay the picks of a
checkpoint (``forced``, consumed from the front of the list the loop passes in). The loop decides
nothing: the engine's picks are the selection, the loop only stops before a free pick whose gain is
≤ ω × the first gain and records the rest. :class:`GroupEngine` is the engine over a
:class:`ShardGroup` (one candidate shard, per-group quota shards, or shard workers in other
processes); the factory (:mod:`spice_ray.select.factory`) builds the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from spice_ray.select.engines import CandidateShard
from spice_ray.select.resume import PickCheckpoint
from spice_ray.select.state import Winner

Picks = Iterator[tuple[Winner, bool]]


class Engine(Protocol):
    """What the greedy loop needs from an engine.

    ``picks(steps, forced)``: up to ``steps`` canonical winners in pick order as ``(winner,
    replayed)``, the first ones the picks of ``forced`` (a checkpoint's, consumed from the front;
    what is left after the run does not fit it). The loop may stop at any pick (ω), dropping the
    rest. ``stats()``: the engine's work statistics after the run (``summary.json``'s ``engine``).
    ``params``: what the engine adds to the selection's parameters (lazy, device, quota, budget).
    """

    params: dict[str, Any]

    def picks(self, steps: int, forced: list[int]) -> Picks: ...

    def stats(self) -> dict[str, Any]: ...


class ShardGroup(Protocol):
    """What the greedy driver needs from the candidates, however they are spread."""

    n: int

    def best(self) -> Winner | None: ...

    def exact(self, index: int) -> Winner: ...

    def update(self, w: Winner) -> None: ...


class LocalShards:
    """Shards in this process; ``best`` reduces their winners (max score, ties → smallest index)."""

    def __init__(self, shards: Sequence[CandidateShard]) -> None:
        self.shards = list(shards)
        self.n = sum(len(s) for s in self.shards)

    def best(self) -> Winner | None:
        best: Winner | None = None
        for shard in self.shards:
            w = shard.best()
            if w is not None and w.beats(best):
                best = w
        return best

    def exact(self, index: int) -> Winner:
        for shard in self.shards:
            if shard.local(index) is not None:
                return shard.exact(index)
        raise KeyError(f"row {index} is in no shard")

    def update(self, w: Winner) -> None:
        for shard in self.shards:
            shard.update(w.u, w.g, w.q, w.index)

    @property
    def refreshed(self) -> int:
        return sum(s.refreshed for s in self.shards)


class GroupEngine:
    """The step-by-step greedy over a :class:`ShardGroup`: each step its best (or the forced pick's
    exact values), then the update of every shard. ``stats``: the candidate-side statistics
    (``extra``, e.g. lazy and device) and the rows scored."""

    def __init__(self, group: ShardGroup, params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.group = group
        self.params = dict(params or {})
        self.extra = dict(extra or {})

    def picks(self, steps: int, forced: list[int]) -> Picks:
        for _ in range(steps):
            if forced:
                w, replayed = self.group.exact(forced.pop(0)), True
            else:
                best = self.group.best()
                if best is None:
                    return
                w, replayed = best, False
            yield w, replayed
            self.group.update(w)

    @property
    def refreshed(self) -> int:
        return int(getattr(self.group, "refreshed", 0))

    def stats(self) -> dict[str, Any]:
        return {**self.extra, "scored": self.refreshed}


class Progress:
    """A rich progress bar (steps/s, ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            class _Rate(ProgressColumn):
                def render(self, task):  # type: ignore[override]
                    speed = task.finished_speed or task.speed
                    return Text("?  steps/s" if speed is None else f"{speed:,.1f} steps/s")

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _Rate(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Recorder:
    """Collects the trace of picks; checkpoints every ``every`` picks; calls ``on_step``."""

    def __init__(
        self,
        checkpoint: PickCheckpoint | None = None,
        every: int = 1000,
        on_step: Callable[[int, int], None] | None = None,
        bar: Progress | None = None,
    ) -> None:
        self.picks: list[int] = []
        self.gains: list[float] = []
        self.conflicts: list[float] = []
        self.scores: list[float] = []
        self.rows: list[np.ndarray] = []
        self.first_gain: float | None = None
        self.checkpoint = checkpoint
        self.every = max(1, int(every))
        self.on_step = on_step
        self.bar = bar

    def record(self, w: Winner) -> None:
        self.picks.append(int(w.index))
        self.gains.append(float(w.gain))
        self.conflicts.append(float(w.conflict))
        self.scores.append(float(w.score))
        self.rows.append(w.g)
        if self.first_gain is None:
            self.first_gain = float(w.gain)
        if self.checkpoint is not None and len(self.picks) % self.every == 0:
            self.checkpoint.save(self.picks)
        if self.bar is not None:
            self.bar.step()
        if self.on_step is not None:
            self.on_step(len(self.picks) - 1, int(w.index))


def run_loop(engine: Engine, steps: int, *, omega: float | None, rec: Recorder, forced: list[int]) -> bool:
    """Record up to ``steps`` picks of ``engine``; True if stopped early by ω (before a free pick
    whose gain is ≤ ω × the first gain; replayed picks are never stopped on)."""
    for w, replayed in engine.picks(steps, forced):
        if not replayed and omega is not None and rec.first_gain is not None and w.gain <= omega * rec.first_gain:
            return True
        rec.record(w)
    return False


def run_engine(
    engine: Engine, steps: int, *, omega: float | None, rec: Recorder, forced: list[int],
    checkpoint: PickCheckpoint | None = None,
) -> bool:
    """:func:`run_loop`, then: a checkpoint's picks must all have been replayed, and the checkpoint
    is marked complete; the progress bar is closed whatever happens. True if stopped early by ω."""
    try:
        early = run_loop(engine, steps, omega=omega, rec=rec, forced=forced)
        if forced:
            raise ValueError(f"checkpoint has {len(forced)} picks that do not fit this run")
        if checkpoint is not None:
            checkpoint.save(rec.picks, complete=True)
    finally:
        if rec.bar is not None:
            rec.bar.close()
    return early
