"""The selection report of a run root (issue #8) and the comparison of two runs.

- :func:`write_report` ``(run_root) -> Path | URI``: ``<root>/report/index.html`` (self-contained: inline
  CSS, PNGs as data URIs, no JavaScript), ``<root>/report/summary.md`` and the PNGs beside them.
- :func:`compare_runs` ``(run_a, run_b) -> str``: Markdown (overlap, source mix, log det, eval).

Every number comes from the run's artifacts (README, "What a run writes"); a stage that has not run
is shown as "not run". No Ray import.
"""

from spice_ray.report.artifacts import RunArtifacts, load_run
from spice_ray.report.compare import compare_runs
from spice_ray.report.render import ReportData, build_report, write_report

__all__ = ["ReportData", "RunArtifacts", "build_report", "compare_runs", "load_run", "write_report"]
