"""What a stage asks of an executor, shared by :mod:`spice_ray.executor` (the protocol, the local
executor, ``make_executor``) and :mod:`spice_ray.ray_executor`, so neither imports the other's module
for them. Import them from :mod:`spice_ray.executor`, which re-exports them. :func:`resources_of` is
the one conversion of a config section's resource fields into a :class:`Resources`.
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


def resources_of(section: Any) -> Resources:
    """What one unit of work of a config section's stage needs: the one place where each section's
    resource fields become a :class:`Resources` (and so, in the executor, Ray's arguments). The
    sections keep their user-facing names: ``sketch.num_cpus_per_worker`` / ``num_gpus_per_worker`` /
    ``num_workers``, ``select.num_cpus`` / ``num_gpus``, ``train.cpus_per_worker`` / ``use_gpu`` /
    ``num_workers``, ``eval.num_cpus`` / ``num_gpus``; each has ``resources`` (custom Ray resources)."""
    from spice_ray.config import EvalConfig, SelectConfig, SketchConfig, TrainConfig

    if isinstance(section, SketchConfig):
        return Resources(cpus=section.num_cpus_per_worker, gpus=section.num_gpus_per_worker, workers=section.num_workers,
                         custom=section.resources)
    if isinstance(section, SelectConfig | EvalConfig):
        return Resources(cpus=section.num_cpus, gpus=section.num_gpus, custom=section.resources)
    if isinstance(section, TrainConfig):  # use_gpu None: a GPU when the executor has any
        gpus = None if section.use_gpu is None else float(section.use_gpu)
        return Resources(cpus=section.cpus_per_worker, gpus=gpus, workers=section.num_workers, custom=section.resources)
    raise TypeError(f"no resources in a {type(section).__name__}: one of the sketch, select, train and eval sections")


@dataclass(frozen=True)
class RecordBatches:
    """Records to feed a batch worker: ``records`` parquet, only ``uids`` (None: all), ``batch_size``
    rows a batch, grouped by length (``n_tokens``)."""

    records: str
    columns: tuple[str, ...]
    uids: frozenset[str] | None
    batch_size: int
