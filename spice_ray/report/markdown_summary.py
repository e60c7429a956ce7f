"""The report's Markdown summary (``summary.md``): a header, then one section per function of
``MARKDOWN_SECTIONS``, each returning its lines (heading included)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from spice_ray.report.artifacts import finite
from spice_ray.report.data import ReportData
from spice_ray.report.formatting import DIAG_LABELS, NOT_RUN, _diag_value, _md, _truncate, fmt, param, pct


def _md_table(headers: list[str], rows: list[list[Any]], right: set[int] | None = None) -> list[str]:
    right = right or set()
    out = ["| " + " | ".join(_md(h) for h in headers) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return out + [""]


def _md_header(data: ReportData) -> list[str]:
    run = data.run
    s = run.summary
    L: list[str] = [f"# SPICE selection report: {_md(run.name)}", "", f"Run root: `{run.where}`", ""]
    if s:
        L += [f"Selection: method `{s.get('method', '?')}`, α = {param(s.get('alpha'))}, "
              f"λ = {param(s.get('lam'))}, ω = {param(s.get('omega'))}", ""]
    return L


def _md_stages(data: ReportData) -> list[str]:
    return ["## Stages", "", *_md_table(["stage", "status", "counts"], [[r["stage"], r["status"], r["detail"]] for r in data.stages])]


def _md_quarantine(data: ReportData) -> list[str]:
    L = ["## Quarantine", ""]
    if data.reasons:
        total = sum(data.reasons.values())
        L += _md_table(["reason", "rows", "share"], [[k, fmt(v), pct(v / total if total else None)]
                       for k, v in sorted(data.reasons.items(), key=lambda kv: (-kv[1], kv[0]))], {1, 2})
        if data.quarantine_examples:
            L += _md_table(["file", "line", "reason", "detail"], [
                [Path(str(r.get("file", ""))).name, fmt(r.get("line")), r.get("reason", ""), _truncate(r.get("detail"), 120)]
                for r in data.quarantine_examples], {1})
    elif data.run.records is None:
        L += [f"ingest: {NOT_RUN}", ""]
    else:
        L += ["No row was quarantined.", ""]
    return L


def _md_sources(data: ReportData) -> list[str]:
    L = ["## Source mix", ""]
    if data.source_mix:
        L += ["![source mix](source_mix.png)", ""]
        L += _md_table(["source", "corpus", "corpus share", "selected", "selected share", "lift"],
                       [[r["source"], fmt(r["corpus"]), pct(r["corpus_share"]), fmt(r["selected"]),
                         pct(r["selected_share"]), fmt(r["lift"], 2)] for r in data.source_mix], {1, 2, 3, 4, 5})
    else:
        L += [f"ingest: {NOT_RUN}", ""]
    return L


def _md_lengths(data: ReportData) -> list[str]:
    L = ["## Token lengths", ""]
    if data.lengths:
        L += ["![token lengths](token_lengths.png)", ""]
        rows = []
        for label, st in (("all", data.lengths["stats_all"]), ("selected", data.lengths["stats_selected"])):
            rows.append([label, fmt(st["n"]), fmt(st["mean"], 1), fmt(st["median"], 1), fmt(st["p90"], 1), fmt(st["max"], 0)]
                        if st else [label, NOT_RUN, "", "", "", ""])
        L += _md_table(["records", "n", "mean", "median", "p90", "max"], rows, {1, 2, 3, 4, 5})
    else:
        L += [f"ingest: {NOT_RUN}", ""]
    return L


def _md_selection(data: ReportData) -> list[str]:
    run = data.run
    s = run.summary
    L = ["## Selection", ""]
    if data.gain:
        L += _md_table(["selected", "of", "final log det", "mean gain", "mean conflict", "stop reason"], [[
            fmt(s.get("k_selected", run.selection.num_rows)), fmt(s.get("n_candidates")), fmt(finite(s.get("logdet"))),
            fmt(finite(s.get("mean_gain"))), fmt(finite(s.get("mean_conflict"))), s.get("stop_reason", "—")]], {0, 1, 2, 3, 4})
        L += ["![gain decay](gain_decay.png)", "", "![conflict](conflict.png)", ""]
    else:
        L += [f"select: {NOT_RUN}", ""]
    return L


def _md_logdet(data: ReportData) -> list[str]:
    L = ["## log det vs k (same sketches)", ""]
    ld = data.logdet
    if ld and "curves" in ld:
        ref = ld["final"].get("spice")
        L += ["![log det vs k](logdet_vs_k.png)", ""]
        rows = [[m + ("" if ld["origin"].get(m) == "recomputed" else f" ({ld['origin'].get(m)})"), fmt(ld["k"]), fmt(v),
                 f"{v / ref:.3f}" if ref else "—", fmt(ld["mean_conflict"][m])] for m, v in ld["final"].items()]
        rows += [[m, fmt(ld["k"]), f"skipped: {why}", "", ""] for m, why in ld["skipped"].items()]
        L += _md_table(["method", "k", "log det", "/ spice", "mean conflict"], rows, {1, 2, 3, 4})
    elif ld and "error" in ld:
        L += [f"baselines not computed: {ld['error']}", ""]
    elif data.run.sketches_path is None:
        L += [f"sketch: {NOT_RUN}", ""]
    else:
        L += ["baselines not computed", ""]
    return L


def _md_diagnostics(data: ReportData) -> list[str]:
    L = ["## Diagnostics", ""]
    dg = data.diagnostics
    if dg:
        if dg["headline"]:
            L += _md_table(["diagnostic", "value", "from"], [
                [h["label"], pct(finite(h["value"])) if h["kind"] == "fraction" else fmt(finite(h["value"])), h["key"]]
                for h in dg["headline"]], {1})
        if dg["summary"]:
            L += _md_table(["summary.json key", "value"], [[k, _diag_value(k, v)] for k, v in dg["summary"].items()], {1})
        if dg["computed"]:
            L += _md_table(["from selection.parquet", "value"],
                           [[DIAG_LABELS.get(k, k), _diag_value(k, v)] for k, v in dg["computed"].items()], {1})
    else:
        L += [f"select: {NOT_RUN}", ""]
    return L


def _md_examples(data: ReportData) -> list[str]:
    L = ["## Examples (by score)", ""]
    if data.examples:
        for title, key in (("Top", "top"), ("Bottom", "bottom")):
            if data.examples[key]:
                L += [f"### {title}", ""]
                L += _md_table(["rank", "score", "source", "prompt", "response"], [
                    [fmt(ex["rank"]), fmt(ex["score"]), ex["source"] or "—", _truncate(ex["prompt"], 160),
                     _truncate(ex["response"], 160)] for ex in data.examples[key]], {0, 1})
    else:
        L += [f"select: {NOT_RUN}", ""]
    return L


def _md_train(data: ReportData) -> list[str]:
    L = ["## Training", ""]
    if data.train:
        tr = data.train
        L += ["![training loss](train_loss.png)", ""]
        L += _md_table(["steps", "first loss", "final loss", "min loss"],
                       [[fmt(tr["steps"]), fmt(tr["first_loss"]), fmt(tr["final_loss"]), fmt(tr["min_loss"])]], {0, 1, 2, 3})
    elif data.run.stages["train"].result:
        r = next(r for r in data.stages if r["stage"] == "train")
        L += [r["detail"], ""]
    else:
        L += [f"train: {NOT_RUN}", ""]
    return L


def _md_eval(data: ReportData) -> list[str]:
    L = ["## Eval", ""]
    if data.eval:
        L += _md_table(["metric", "value"], [[k, fmt(v)] for k, v in data.eval], {1})
    else:
        L += [f"eval: {NOT_RUN}", ""]
    return L


MARKDOWN_SECTIONS: list[Callable[[ReportData], list[str]]] = [
    _md_stages, _md_quarantine, _md_sources, _md_lengths, _md_selection,
    _md_logdet, _md_diagnostics, _md_examples, _md_train, _md_eval,
]


def render_markdown(data: ReportData) -> str:
    """``summary.md``: the header, then the lines of each section of ``MARKDOWN_SECTIONS`` in order."""
    L = _md_header(data)
    for section in MARKDOWN_SECTIONS:
        L += section(data)
    return "\n".join(L).rstrip() + "\n"
