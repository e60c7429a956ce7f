"""A synthetic run root in the README's layout, for the report's tests (no model, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spice_ray.storage import STAGE_MARKER

REPORT_SOURCES = {"arithmetic": 50, "capitals": 30, "noisy": 20, "sort_list": 20}  # 120 records
_REPORT_D = 12
REPORT_SCRIPT_PROMPT = "What does <script>alert('x')</script> & co print?"


def _report_uid(i: int) -> str:
    return f"{i:04d}" + "ab" * 30  # 64 hex-ish chars, sorted by i


def report_messages(i: int, source: str) -> list[dict[str, str]]:
    if i == 3:
        prompt = REPORT_SCRIPT_PROMPT
    else:
        prompt = f"[{source}] question number {i}: what is {i} plus {i}?"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"answer {2 * i} from {source}"}]


def make_report_run(
    root: Path,
    *,
    k: int = 24,
    method: str = "spice",
    lam: float = 0.1,
    omega: float | None = None,
    sketch_seed: int = 0,
    stages: tuple[str, ...] = ("ingest", "sketch", "select", "train"),
) -> Path:
    """A small synthetic run root in the README's layout (records, quarantine, sketches, selection,
    manifests, train metrics) for the report's tests: 120 records of four sources, no model, no Ray."""
    rng = np.random.default_rng(sketch_seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(f"select:\n  alpha: 1.0\n  lam: {lam}\n  seed: 0\n  method: {method}\n")
    uids, sources, messages, n_tokens = [], [], [], []
    i = 0
    for source, count in REPORT_SOURCES.items():
        for _ in range(count):
            uids.append(_report_uid(i))
            sources.append(source)
            messages.append(report_messages(i, source))
            n_tokens.append(int(20 + (i * 7) % 90 + (60 if source == "noisy" else 0)))
            i += 1
    if "ingest" in stages:
        _report_ingest(root, uids, sources, messages, n_tokens)
    if "sketch" in stages:
        _report_sketches(root, rng, uids, sources, n_tokens)
    if "select" in stages:
        from spice_ray.config import SelectConfig
        from spice_ray.select.stage import select_to_dir

        cfg = SelectConfig(method=method, k=k, fraction=None, alpha=1.0, scale="none", lam=lam, omega=omega, seed=0)
        summary = select_to_dir(str(root / "sketch" / "sketches"), str(root / "select"), cfg)
        _report_manifest(root, "select", {"selection": str(root / "select" / "selection.parquet"), **summary})
    if "train" in stages:
        _report_train(root, k)
    return root


def _report_manifest(root: Path, stage: str, result: dict[str, Any]) -> None:
    d = root / stage
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "key": "k-" + stage, "result": result}))
    (d / STAGE_MARKER).write_text("k-" + stage + "\n")


def _report_ingest(root: Path, uids: list[str], sources: list[str], messages: list[Any], n_tokens: list[int]) -> None:
    n = len(uids)
    ing = root / "ingest"
    ing.mkdir(parents=True, exist_ok=True)
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    pq.write_table(pa.table({
        "uid": pa.array(uids, pa.string()),
        "source": pa.array(sources, pa.string()),
        "messages": pa.array(messages, msg_type),
        "n_tokens": pa.array(n_tokens, pa.int32()),
        "file": pa.array(["corpus.jsonl"] * n, pa.string()),
        "line": pa.array(np.arange(1, n + 1), pa.int64()),
    }), ing / "records.parquet")
    quarantine = [
        ("/data/corpus.jsonl", 7, "invalid_json", "Expecting value at column 1"),
        ("/data/corpus.jsonl", 9, "duplicate", "same uid as /data/corpus.jsonl:2"),
        ("/data/corpus.jsonl", 11, "duplicate", "same uid as /data/corpus.jsonl:5"),
        ("/data/other.jsonl", 3, "too_long", "1400 tokens > 1024"),
        ("/data/other.jsonl", 4, "missing_field", "no 'output' <b>field</b>"),
    ]
    pq.write_table(pa.table({
        "file": [q[0] for q in quarantine], "line": pa.array([q[1] for q in quarantine], pa.int64()),
        "reason": [q[2] for q in quarantine], "detail": [q[3] for q in quarantine],
        "raw": ["{}"] * len(quarantine), "raw_bytes": pa.array([2] * len(quarantine), pa.int64()),
        "source": ["corpus"] * len(quarantine),
    }), ing / "quarantine.parquet")
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q[2]] = reasons.get(q[2], 0) + 1
    _report_manifest(root, "ingest", {"records": str(ing / "records.parquet"), "quarantine": str(ing / "quarantine.parquet"),
                                      "n_in": n + len(quarantine), "n_kept": n, "n_quarantined": len(quarantine),
                                      "reasons": reasons, "sources": dict(REPORT_SOURCES)})


def _report_sketches(root: Path, rng: np.random.Generator, uids: list[str], sources: list[str], n_tokens: list[int]) -> None:
    n = len(uids)
    centers = {s: rng.normal(size=_REPORT_D) for s in REPORT_SOURCES}
    centers["noisy"] = -centers["arithmetic"]  # conflicting gradients
    G = np.stack([centers[s] * 0.6 + rng.normal(size=_REPORT_D) for s in sources]).astype(np.float32)
    sk = root / "sketch" / "sketches"
    sk.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(n)  # files need not be sorted by uid
    for part, idx in enumerate(np.array_split(order, 2)):
        pq.write_table(pa.table({
            "uid": pa.array([uids[j] for j in idx], pa.string()),
            "sketch": pa.FixedSizeListArray.from_arrays(pa.array(G[idx].ravel(), pa.float32()), _REPORT_D),
            "loss": pa.array(rng.uniform(0.5, 3, size=len(idx))),
            "grad_norm": pa.array(np.linalg.norm(G[idx], axis=1).astype(np.float64)),
            "n_tokens": pa.array([n_tokens[j] for j in idx], pa.int32()),
        }), sk / f"part-{part}.parquet")
    _report_manifest(root, "sketch", {"sketches": str(sk), "n_records": n, "n_sketches": n, "num_workers": 1})


def _report_train(root: Path, k: int) -> None:
    tr = root / "train"
    tr.mkdir(parents=True, exist_ok=True)
    hist = [{"step": s, "epoch": 0, "loss": 3.0 / s ** 0.3, "lr": 2e-4, "tokens": 100 * s, "elapsed_s": s * 0.1}
            for s in range(1, 9)]
    (tr / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist) + '{"step": 9, "lo')  # torn last line
    _report_manifest(root, "train", {"model": str(tr / "model"), "loss": hist[-1]["loss"], "steps": 8, "planned_steps": 8,
                                     "n_selected": k, "n_train_rows": k, "metrics": str(tr / "metrics.jsonl")})
