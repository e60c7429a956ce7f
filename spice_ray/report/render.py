"""Write the selection report of a run root: ``report/index.html`` (self-contained), ``summary.md``
and one PNG per figure, all under ``<root>/report/``.

The contents come from :mod:`spice_ray.report.data` (:func:`build_report`), the page from
:mod:`spice_ray.report.html_page` and the summary from :mod:`spice_ray.report.markdown_summary`;
number and text formatting from :mod:`spice_ray.report.formatting`. Their names are importable from
here too.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from spice_ray.report import analysis
from spice_ray.report.data import ReportData, build_report  # noqa: F401 - ReportData re-exported
from spice_ray.report.formatting import (  # noqa: F401 - re-exported: importable from render as before
    DIAG_LABELS,
    NOT_RUN,
    TEXT_LIMIT,
    TEXT_LINES,
    _diag_value,
    _h,
    _md,
    _truncate,
    fmt,
    param,
    pct,
)
from spice_ray.report.html_page import CSS, HTML_SECTIONS, render_html  # noqa: F401 - re-exported
from spice_ray.report.markdown_summary import MARKDOWN_SECTIONS, _md_table, render_markdown  # noqa: F401 - re-exported
from spice_ray.storage import Store, is_remote

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
SUMMARY_MD = "summary.md"
FIGURES = (  # every PNG a report may hold (an earlier report's extra ones are deleted)
    "source_mix.png", "token_lengths.png", "gain_decay.png", "conflict.png", "logdet_vs_k.png", "train_loss.png",
)


def write_report(
    run_root: str | Path,
    *,
    baselines: Sequence[str] = analysis.BASELINE_METHODS,
    max_gflop: float = analysis.MAX_GFLOP,
) -> Path | str:
    """Write ``<root>/report/index.html``, ``summary.md`` and the PNGs; return the HTML's path (its
    URI for a root on object storage, whose artifacts are read through a local mirror).

    ``baselines``: the methods whose log det vs k is recomputed on the run's sketches with the
    run's α, λ, seed and k. A greedy method costs about what the select stage did; one estimated
    above ``max_gflop`` is skipped (the run's own method then uses its selection.parquet trace).
    Pass ``baselines=()`` to skip the comparison altogether.
    """
    if not is_remote(str(run_root)):
        return _write_report_here(run_root, baselines=baselines, max_gflop=max_gflop)
    store = Store(str(run_root))
    with tempfile.TemporaryDirectory(prefix="spice-report-") as mirror:
        mirror_run(store, Path(mirror), sketches=bool(baselines))
        _write_report_here(mirror, baselines=baselines, max_gflop=max_gflop, location=store.uri())
        store.upload_dir(Path(mirror) / REPORT_DIR, REPORT_DIR)
    log.info("report written to %s", store.uri(f"{REPORT_DIR}/{INDEX}"))
    return store.uri(f"{REPORT_DIR}/{INDEX}")


MIRROR_FIELDS = ("records", "quarantine", "selection", "metrics", "results_file")
MIRROR_SKETCH_BYTES = 2 * 1024**3  # larger sketches stay in the bucket: no baselines then


def mirror_run(store: Store, local: Path, *, sketches: bool) -> None:
    """Copy what the report reads of a remote run root into ``local``, in the same layout: the config,
    each stage's manifest and marker, and the artifacts its result names (sketches only when asked
    for and at most ``MIRROR_SKETCH_BYTES``; never checkpoints or models)."""
    from spice_ray.pipeline import MANIFEST, MARKER, ROOT_PREFIX
    from spice_ray.report.artifacts import REPORT_STAGES

    wanted = ["config.yaml", "select/summary.json"]
    for stage in REPORT_STAGES:
        wanted += [f"{stage}/{MANIFEST}", f"{stage}/{MARKER}"]
        if not store.exists(f"{stage}/{MANIFEST}"):
            continue
        result = json.loads(store.read_text(f"{stage}/{MANIFEST}")).get("result", {})
        fields = MIRROR_FIELDS + (("sketches",) if sketches else ())
        wanted += [v[len(ROOT_PREFIX):] for k, v in result.items() if k in fields and isinstance(v, str) and v.startswith(ROOT_PREFIX)]
    for rel in dict.fromkeys(wanted):
        if rel.startswith("sketch/") and store.size(rel) > MIRROR_SKETCH_BYTES:
            log.warning("report: %s is over %d GiB; not fetched, so no baselines", store.uri(rel), MIRROR_SKETCH_BYTES >> 30)
            continue
        store.download(rel, local / rel)


def _write_report_here(root: str | Path, *, baselines: Sequence[str], max_gflop: float, location: str | None = None) -> Path:
    data = build_report(root, baselines=baselines, max_gflop=max_gflop, location=location)
    out = Store(str(data.run.root / REPORT_DIR))
    for name in FIGURES:
        if name in data.figures:
            out.write_bytes(name, data.figures[name])
        else:
            out.delete(name)  # a figure from an earlier report whose data is gone
    out.write_text(SUMMARY_MD, render_markdown(data))
    out.write_text(INDEX, render_html(data))
    index = Path(out.path(INDEX))
    log.info("report written to %s", index)
    return index
