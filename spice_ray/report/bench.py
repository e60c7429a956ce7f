"""The bench's page: ``bench/index.html`` (self-contained: inline CSS, PNGs as data URIs) with the
results table, held-out loss per arm with its seed spread, and per-source differences to the baseline."""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np

from spice_ray.report.plots import COLORS, _figure, _png, _style


def loss_plot(rows: list[dict[str, Any]], base: float, split: str) -> bytes | None:
    """Held-out loss per arm (mean ± sd over seeds), the base model as a line."""
    if not rows:
        return None
    fig = _figure(7.5, 0.45 * len(rows) + 1.4)
    ax = fig.add_subplot()
    names = [f"{r['arm']} ({r['fraction']:g})" for r in rows]
    y = np.arange(len(rows))
    colors = [COLORS.get(r["arm"].split("-")[0], "#d9480f") for r in rows]
    ax.barh(y, [r["loss"] for r in rows], xerr=[r["sd"] for r in rows], color=colors, alpha=0.85)
    ax.axvline(base, color=COLORS["base"], linestyle="--", label="base model")
    lo = min(min(r["loss"] - r["sd"] for r in rows), base)
    hi = max(max(r["loss"] + r["sd"] for r in rows), base)
    ax.set_xlim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(f"held-out loss ({split}, response tokens)")
    ax.legend(loc="lower right", frameon=False)
    _style(ax)
    return _png(fig)


def source_plot(per_source: dict[str, dict[str, float]], baseline: str) -> bytes | None:
    """Loss difference to the baseline per source (rows: arms; red: worse, blue: better)."""
    ref = next((name for name in per_source if name.startswith(f"{baseline}@")), None)
    if ref is None:
        return None
    arms = [name for name in per_source if name not in ("base", ref)]
    sources = sorted(per_source[ref])
    if not arms or not sources:
        return None
    diff = np.array([[per_source[a].get(s, np.nan) - per_source[ref][s] for s in sources] for a in arms])
    fig = _figure(1.0 + 0.7 * len(sources), 0.45 * len(arms) + 1.6)
    ax = fig.add_subplot()
    bound = float(np.nanmax(np.abs(diff))) or 1.0
    im = ax.imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(sources)), sources, rotation=40, ha="right")
    ax.set_yticks(range(len(arms)), arms)
    fig.colorbar(im, ax=ax, label=f"loss − {ref}")
    return _png(fig)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(summary: dict[str, Any], bench: Any, table_md: str) -> str:
    parts = ["<!doctype html><meta charset='utf-8'><title>spice-ray bench</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;color:#212529}"
             "pre{background:#f8f9fa;padding:1em;overflow:auto}img{max-width:100%}</style>",
             "<h1>Does the selection train a better model?</h1>",
             f"<p>Arms: {html.escape(', '.join(a.name for a in bench.arms))}; seeds {bench.seeds}; baseline "
             f"<b>{html.escape(bench.baseline)}</b>. Loss: token-weighted cross-entropy on the held-out responses.</p>",
             f"<pre>{html.escape(table_md)}</pre>"]
    for split, rows in summary["splits"].items():
        parts.append(f"<h2>{html.escape(split)}</h2>")
        parts.append(_img(loss_plot(rows, summary["base"][split], split), f"held-out loss per arm, {split}"))
        parts.append(_img(source_plot(summary["per_source"][split], bench.baseline), f"per-source difference, {split}"))
    return "\n".join(parts)


def write_bench_report(store: Any, summary: dict[str, Any], bench: Any, table_md: str) -> str:
    """``bench/index.html``: ``table_md`` (the results table) and the plots of ``summary``."""
    store.write_text("bench/index.html", render(summary, bench, table_md))
    return store.uri("bench/index.html")
