"""Read a run root's artifacts for the report, tolerating missing or half-written stages.

Everything here reads the files the stages write (README, "What a run writes"); nothing is
recomputed. A stage that has not run yields ``None``/empty values, never an exception: the report
shows it as "not run". Paths are taken from the standard layout under the run root first and from
the stage manifest's ``result`` second (so a moved run root still reads).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from spice_ray.storage import STAGE_MARKER, is_uri

log = logging.getLogger(__name__)

REPORT_STAGES = ("ingest", "sketch", "select", "train", "eval")
MARKER = STAGE_MARKER  # a finished stage's marker (spice_ray.storage)
MANIFEST = "manifest.json"


@dataclass
class StageInfo:
    """One stage directory: whether it exists / finished, and its manifest (``{}`` when absent)."""

    name: str
    exists: bool = False
    finished: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # an unreadable manifest

    @property
    def result(self) -> dict[str, Any]:
        r = self.manifest.get("result")
        return r if isinstance(r, dict) else {}

    @property
    def status(self) -> str:
        if self.finished:
            return "done"
        if self.exists:
            return "incomplete"
        return "not run"


def read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)`` or ``(None, error)``; a missing file is ``(None, None)``."""
    if not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"{path.name}: {e}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; unparseable lines are skipped (a file still being written)."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def finite(x: Any) -> float | None:
    """``float(x)`` when it is a finite number, else None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table | None:
    if not path.exists():
        return None
    try:
        ds = pads.dataset(str(path), format="parquet")
        have = set(ds.schema.names)
        cols = [c for c in columns if c in have] if columns is not None else None
        return ds.to_table(columns=cols)
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("could not read %s: %s", path, e)
        return None


@dataclass
class RunArtifacts:
    """What a run root holds, loaded lazily where it may be large (records' messages, sketches)."""

    root: Path
    stages: dict[str, StageInfo]
    config: dict[str, Any]
    records: pa.Table | None  # uid, source, n_tokens (no messages)
    records_path: Path | None
    quarantine_path: Path | None
    selection: pa.Table | None  # uid, rank, gain, base, conflict, score, logdet
    summary: dict[str, Any]
    sketches_path: Path | None
    train_metrics: list[dict[str, Any]]
    eval_results: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    location: str | None = None  # the run root's URI when ``root`` is a local mirror of it

    @property
    def where(self) -> str:
        """The run root as the report names it."""
        return self.location or str(self.root)

    @property
    def name(self) -> str:
        return self.where.rstrip("/").rsplit("/", 1)[-1]

    # --- derived views -------------------------------------------------------------------------

    @property
    def has_selection(self) -> bool:
        return self.selection is not None

    def column(self, name: str) -> np.ndarray:
        """A selection column as a float array (empty when absent)."""
        if self.selection is None or name not in self.selection.column_names:
            return np.zeros(0)
        return self.selection.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    def selected_uids(self) -> list[str]:
        if self.selection is None:
            return []
        return [str(u) for u in self.selection.column("uid").to_pylist()]

    def select_param(self, key: str, default: Any = None) -> Any:
        """A selection parameter: select/summary.json first, then config.yaml's select section."""
        if key in self.summary and self.summary[key] is not None:
            return self.summary[key]
        sel_cfg = self.config.get("select") if isinstance(self.config.get("select"), dict) else {}
        if key in sel_cfg and sel_cfg[key] is not None:
            return sel_cfg[key]
        return default

    def records_messages(self, uids: list[str]) -> dict[str, dict[str, Any]]:
        """``uid -> {source, messages, n_tokens}`` for the given uids (reads only those rows)."""
        if self.records_path is None or not uids:
            return {}
        try:
            ds = pads.dataset(str(self.records_path), format="parquet")
            cols = [c for c in ("uid", "source", "messages", "prompt", "response", "n_tokens") if c in ds.schema.names]
            table = ds.to_table(columns=cols, filter=pc.field("uid").isin(pa.array(uids, type=pa.string())))
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            log.warning("could not read messages from %s: %s", self.records_path, e)
            return {}
        return {row["uid"]: row for row in table.to_pylist()}

    def quarantine_examples(self, n: int = 8) -> list[dict[str, Any]]:
        """The first ``n`` quarantined rows (file, line, reason, detail), one per reason first."""
        if self.quarantine_path is None or not self.quarantine_path.is_file():
            return []
        try:
            pf = pq.ParquetFile(self.quarantine_path)
            cols = [c for c in ("file", "line", "reason", "detail") if c in pf.schema_arrow.names]
            rows: list[dict[str, Any]] = []
            for batch in pf.iter_batches(batch_size=4096, columns=cols):
                rows.extend(batch.to_pylist())
                if len(rows) >= 4096:
                    break
        except (OSError, pa.ArrowInvalid) as e:
            log.warning("could not read %s: %s", self.quarantine_path, e)
            return []
        # one example of each reason first (so rare reasons show), then the rest in file order
        seen: set[str] = set()
        first, rest = [], []
        for r in rows:
            (rest if r.get("reason") in seen else first).append(r)
            seen.add(r.get("reason"))
        return (first + rest)[:n]

    def quarantine_reasons(self) -> dict[str, int]:
        """Counts per quarantine reason: the ingest manifest's ``reasons``, else the parquet's."""
        reasons = self.stages["ingest"].result.get("reasons")
        if isinstance(reasons, dict):
            return {str(k): int(v) for k, v in reasons.items()}
        table = _read_table(self.quarantine_path, ["reason"]) if self.quarantine_path else None
        if table is None or table.num_rows == 0:
            return {}
        counts = pc.value_counts(table.column("reason").combine_chunks())
        return {str(x["values"]): int(x["counts"]) for x in counts.to_pylist()}


def _first_existing(*candidates: Any) -> Path | None:
    for c in candidates:
        if isinstance(c, str | Path) and str(c) and not is_uri(c):
            p = Path(c)
            if p.exists():
                return p
    return None


def _load_stages(root: Path, errors: list[str]) -> dict[str, StageInfo]:
    """Each report stage's directory, marker and manifest (its paths resolved against ``root``);
    an unreadable manifest is added to ``errors``."""
    stages: dict[str, StageInfo] = {}
    for name in REPORT_STAGES:
        d = root / name
        info = StageInfo(name, exists=d.is_dir(), finished=(d / MARKER).is_file())
        manifest, err = read_json(d / MANIFEST)
        if err:
            info.error = err
            errors.append(f"{name}/{err}")
        elif isinstance(manifest, dict):
            from spice_ray.pipeline import resolve

            info.manifest = resolve(manifest, str(root))
        stages[name] = info
    return stages


def _load_config(root: Path, errors: list[str]) -> dict[str, Any]:
    """The run's config.yaml as a dict (``{}`` when absent or not a mapping; an error when unreadable)."""
    config: dict[str, Any] = {}
    cfg_path = root / "config.yaml"
    if cfg_path.is_file():
        try:
            import yaml

            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except Exception as e:  # noqa: BLE001 - a broken config.yaml must not break the report
            errors.append(f"config.yaml: {e}")
    return config


def _load_eval(root: Path, eval_stage: StageInfo, errors: list[str]) -> dict[str, Any] | None:
    """The eval stage's results: its manifest result, else the first JSON object among the usual
    file names under ``<root>/eval``; None when there is none."""
    if eval_stage.result:
        return dict(eval_stage.result)
    if (root / "eval").is_dir():
        for name in ("results.json", "eval.json", "summary.json", "metrics.json"):
            value, err = read_json(root / "eval" / name)
            if err:
                errors.append(f"eval/{err}")
            if isinstance(value, dict):
                return value
    return None


def load_run(run_root: str | Path) -> RunArtifacts:
    """Load a run root's manifests and the (small or column-pruned) artifacts the report needs."""
    root = Path(run_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"run root not found: {root}")
    errors: list[str] = []
    stages = _load_stages(root, errors)
    config = _load_config(root, errors)

    ing = stages["ingest"].result
    records_path = _first_existing(root / "ingest" / "records.parquet", ing.get("records"))
    quarantine_path = _first_existing(root / "ingest" / "quarantine.parquet", ing.get("quarantine"))
    records = _read_table(records_path, ["uid", "source", "n_tokens"]) if records_path else None

    sel_res = stages["select"].result
    selection_path = _first_existing(root / "select" / "selection.parquet", sel_res.get("selection"))
    selection = _read_table(selection_path) if selection_path else None
    if selection is not None and "rank" in selection.column_names:
        selection = selection.sort_by("rank")
    summary, err = read_json(root / "select" / "summary.json")
    if err:
        errors.append(f"select/{err}")
    if not isinstance(summary, dict):
        # no summary.json: the manifest result holds the same summary (pipeline merges it in)
        summary = {k: v for k, v in sel_res.items() if k != "selection"}

    sketches_path = _first_existing(
        root / "sketch" / "sketches", stages["sketch"].result.get("sketches"), summary.get("sketches")
    )

    train_res = stages["train"].result
    metrics_path = _first_existing(root / "train" / "metrics.jsonl", train_res.get("metrics"))
    train_metrics = read_jsonl(metrics_path) if metrics_path else []
    eval_results = _load_eval(root, stages["eval"], errors)

    return RunArtifacts(
        root=root,
        stages=stages,
        config=config,
        records=records,
        records_path=records_path,
        quarantine_path=quarantine_path,
        selection=selection,
        summary=summary,
        sketches_path=sketches_path,
        train_metrics=train_metrics,
        eval_results=eval_results,
        errors=errors,
    )
