"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no global backend change).

Each function returns PNG bytes, or None when there is nothing to draw.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
COLORS = {
    "corpus": "#9aa5b1",
    "selected": "#d9480f",
    "spice": "#d9480f",
    "logdet": "#1c7ed6",
    "random": "#868e96",
    "gradnorm": "#2b8a3e",
    "base": "#adb5bd",
    "loss": "#5f3dc4",
}


def _figure(w: float = 7.5, h: float = 3.6) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, axis="y", color="#e9ecef", linewidth=0.8)
    ax.set_axisbelow(True)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def source_mix_plot(rows: list[dict[str, Any]] | None, max_sources: int = 20) -> bytes | None:
    if not rows:
        return None
    rows = rows[:max_sources]
    names = [r["source"] for r in rows]
    x = np.arange(len(rows))
    has_sel = rows[0]["selected_share"] is not None
    width = 0.4 if has_sel else 0.7
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    ax.bar(x - (width / 2 if has_sel else 0), [100 * r["corpus_share"] for r in rows], width,
           label="corpus", color=COLORS["corpus"])
    if has_sel:
        ax.bar(x + width / 2, [100 * r["selected_share"] for r in rows], width, label="selection",
               color=COLORS["selected"])
    ax.set_xticks(x, names, rotation=35 if len(rows) > 5 else 0, ha="right" if len(rows) > 5 else "center")
    ax.set_ylabel("share of records (%)")
    ax.set_title("Source mix: corpus vs selection")
    ax.legend(frameon=False)
    _style(ax)
    return _png(fig)


def token_length_plot(lengths: dict[str, Any] | None) -> bytes | None:
    if not lengths or lengths["all"].size == 0:
        return None
    all_, sel = lengths["all"], lengths["selected"]
    bins = np.histogram_bin_edges(all_, bins=min(40, max(5, int(np.sqrt(all_.size)))))
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(all_, bins=bins, density=True, color=COLORS["corpus"], alpha=0.75, label=f"all ({all_.size:,})")
    if sel is not None and sel.size:
        ax.hist(sel, bins=bins, density=True, histtype="step", linewidth=2, color=COLORS["selected"],
                label=f"selected ({sel.size:,})")
    ax.set_xlabel("tokens per record (n_tokens)")
    ax.set_ylabel("density")
    ax.set_title("Token lengths: all records vs selected")
    ax.legend(frameon=False)
    _style(ax)
    return _png(fig)


def gain_plot(curve: dict[str, Any] | None) -> bytes | None:
    if not curve or curve["gain"].size == 0:
        return None
    gain = curve["gain"]
    ranks = np.arange(1, gain.size + 1)
    fig = _figure(5.4, 3.6)
    ax = fig.add_subplot()
    if curve["base"].size == gain.size:
        ax.plot(ranks, curve["base"], color=COLORS["base"], linewidth=1, label="base b = log(1 + α‖g‖²)")
    ax.plot(ranks, gain, color=COLORS["spice"], linewidth=1.8, label="gain Δ at pick")
    if curve["threshold"] is not None:
        ax.axhline(curve["threshold"], color="#495057", linestyle="--", linewidth=1,
                   label=f"ω·Δ_first = {curve['omega']:g} × {gain[0]:.3g}")
    if curve["early_stop_at"] is not None:
        ax.axvline(curve["early_stop_at"], color="#c92a2a", linestyle=":", linewidth=1.5,
                   label=f"early stop after {curve['early_stop_at']:,} picks")
        ax.plot([curve["early_stop_at"]], [gain[-1]], "o", color="#c92a2a")
    ax.set_xlabel("pick (rank + 1)")
    ax.set_ylabel("marginal gain")
    ax.set_title("Marginal-gain decay")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    return _png(fig)


def conflict_plot(conflict: np.ndarray, score: np.ndarray | None = None) -> bytes | None:
    if conflict.size == 0:
        return None
    ranks = np.arange(1, conflict.size + 1)
    fig = _figure(5.4, 3.6)
    ax = fig.add_subplot()
    ax.plot(ranks, conflict, ".", markersize=3, color=COLORS["spice"], alpha=0.6, label="conflict c at pick")
    w = max(1, conflict.size // 20)
    if conflict.size > 2 * w > 2:
        smooth = np.convolve(conflict, np.ones(w) / w, mode="valid")
        ax.plot(ranks[w - 1 :], smooth, color="#343a40", linewidth=1.5, label=f"moving mean ({w} picks)")
    ax.set_xlabel("pick (rank + 1)")
    ax.set_ylabel("conflict max(0, −cos(g, ḡ_S))")
    ax.set_title("Conflict of each pick with the selected set")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    return _png(fig)


def logdet_plot(ld: dict[str, Any] | None) -> bytes | None:
    if not ld or not ld.get("curves"):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for m, curve in ld["curves"].items():
        if curve.size == 0:
            continue
        ax.plot(np.arange(1, curve.size + 1), curve, color=COLORS.get(m), linewidth=2.2 if m == "spice" else 1.3,
                zorder=3 if m == "spice" else 2, label=f"{m} ({curve[-1]:.2f})")
    ax.set_xlabel("k (records selected)")
    ax.set_ylabel("log det(I + α Σ g gᵀ)")
    ax.set_title(f"log det vs k on the run's sketches (N = {ld['n']:,}, d = {ld['d']})")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    return _png(fig)


def train_plot(curve: dict[str, Any] | None) -> bytes | None:
    if not curve:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(curve["step"], curve["loss"], color=COLORS["loss"], linewidth=1.6, marker="." if curve["step"].size < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    _style(ax)
    return _png(fig)
