"""The report's HTML page: a header, summary cards and one section per entry of ``HTML_SECTIONS``.

The page inlines its CSS and its images (base64 ``data:`` URIs) and loads nothing else: it opens
from a file, an artifact store or an e-mail attachment the same way, without JavaScript.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spice_ray.report.artifacts import finite
from spice_ray.report.data import ReportData
from spice_ray.report.formatting import DIAG_LABELS, NOT_RUN, _diag_value, _h, _truncate, fmt, param, pct

CSS = """
:root { --fg:#212529; --muted:#6c757d; --line:#dee2e6; --accent:#d9480f; --bg:#f8f9fa; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); background:#fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 64px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 10px; margin-bottom: 18px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-top: 6px; border-top: 1px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 8px; }
.muted, .sub { color: var(--muted); font-size: 13px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
       background: var(--bg); padding: 1px 4px; border-radius: 3px; }
nav { font-size: 13px; margin: 8px 0 0; }
nav a { color: var(--accent); text-decoration: none; margin-right: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; margin: 16px 0; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.card .v { font-size: 21px; font-weight: 600; }
.card .s { font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.card .k { font-size: 12.5px; color: var(--muted); font-weight: 600; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg); font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fcfcfd; }
.status { font-size: 12px; font-weight: 600; padding: 1px 7px; border-radius: 9px; white-space: nowrap; }
.status.done { background: #d3f9d8; color: #2b8a3e; }
.status.notrun { background: #f1f3f5; color: #868e96; }
.status.other { background: #fff3bf; color: #946800; }
p.notrun { color: var(--muted); font-style: italic; background: var(--bg); border-left: 3px solid var(--line);
           padding: 8px 12px; }
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 12.5px; color: var(--muted); }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
.ex { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.ex .meta { font-size: 12px; color: var(--muted); margin-bottom: 4px; }
.ex .t { white-space: pre-wrap; word-break: break-word; font-size: 13px; margin: 2px 0; }
.ex .role { font-weight: 600; color: var(--accent); font-size: 12px; }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
"""


def _status_badge(status: str) -> str:
    cls = "done" if status == "done" else "notrun" if status == NOT_RUN else "other"
    return f'<span class="status {cls}">{_h(status)}</span>'


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f'<th class="n">{_h(h)}</th>' if i in numeric else f"<th>{_h(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(data: ReportData, name: str, alt: str, caption: str = "") -> str:
    png = data.figures.get(name)
    if png is None:
        return ""
    b64 = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_h(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_h(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _not_run(what: str) -> str:
    return f'<p class="notrun">{_h(what)}: {NOT_RUN}</p>'


def _cards(data: ReportData) -> str:
    st = {r["stage"]: r for r in data.stages}
    s = data.run.summary
    cards = []

    def card(k: str, v: str, sub: str = "") -> None:
        extra = f'<div class="s">{_h(sub)}</div>' if sub else ""
        cards.append(f'<div class="card"><div class="k">{_h(k)}</div><div class="v">{_h(v)}</div>{extra}</div>')

    ing = st["ingest"]
    card("records kept", fmt(ing["n_kept"]) if ing["n_kept"] is not None else NOT_RUN)
    card("quarantined", fmt(ing["n_quarantined"]) if ing["n_quarantined"] is not None else NOT_RUN)
    sel = st["select"]
    if sel["k_selected"] is not None:
        frac = f" ({int(sel['k_selected']) / int(sel['n_candidates']):.1%})" if sel["n_candidates"] else ""
        card("selected", fmt(sel["k_selected"]), f"of {fmt(sel['n_candidates'])}{frac}")
        card("final log det", fmt(finite(s.get("logdet"))))
        card("stop reason", str(s.get("stop_reason", "—")))
    else:
        card("selected", NOT_RUN)
    tr = st["train"]
    card("final train loss", fmt(tr["loss"]) if tr["loss"] is not None else NOT_RUN)
    return f'<div class="cards">{"".join(cards)}</div>'


def _html_stages(data: ReportData) -> Iterator[str]:
    yield _table(["stage", "status", "counts"], [[_h(r["stage"]), _status_badge(r["status"]), _h(r["detail"])] for r in data.stages])


def _html_quarantine(data: ReportData) -> Iterator[str]:
    run = data.run
    if data.reasons or data.quarantine_examples:
        total = sum(data.reasons.values())
        rows = [[f"<code>{_h(k)}</code>", fmt(v), pct(v / total if total else None)]
                for k, v in sorted(data.reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
        yield _table(["reason", "rows", "share"], rows, numeric={1, 2})
        if data.quarantine_examples:
            yield "<h3>Examples</h3>"
            yield _table(["file", "line", "reason", "detail"], [
                [f"<code>{_h(Path(str(r.get('file', ''))).name)}</code>", fmt(r.get("line")),
                 f"<code>{_h(r.get('reason', ''))}</code>", _h(_truncate(r.get("detail"), 160))]
                for r in data.quarantine_examples], numeric={1})
    elif run.stages["ingest"].status == NOT_RUN and run.records is None:
        yield _not_run("ingest")
    else:
        yield '<p class="muted">No row was quarantined.</p>'


def _html_sources(data: ReportData) -> Iterator[str]:
    if data.source_mix:
        yield _img(data, "source_mix.png", "source mix", "Share of records per source in the corpus and in the selection.")
        rows = []
        for r in data.source_mix:
            rows.append([_h(r["source"]), fmt(r["corpus"]), pct(r["corpus_share"]),
                         fmt(r["selected"]), pct(r["selected_share"]), fmt(r["lift"], 2)])
        tot_c = sum(r["corpus"] for r in data.source_mix)
        tot_s = sum(r["selected"] or 0 for r in data.source_mix) if data.source_mix[0]["selected"] is not None else None
        rows.append(["<b>total</b>", f"<b>{fmt(tot_c)}</b>", "100.0%", f"<b>{fmt(tot_s)}</b>",
                     "100.0%" if tot_s else "—", ""])
        yield _table(["source", "corpus", "corpus share", "selected", "selected share", "lift"], rows, numeric={1, 2, 3, 4, 5})
        yield '<p class="muted">lift = selected share / corpus share.</p>'
    else:
        yield _not_run("ingest")


def _html_lengths(data: ReportData) -> Iterator[str]:
    if data.lengths:
        yield _img(data, "token_lengths.png", "token length histogram")
        rows = []
        for label, st in (("all", data.lengths["stats_all"]), ("selected", data.lengths["stats_selected"])):
            if st:
                rows.append([label, fmt(st["n"]), fmt(st["mean"], 1), fmt(st["median"], 1), fmt(st["p90"], 1), fmt(st["max"], 0)])
            else:
                rows.append([label, NOT_RUN, "", "", "", ""])
        yield _table(["records", "n", "mean", "median", "p90", "max"], rows, numeric={1, 2, 3, 4, 5})
    else:
        yield _not_run("ingest")


def _html_trace(data: ReportData) -> Iterator[str]:
    run = data.run
    s = run.summary
    if data.gain:
        g = data.gain
        note = f"stop reason: <code>{_h(g['stop_reason'])}</code>"
        if g["early_stop_at"] is not None:
            note += f" after {fmt(g['early_stop_at'])} picks (of {fmt(g['k_requested'])} requested)"
        if g["threshold"] is not None:
            note += f"; threshold ω·Δ_first = {fmt(g['threshold'])}"
        yield f"<p>{note}</p>"
        yield '<div class="grid2">'
        yield _img(data, "gain_decay.png", "marginal gain decay", "Gain Δ of each pick, against its base b.")
        yield _img(data, "conflict.png", "conflict over steps", "Conflict c of each pick with the mean sketch of the picks before it.")
        yield "</div>"
        yield _table(["selected", "final log det", "mean gain", "mean conflict", "stop reason"], [[
            fmt(s.get("k_selected", run.selection.num_rows)), fmt(finite(s.get("logdet"))), fmt(finite(s.get("mean_gain"))),
            fmt(finite(s.get("mean_conflict"))), _h(s.get("stop_reason", "—"))]], numeric={0, 1, 2, 3})
    else:
        yield _not_run("select")


def _html_logdet(data: ReportData) -> Iterator[str]:
    run = data.run
    s = run.summary
    ld = data.logdet
    if ld and "curves" in ld:
        yield _img(data, "logdet_vs_k.png", "log det vs k",
                 f"Every method run by spice_ray.select.select on the same sketches, k = {ld['k']:,}, "
                 f"α = {ld['alpha']:g}, λ = {ld['lam']:g}, seed = {ld['seed']}.")
        ref = ld["final"].get("spice")
        rows = []
        for m, v in ld["final"].items():
            rel = f"{v / ref:.3f}" if ref else "—"
            how = "" if ld["origin"].get(m) == "recomputed" else f' <span class="muted">({_h(ld["origin"].get(m))})</span>'
            rows.append([f"<code>{_h(m)}</code>{how}", fmt(ld["k"]), fmt(v), rel, fmt(ld["mean_conflict"][m])])
        for m, why in ld["skipped"].items():
            rows.append([f"<code>{_h(m)}</code>", fmt(ld["k"]), f'<span class="muted">skipped: {_h(why)}</span>', "", ""])
        if ld.get("run_logdet") is not None:
            rows.append([f"this run (<code>{_h(ld.get('run_method'))}</code>, summary.json)", fmt(s.get("k_selected")),
                         fmt(ld["run_logdet"]), f"{ld['run_logdet'] / ref:.3f}" if ref else "—",
                         fmt(finite(s.get("mean_conflict")))])
        yield _table(["method", "k", "log det", "/ spice", "mean conflict"], rows, numeric={1, 2, 3, 4})
    elif ld and "error" in ld:
        yield f'<p class="notrun">baselines not computed: {_h(ld["error"])}</p>'
    elif run.sketches_path is None:
        yield _not_run("sketch")
    else:
        yield '<p class="notrun">baselines not computed (disabled)</p>'


def _html_diagnostics(data: ReportData) -> Iterator[str]:
    dg = data.diagnostics
    if dg:
        if dg["headline"]:
            cards = "".join(
                f'<div class="card"><div class="k">{_h(h["label"])}</div>'
                f'<div class="v">{_h(pct(finite(h["value"])) if h["kind"] == "fraction" else fmt(finite(h["value"])))}</div>'
                f'<div class="s">{_h(h["key"])}</div></div>'
                for h in dg["headline"]
            )
            yield f'<div class="cards">{cards}</div>'
        yield '<div class="grid2">'
        if dg["summary"]:
            yield "<div><h3>From select/summary.json</h3>"
            yield _table(["key", "value"], [[f"<code>{_h(k)}</code>", _h(_diag_value(k, v))] for k, v in dg["summary"].items()], numeric={1})
            yield "</div>"
        if dg["computed"]:
            yield "<div><h3>From the selection trace (selection.parquet)</h3>"
            yield _table(["quantity", "value"], [[_h(DIAG_LABELS.get(k, k)), _h(_diag_value(k, v))] for k, v in dg["computed"].items()], numeric={1})
            yield "</div>"
        yield "</div>"
        if dg["computed"]:
            yield ('<p class="muted">ε = Δ − b with b = log(1 + α‖g‖²); Δ ≤ b always holds in exact arithmetic '
                "(the selected set only shrinks a candidate's gain). ρ is over the picks in order; "
                "conflict is 0 for the first pick.</p>")
        if dg["engine"]:
            yield '<p class="muted">selection engine: ' + _h(", ".join(f"{k} {fmt(v)}" for k, v in dg["engine"].items())) + "</p>"
    else:
        yield _not_run("select")


def _html_examples(data: ReportData) -> Iterator[str]:
    if data.examples:
        for title, key in (("Highest score (Δ − λc)", "top"), ("Lowest score among the selected", "bottom")):
            if not data.examples[key]:
                continue
            yield f"<h3>{_h(title)}</h3>"
            for ex in data.examples[key]:
                meta = (f"rank {ex['rank']} · score {fmt(ex['score'])} · gain {fmt(ex['gain'])} · "
                        f"conflict {fmt(ex['conflict'])} · source {ex['source'] or '—'} · {fmt(ex['n_tokens'])} tokens · "
                        f"uid {ex['uid'][:12]}")
                if ex["prompt"] is None and ex["response"] is None:
                    body = '<div class="t muted">(record text not found in ingest/records.parquet)</div>'
                else:
                    more = f' <span class="muted">({ex["turns"]} messages)</span>' if ex["turns"] > 2 else ""
                    body = (f'<div class="role">user{more}</div><div class="t">{_h(_truncate(ex["prompt"]))}</div>'
                            f'<div class="role">assistant</div><div class="t">{_h(_truncate(ex["response"]))}</div>')
                yield f'<div class="ex"><div class="meta">{_h(meta)}</div>{body}</div>'
    else:
        yield _not_run("select")


def _html_train(data: ReportData) -> Iterator[str]:
    run = data.run
    tr = data.train
    tres = run.stages["train"].result
    if tr or tres:
        if tr:
            yield _img(data, "train_loss.png", "training loss")
        rows = []
        if tr:
            rows += [["steps", fmt(tr["steps"])], ["first loss", fmt(tr["first_loss"])],
                     ["final loss", fmt(tr["final_loss"])], ["min loss", fmt(tr["min_loss"])],
                     ["tokens", fmt(tr["tokens"])]]
        for k in ("planned_steps", "n_selected", "n_train_rows", "world_size", "use_gpu", "wall_seconds", "model"):
            v = tres.get(k, tres.get("model_path") if k == "model" else None)
            if v is not None:
                rows.append([k, _h(fmt(v))])
        yield _table(["", "value"], rows, numeric={1})
        if not tr:
            yield '<p class="muted">train/metrics.jsonl not found or empty.</p>'
    else:
        yield _not_run("train")


def _html_eval(data: ReportData) -> Iterator[str]:
    if data.eval:
        yield _table(["metric", "value"], [[f"<code>{_h(k)}</code>", _h(fmt(v))] for k, v in data.eval], numeric={1})
    else:
        yield _not_run("eval")


HTML_SECTIONS: list[tuple[str, str, str, Callable[[ReportData], Iterator[str]]]] = [  # anchor, nav title, heading, renderer
    ("stages", "Stages", "Stages", _html_stages),
    ("quarantine", "Quarantine", "Quarantine", _html_quarantine),
    ("sources", "Source mix", "Source mix", _html_sources),
    ("lengths", "Token lengths", "Token lengths", _html_lengths),
    ("trace", "Selection trace", "Selection trace", _html_trace),
    ("logdet", "log det vs baselines", "log det vs k: SPICE and baselines", _html_logdet),
    ("diagnostics", "Diagnostics", "Diagnostics", _html_diagnostics),
    ("examples", "Examples", "Top and bottom selected examples by score", _html_examples),
    ("train", "Training", "Training", _html_train),
    ("eval", "Eval", "Eval", _html_eval),
]


def render_html(data: ReportData) -> str:
    """The self-contained HTML page: header, cards, then one section per entry of ``HTML_SECTIONS``."""
    run = data.run
    s = run.summary
    name = run.name
    parts: list[str] = []
    add = parts.append
    params = ""
    if s:
        params = (f"method <code>{_h(s.get('method', '?'))}</code>, α = {param(s.get('alpha'))}, "
                  f"λ = {param(s.get('lam'))}, ω = {param(s.get('omega'))}")
    nav = "".join('<a href="#' + a + '">' + _h(t) + "</a>" for a, t, _, _ in HTML_SECTIONS)
    sub = f"run root <code>{_h(run.where)}</code>" + (" · " + params if params else "")
    add(f'<header><h1>SPICE selection report: {_h(name)}</h1><div class="sub">{sub}</div><nav>{nav}</nav></header>')
    add(_cards(data))
    if run.errors:
        add('<p class="notrun">unreadable artifacts: ' + _h("; ".join(run.errors)) + "</p>")

    for anchor, _, heading, section in HTML_SECTIONS:
        add(f'<h2 id="{anchor}">{_h(heading)}</h2>')
        parts.extend(section(data))

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    add(f"<footer>Generated {now} by spice_ray.report from the artifacts under <code>{_h(run.where)}</code>.</footer>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>SPICE report: {_h(name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )
