"""How the report writes numbers and text: thousands separators, percentages, selection parameters,
truncated example text, and escaping for HTML and for Markdown table cells."""

from __future__ import annotations

import html
from typing import Any

from spice_ray.report.artifacts import finite

TEXT_LIMIT = 400  # characters of prompt/response shown per example
TEXT_LINES = 8  # lines of prompt/response shown per example
NOT_RUN = "not run"


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers as the report shows them: ints with thousands separators, floats to ``digits``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e7):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def param(v: Any) -> str:
    """A selection parameter (α, λ, ω) as written: 1, 0.1, — for unset."""
    x = finite(v)
    return "—" if x is None else f"{x:g}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def _truncate(text: str | None, limit: int = TEXT_LIMIT, max_lines: int = TEXT_LINES) -> str:
    """At most ``limit`` characters and ``max_lines`` lines, with "…" where something was cut."""
    if text is None:
        return ""
    text = str(text)
    lines = text.split("\n")
    if len(lines) > max_lines:
        text = "\n".join(lines[:max_lines]) + "\n…"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _md(x: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines folded, raw HTML neutralised."""
    s = str(x).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


DIAG_LABELS = {
    "steps": "greedy steps",
    "gain_first": "Δ at first pick",
    "gain_last": "Δ at last pick",
    "gain_decay": "Δ_last / Δ_first",
    "eps_mean": "ε = Δ − b: mean",
    "eps_median": "ε: median",
    "eps_min": "ε: min",
    "eps_max": "ε: max",
    "bound_holds_frac": "steps with Δ ≤ b (ε ≤ 0)",
    "spearman_conflict_gain": "Spearman ρ(conflict, Δ) over picks",
    "spearman_scipy": "ρ computed with scipy",
    "conflict_mean": "mean conflict",
    "conflict_nonzero_frac": "picks with conflict > 0",
}


def _diag_value(key: str, v: Any) -> str:
    """Fractions (``*_frac``, ``*holds*``, ``*fraction*``) as percentages, the rest as numbers."""
    low = key.lower()
    if isinstance(v, float) and not isinstance(v, bool) and (low.endswith("_frac") or "holds" in low or "fraction" in low):
        return pct(v) if 0.0 <= v <= 1.0 else fmt(v)
    return fmt(v)

