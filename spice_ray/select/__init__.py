"""Selection over gradient sketches (DESIGN §3): ``select`` is the one library entry point.

No Ray import here; the Ray shell lives in :mod:`spice_ray.select.actor` (``SelectorActor``,
``run_select_stage``), imported lazily by whoever needs it.
"""

from spice_ray.select.greedy import METHODS, Selection, logdet_of, select
from spice_ray.select.io import read_sketches

__all__ = ["METHODS", "Selection", "logdet_of", "read_sketches", "select"]
