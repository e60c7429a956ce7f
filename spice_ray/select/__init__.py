"""Selection over gradient sketches (DESIGN §3): ``select`` is the one library entry point.

Its parts: :mod:`~spice_ray.select.greedy` (``select``: validate → engine → loop),
:mod:`~spice_ray.select.factory` (which engine: the one decision), :mod:`~spice_ray.select.loop` (the
greedy loop, its callbacks, the ``Engine`` protocol), the engines (:mod:`~spice_ray.select.engines`,
:mod:`~spice_ray.select.device_engine`, :mod:`~spice_ray.select.budget`,
:mod:`~spice_ray.select.baselines`, :mod:`~spice_ray.select.quota`) and
:mod:`~spice_ray.select.selection` (the result).

No Ray import here, nor in :mod:`spice_ray.select.stage` (``select_to_dir``: read the sketches,
select, write the artifacts; ``run_select_stage``: that as one unit of work of an executor); the
only Ray module is :mod:`spice_ray.select.ray_shards` (``ShardActor``, ``select_sharded``,
``run_sharded`` for ``select.shards > 1``), imported lazily by whoever needs it.
"""

from spice_ray.select.engines import CandidateShard
from spice_ray.select.greedy import (
    METHODS,
    LocalShards,
    SelectOptions,
    Selection,
    logdet_of,
    pool_quotas,
    select,
    select_shards,
)
from spice_ray.select.io import read_sketches
from spice_ray.select.resume import PickCheckpoint
from spice_ray.select.state import SelectedState, Winner

__all__ = [
    "METHODS",
    "CandidateShard",
    "LocalShards",
    "PickCheckpoint",
    "SelectOptions",
    "SelectedState",
    "Selection",
    "Winner",
    "logdet_of",
    "pool_quotas",
    "read_sketches",
    "select",
    "select_shards",
]
