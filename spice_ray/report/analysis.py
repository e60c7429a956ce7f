"""The report's numbers, computed from a run's artifacts (no rendering here).

Each function takes :class:`~spice_ray.report.artifacts.RunArtifacts` and returns plain dicts/lists
(``None`` when the stage it needs has not run), so the HTML and Markdown renderers and the tests see
the same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spice_ray.report.artifacts import RunArtifacts, finite
from spice_ray.report.logdet import (  # noqa: F401 - the log det section, importable from here as before
    BASELINE_METHODS,
    MAX_GFLOP,
    MAX_SKETCH_BYTES,
    logdet_curves,
    method_gflop,
    sketch_shape,
)

# summary.json keys written by Selection.summary() / select_to_dir; everything else in the summary
# is treated as a diagnostic (other code may add keys; they are shown as they are).
STANDARD_SUMMARY_KEYS = frozenset(
    {
        "n_candidates", "k_requested", "k_selected", "logdet", "mean_conflict", "mean_gain",
        "stop_reason", "method", "alpha", "lam", "omega", "dim", "seed", "sketches",
        "read_seconds", "select_seconds", "selection", "engine",
    }
)


# ---------------------------------------------------------------------------------------------------
# stage counts


def stage_counts(run: RunArtifacts) -> list[dict[str, Any]]:
    """One row per stage: status and the headline counts from its manifest result."""
    rows: list[dict[str, Any]] = []
    ing = run.stages["ingest"]
    r = ing.result
    n_in, n_kept, n_q = r.get("n_in"), r.get("n_kept"), r.get("n_quarantined")
    if n_kept is None and run.records is not None:
        n_kept = run.records.num_rows
    detail = "not run"
    if n_in is not None or n_kept is not None:
        parts = []
        if n_in is not None:
            parts.append(f"{int(n_in):,} rows in")
        if n_kept is not None:
            parts.append(f"{int(n_kept):,} kept")
        if n_q is not None:
            share = f" ({int(n_q) / int(n_in):.1%})" if n_in else ""
            parts.append(f"{int(n_q):,} quarantined{share}")
        detail = ", ".join(parts)
    rows.append({"stage": "ingest", "status": _status(ing, run.records is not None), "detail": detail,
                 "n_in": n_in, "n_kept": n_kept, "n_quarantined": n_q})

    sk = run.stages["sketch"]
    r = sk.result
    n_sk, n_rec = r.get("n_sketches"), r.get("n_records")
    dim = run.summary.get("dim") or (run.config.get("sketch") or {}).get("dim")
    detail = "not run"
    if n_sk is not None:
        detail = f"{int(n_sk):,} sketches" + (f" of {int(n_rec):,} records" if n_rec is not None else "")
        if dim:
            detail += f", d = {int(dim)}"
    rows.append({"stage": "sketch", "status": _status(sk, run.sketches_path is not None), "detail": detail,
                 "n_sketches": n_sk, "dim": dim})

    se = run.stages["select"]
    s = run.summary
    k, n = s.get("k_selected"), s.get("n_candidates")
    if k is None and run.selection is not None:
        k = run.selection.num_rows
    detail = "not run"
    if k is not None:
        detail = f"{s.get('method', '?')}: {int(k):,}"
        if n:
            detail += f" of {int(n):,} ({int(k) / int(n):.1%})"
        if finite(s.get("logdet")) is not None:
            detail += f", log det {float(s['logdet']):.4f}"
        if s.get("stop_reason"):
            detail += f", stop: {s['stop_reason']}"
    rows.append({"stage": "select", "status": _status(se, run.selection is not None), "detail": detail,
                 "k_selected": k, "n_candidates": n})

    tr = run.stages["train"]
    r = tr.result
    steps = r.get("steps")
    if steps is None and run.train_metrics:
        steps = run.train_metrics[-1].get("step")
    loss = finite(r.get("loss", r.get("final_loss")))
    if loss is None and run.train_metrics:
        loss = finite(run.train_metrics[-1].get("loss"))
    detail = "not run"
    if steps is not None:
        detail = f"{int(steps):,} steps"
        if r.get("planned_steps") is not None:
            detail += f" of {int(r['planned_steps']):,} planned"
        if loss is not None:
            detail += f", final loss {loss:.4f}"
        if r.get("n_train_rows") is not None:
            detail += f", {int(r['n_train_rows']):,} train rows"
    rows.append({"stage": "train", "status": _status(tr, bool(run.train_metrics)), "detail": detail,
                 "steps": steps, "loss": loss, "model": r.get("model", r.get("model_path"))})

    ev = run.stages["eval"]
    detail = "not run" if run.eval_results is None else f"{len(run.eval_results)} results"
    rows.append({"stage": "eval", "status": _status(ev, run.eval_results is not None), "detail": detail})
    return rows


def _status(info: Any, has_artifacts: bool) -> str:
    if info.finished:
        return "done"
    if has_artifacts:
        return "artifacts only" if not info.exists or not info.manifest else "incomplete"
    return "incomplete" if info.exists else "not run"


# ---------------------------------------------------------------------------------------------------
# corpus vs selection


def _selected_mask(run: RunArtifacts) -> np.ndarray | None:
    if run.records is None or run.selection is None:
        return None
    sel = pa.array(run.selected_uids(), type=pa.string())
    return pc.is_in(run.records.column("uid").combine_chunks(), value_set=sel).to_numpy(zero_copy_only=False)


def source_mix(run: RunArtifacts) -> list[dict[str, Any]] | None:
    """Per source: records in the corpus and in the selection, counts and shares (corpus order)."""
    if run.records is None or "source" not in run.records.column_names:
        return None
    sources = np.asarray(run.records.column("source").to_pylist(), dtype=object)
    mask = _selected_mask(run)
    names, counts = np.unique(sources.astype(str), return_counts=True)
    total = int(counts.sum())
    sel_total = int(mask.sum()) if mask is not None else 0
    sel_counts = dict(zip(*np.unique(sources[mask].astype(str), return_counts=True), strict=True)) if mask is not None and sel_total else {}
    rows = []
    for name, c in zip(names, counts, strict=True):
        s = int(sel_counts.get(name, 0))
        share = c / total if total else 0.0
        sel_share = s / sel_total if sel_total else 0.0
        rows.append({
            "source": str(name),
            "corpus": int(c),
            "corpus_share": share,
            "selected": s if mask is not None else None,
            "selected_share": sel_share if mask is not None else None,
            "lift": (sel_share / share) if (mask is not None and share > 0 and sel_total) else None,
        })
    rows.sort(key=lambda r: (-r["corpus"], r["source"]))
    return rows


def selection_source_mix(run: RunArtifacts) -> dict[str, int] | None:
    """Source -> number of selected records (from the run's own records)."""
    mask = _selected_mask(run)
    if mask is None or "source" not in run.records.column_names:
        return None
    sources = np.asarray(run.records.column("source").to_pylist(), dtype=object)[mask].astype(str)
    names, counts = np.unique(sources, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def token_lengths(run: RunArtifacts) -> dict[str, Any] | None:
    """``n_tokens`` of all records and of the selected ones, with summary statistics."""
    if run.records is None or "n_tokens" not in run.records.column_names:
        return None
    all_ = run.records.column("n_tokens").to_numpy(zero_copy_only=False).astype(np.float64)
    mask = _selected_mask(run)
    sel = all_[mask] if mask is not None else None

    def stats(x: np.ndarray | None) -> dict[str, float] | None:
        if x is None or x.size == 0:
            return None
        return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
                "p90": float(np.percentile(x, 90)), "max": float(x.max())}

    return {"all": all_, "selected": sel, "stats_all": stats(all_), "stats_selected": stats(sel)}


# ---------------------------------------------------------------------------------------------------
# selection trace and diagnostics


def gain_curve(run: RunArtifacts) -> dict[str, Any] | None:
    """Gain over rank, and where/why the greedy stopped (the early-stop threshold when ω is set)."""
    gains = run.column("gain")
    if run.selection is None:
        return None
    omega = finite(run.select_param("omega"))
    stop = run.summary.get("stop_reason")
    threshold = omega * float(gains[0]) if (omega is not None and gains.size) else None
    return {
        "gain": gains,
        "base": run.column("base"),
        "stop_reason": stop,
        "omega": omega,
        "threshold": threshold,
        "early_stop_at": int(gains.size) if stop == "early_stop" else None,
        "k_requested": run.summary.get("k_requested"),
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's ρ (average ranks for ties); None when undefined (fewer than 3 points, constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    try:
        from scipy.stats import spearmanr
    except ImportError:
        rx, ry = _average_ranks(x), _average_ranks(y)
        rx -= rx.mean()
        ry -= ry.mean()
        return float((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)))
    rho = spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else None


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (what Spearman's ρ uses)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diagnostics(run: RunArtifacts) -> dict[str, Any] | None:
    """ε = gain − base, the Δ ≤ b bound, Spearman ρ(conflict, gain), from the selection trace;
    plus every diagnostic summary.json holds (keys beyond the standard summary, shown verbatim)."""
    if run.selection is None and not run.summary:
        return None
    from_summary = {
        k: v for k, v in _flatten({k: v for k, v in run.summary.items() if k not in STANDARD_SUMMARY_KEYS}).items()
        if isinstance(v, int | float | str | bool) or v is None
    }
    computed: dict[str, Any] = {}
    gain, base, conflict = run.column("gain"), run.column("base"), run.column("conflict")
    if gain.size:
        computed["steps"] = int(gain.size)
        computed["gain_first"] = float(gain[0])
        computed["gain_last"] = float(gain[-1])
        computed["gain_decay"] = float(gain[-1] / gain[0]) if gain[0] > 0 else None
    if gain.size and base.size == gain.size:
        eps = gain - base
        computed["eps_mean"] = float(eps.mean())
        computed["eps_median"] = float(np.median(eps))
        computed["eps_min"] = float(eps.min())
        computed["eps_max"] = float(eps.max())
        # Δ_i(S) ≤ b_i always (M⁻¹ ⪯ I), so ε ≤ 0 up to rounding; the tolerance absorbs float error
        tol = 1e-9 * np.maximum(1.0, np.abs(base))
        computed["bound_holds_frac"] = float(np.mean(eps <= tol))
    if gain.size and conflict.size == gain.size:
        computed["spearman_conflict_gain"] = spearman(conflict, gain)
        computed["spearman_scipy"] = _has_scipy()
        computed["conflict_mean"] = float(conflict.mean())
        computed["conflict_nonzero_frac"] = float(np.mean(conflict > 0))
    return {
        "computed": computed,
        "summary": from_summary,
        "headline": _headline(from_summary, computed),
        "engine": _flatten(run.summary["engine"]) if isinstance(run.summary.get("engine"), dict) else {},
    }


def _find(d: dict[str, Any], *needles: str) -> tuple[str, Any] | None:
    """The first ``(key, value)`` of ``d`` whose key contains every needle (case-insensitive)."""
    for key, value in d.items():
        if all(n in key.lower() for n in needles) and value is not None:
            return key, value
    return None


def _headline(from_summary: dict[str, Any], computed: dict[str, Any]) -> list[dict[str, Any]]:
    """The three numbers the diagnostics are about, from summary.json when it has them.

    Each: ``label``, ``value``, ``key`` (where it came from), ``kind`` ("fraction" or "number").
    """
    out = []
    hit = _find(from_summary, "spearman")
    if hit:
        out.append({"label": "Spearman ρ(conflict, Δ)", "key": f"summary.json: {hit[0]}", "value": hit[1], "kind": "number"})
    elif computed.get("spearman_conflict_gain") is not None:
        out.append({"label": "Spearman ρ(conflict, Δ)", "key": "selection.parquet", "value": computed["spearman_conflict_gain"], "kind": "number"})
    hit = _find(from_summary, "bound", "hold")
    if hit:
        out.append({"label": "steps where the ε bound holds", "key": f"summary.json: {hit[0]}", "value": hit[1], "kind": "fraction"})
    elif computed.get("bound_holds_frac") is not None:
        out.append({"label": "steps with Δ ≤ b (ε ≤ 0)", "key": "selection.parquet", "value": computed["bound_holds_frac"], "kind": "fraction"})
    hit = _find(from_summary, "curvature")
    if hit:
        out.append({"label": "curvature", "key": f"summary.json: {hit[0]}", "value": hit[1], "kind": "number"})
    return out


def _has_scipy() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return False
    return True


def examples(run: RunArtifacts, n: int = 5) -> dict[str, list[dict[str, Any]]] | None:
    """The top and bottom ``n`` selected records by ``score``, with their prompt and response."""
    if run.selection is None or run.selection.num_rows == 0:
        return None
    score = run.column("score")
    if score.size == 0:
        return None
    order = np.argsort(-score, kind="stable")
    top = order[:n].tolist()
    bottom = [i for i in order[::-1][:n].tolist() if i not in set(top)]  # lowest first, none twice
    uids = run.selected_uids()
    gain, conflict, rank = run.column("gain"), run.column("conflict"), run.column("rank")
    texts = run.records_messages([uids[i] for i in top + bottom])

    def row(i: int) -> dict[str, Any]:
        rec = texts.get(uids[i], {})
        prompt, response, turns = split_chat(rec)
        return {
            "uid": uids[i],
            "rank": int(rank[i]) if rank.size else i,
            "score": float(score[i]),
            "gain": float(gain[i]) if gain.size else None,
            "conflict": float(conflict[i]) if conflict.size else None,
            "source": rec.get("source"),
            "n_tokens": rec.get("n_tokens"),
            "prompt": prompt,
            "response": response,
            "turns": turns,
        }

    return {"top": [row(i) for i in top], "bottom": [row(i) for i in bottom]}


def split_chat(rec: dict[str, Any]) -> tuple[str | None, str | None, int]:
    """First user message, the assistant reply after it, and the number of messages."""
    messages = rec.get("messages")
    if not messages:
        return rec.get("prompt"), rec.get("response"), 2 if rec.get("prompt") is not None else 0
    prompt = response = None
    for j, m in enumerate(messages):
        if m.get("role") == "user":
            prompt = m.get("content")
            for m2 in messages[j + 1 :]:
                if m2.get("role") == "assistant":
                    response = m2.get("content")
                    break
            break
    return prompt, response, len(messages)


# ---------------------------------------------------------------------------------------------------
# train / eval


def train_curve(run: RunArtifacts) -> dict[str, Any] | None:
    """Loss over steps from ``train/metrics.jsonl`` (rows without a finite loss are skipped)."""
    pts = [(finite(m.get("step")), finite(m.get("loss"))) for m in run.train_metrics]
    pts = [(s, v) for s, v in pts if s is not None and v is not None]
    if not pts:
        return None
    steps = np.array([p[0] for p in pts])
    loss = np.array([p[1] for p in pts])
    lr = [finite(m.get("lr")) for m in run.train_metrics if finite(m.get("loss")) is not None]
    return {
        "step": steps,
        "loss": loss,
        "lr": np.array([x if x is not None else np.nan for x in lr]) if any(x is not None for x in lr) else None,
        "first_loss": float(loss[0]),
        "final_loss": float(loss[-1]),
        "min_loss": float(loss.min()),
        "steps": int(steps[-1]),
        "tokens": run.train_metrics[-1].get("tokens"),
    }


def eval_rows(run: RunArtifacts) -> list[tuple[str, Any]] | None:
    """Scalar eval results as ``(key, value)`` pairs (nested dicts flattened with dots)."""
    if run.eval_results is None:
        return None
    flat = _flatten(run.eval_results)
    return [(k, v) for k, v in flat.items() if isinstance(v, int | float | str | bool) or v is None]
