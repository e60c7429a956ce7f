"""What a stage asks of an executor, shared by :mod:`spice_ray.executor` (the protocol, the local
executor, ``make_executor``) and :mod:`spice_ray.ray_executor`, so neither imports the other's module
for them. Import them from :mod:`spice_ray.executor`, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A train worker's function, given to ``Executor.train`` as ``TorchTrainer`` is given its
# ``train_func``: ``(loop config, session) -> rank 0's result`` (``spice_ray.train.loop.run_loop``).
TrainFunc = Callable[[dict[str, Any], Any], dict[str, Any] | None]


@dataclass(frozen=True)
class Resources:
    """What one unit of a stage's work needs. ``gpus=None``: one GPU if the executor has any.
    ``custom``: custom Ray resources of each unit (``ray start --resources`` names: a node pool, a
    label); they place work on the nodes that have them, and the local executor ignores them."""

    cpus: float = 1.0
    gpus: float | None = None
    workers: int = 1
    custom: Mapping[str, float] = field(default_factory=dict, hash=False)

    @property
    def threads(self) -> int:
        """torch intra-op threads for this much CPU (Ray sets OMP_NUM_THREADS the same way)."""
        return max(1, int(self.cpus))


@dataclass(frozen=True)
class RecordBatches:
    """Records to feed a batch worker: ``records`` parquet, only ``uids`` (None: all), ``batch_size``
    rows a batch, grouped by length (``n_tokens``)."""

    records: str
    columns: tuple[str, ...]
    uids: frozenset[str] | None
    batch_size: int
