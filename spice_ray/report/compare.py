"""Compare two runs' selections: overlap, source mix, log det, eval (Markdown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spice_ray.report import analysis
from spice_ray.report.artifacts import RunArtifacts, finite, load_run
from spice_ray.report.formatting import NOT_RUN, _md, fmt, param, pct
from spice_ray.report.markdown_summary import _md_table


def overlap(a: RunArtifacts, b: RunArtifacts) -> dict[str, Any]:
    """|A|, |B|, |A ∩ B|, |A ∪ B| and Jaccard of the two selections' uid sets."""
    ua, ub = set(a.selected_uids()), set(b.selected_uids())
    inter, union = len(ua & ub), len(ua | ub)
    return {
        "a": len(ua),
        "b": len(ub),
        "intersection": inter,
        "union": union,
        "jaccard": inter / union if union else None,
        "only_a": len(ua - ub),
        "only_b": len(ub - ua),
    }


def compare_runs(run_a: str | Path, run_b: str | Path) -> str:
    """A Markdown comparison of two run roots' selections (what ``spice-ray report --compare`` prints)."""
    a, b = load_run(run_a), load_run(run_b)
    label_a, label_b = f"A ({a.root.name})", f"B ({b.root.name})"
    if label_a == label_b:
        label_a, label_b = "A", "B"
    L: list[str] = [f"# Selection comparison: {_md(a.root.name)} vs {_md(b.root.name)}", "",
                    f"- A: `{a.root}`", f"- B: `{b.root}`", ""]

    def sel_row(label: str, run: RunArtifacts) -> list[Any]:
        s = run.summary
        if run.selection is None:
            return [label, NOT_RUN, "", "", "", "", "", ""]
        return [label, s.get("method", "?"), param(s.get("alpha")), param(s.get("lam")),
                fmt(s.get("k_selected", run.selection.num_rows)), fmt(s.get("n_candidates")),
                fmt(finite(s.get("logdet"))), fmt(finite(s.get("mean_conflict")))]

    L += ["## Selections", ""]
    L += _md_table(["run", "method", "α", "λ", "selected", "of", "log det", "mean conflict"],
                   [sel_row(label_a, a), sel_row(label_b, b)], {4, 5, 6, 7})

    L += ["## Overlap", ""]
    if a.selection is None or b.selection is None:
        L += [f"selection missing in {'A' if a.selection is None else 'B'}: {NOT_RUN}", ""]
    else:
        ov = overlap(a, b)
        L += _md_table(["A", "B", "A ∩ B", "A ∪ B", "only A", "only B", "Jaccard"],
                       [[fmt(ov["a"]), fmt(ov["b"]), fmt(ov["intersection"]), fmt(ov["union"]),
                         fmt(ov["only_a"]), fmt(ov["only_b"]), fmt(ov["jaccard"])]], set(range(7)))

    L += ["## Source mix of the selections", ""]
    mix_a, mix_b = analysis.selection_source_mix(a), analysis.selection_source_mix(b)
    if mix_a is None and mix_b is None:
        L += [f"records or selection: {NOT_RUN}", ""]
    else:
        ta, tb = sum((mix_a or {}).values()), sum((mix_b or {}).values())
        names = sorted(set(mix_a or {}) | set(mix_b or {}),
                       key=lambda n: (-((mix_a or {}).get(n, 0) + (mix_b or {}).get(n, 0)), n))
        rows = []
        for n in names:
            ca = (mix_a or {}).get(n, 0) if mix_a is not None else None
            cb = (mix_b or {}).get(n, 0) if mix_b is not None else None
            rows.append([n, fmt(ca), pct(ca / ta if ca is not None and ta else None),
                         fmt(cb), pct(cb / tb if cb is not None and tb else None)])
        L += _md_table(["source", f"{label_a} n", f"{label_a} share", f"{label_b} n", f"{label_b} share"], rows, {1, 2, 3, 4})

    L += ["## Eval", ""]
    ea, eb = dict(analysis.eval_rows(a) or []), dict(analysis.eval_rows(b) or [])
    if not ea and not eb:
        L += [f"eval: {NOT_RUN} in either run", ""]
    else:
        keys = list(dict.fromkeys([*ea, *eb]))
        L += _md_table(["metric", label_a, label_b],
                       [[k, fmt(ea[k]) if k in ea else NOT_RUN, fmt(eb[k]) if k in eb else NOT_RUN] for k in keys], {1, 2})
    return "\n".join(L).rstrip() + "\n"
