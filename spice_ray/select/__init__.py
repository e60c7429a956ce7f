"""Selection over gradient sketches (DESIGN §3): ``select`` is the one library entry point.

No Ray import here, nor in :mod:`spice_ray.select.job` (``select_to_dir``: read the sketches,
select, write the artifacts); the Ray shells live in :mod:`spice_ray.select.actor` (``SelectorActor``,
``run_select_stage``) and :mod:`spice_ray.select.sharded` (``ShardActor``, ``select_sharded``),
imported lazily by whoever needs them.
"""

from spice_ray.select.checkpoint import PickCheckpoint
from spice_ray.select.greedy import (
    METHODS,
    LocalShards,
    Selection,
    logdet_of,
    pool_quotas,
    select,
    select_shards,
)
from spice_ray.select.io import read_sketches
from spice_ray.select.shard import CandidateShard
from spice_ray.select.state import SelectedState, Winner

__all__ = [
    "METHODS",
    "CandidateShard",
    "LocalShards",
    "PickCheckpoint",
    "SelectedState",
    "Selection",
    "Winner",
    "logdet_of",
    "pool_quotas",
    "read_sketches",
    "select",
    "select_shards",
]
