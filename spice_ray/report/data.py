"""The report's contents: :class:`ReportData`, every number and figure both renderers draw from,
computed from a run root by :func:`build_report` (nothing is written here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spice_ray.report import analysis, plots
from spice_ray.report.artifacts import RunArtifacts, load_run


@dataclass
class ReportData:
    """Every number and figure of the report (what both renderers draw from)."""

    run: RunArtifacts
    stages: list[dict[str, Any]]
    reasons: dict[str, int]
    quarantine_examples: list[dict[str, Any]]
    source_mix: list[dict[str, Any]] | None
    lengths: dict[str, Any] | None
    gain: dict[str, Any] | None
    logdet: dict[str, Any] | None
    diagnostics: dict[str, Any] | None
    examples: dict[str, list[dict[str, Any]]] | None
    train: dict[str, Any] | None
    eval: list[tuple[str, Any]] | None
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG


def build_report(
    run_root: str | Path,
    *,
    baselines: Sequence[str] = analysis.BASELINE_METHODS,
    n_examples: int = 5,
    max_gflop: float = analysis.MAX_GFLOP,
    location: str | None = None,
) -> ReportData:
    """Read the run root and compute the report's contents (no files written). ``location``: the
    URI the report names when ``run_root`` is a local mirror of a remote root."""
    run = load_run(run_root)
    run.location = location
    data = ReportData(
        run=run,
        stages=analysis.stage_counts(run),
        reasons=run.quarantine_reasons(),
        quarantine_examples=run.quarantine_examples(),
        source_mix=analysis.source_mix(run),
        lengths=analysis.token_lengths(run),
        gain=analysis.gain_curve(run),
        logdet=analysis.logdet_curves(run, baselines, max_gflop=max_gflop),
        diagnostics=analysis.diagnostics(run),
        examples=analysis.examples(run, n_examples),
        train=analysis.train_curve(run),
        eval=analysis.eval_rows(run),
    )
    figs = {
        "source_mix.png": plots.source_mix_plot(data.source_mix),
        "token_lengths.png": plots.token_length_plot(data.lengths),
        "gain_decay.png": plots.gain_plot(data.gain),
        "conflict.png": plots.conflict_plot(run.column("conflict")),
        "logdet_vs_k.png": plots.logdet_plot(data.logdet if data.logdet and "curves" in data.logdet else None),
        "train_loss.png": plots.train_plot(data.train),
    }
    data.figures = {k: v for k, v in figs.items() if v is not None}
    return data
