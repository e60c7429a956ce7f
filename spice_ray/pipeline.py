"""The pipeline: a loop over the declared stages (:mod:`spice_ray.stages`) under one run root, with
completion markers, manifests, content keys, one writer at a time and a record of every run.

    <root>/config.yaml            the resolved config of the latest invocation
    <root>/models/                built-in models materialized once (HF layout)
    <root>/ingest/                records.parquet, quarantine.parquet (demo_corpus/ when corpus.paths is empty)
    <root>/sketch/sketches/       sketch parquet files, sorted by uid
    <root>/select/                selection.parquet, summary.json
    <root>/train/<key>/           rows.parquet, checkpoints/, model/ (Hugging Face format), metrics
    <root>/eval/<key>/            results.json: held-out loss / perplexity, base vs fine-tuned
    <root>/cache/sketches/        the sketch cache, by sketch spec
    <root>/cache/ingest/          the ingest cache: each corpus file's rows, by content and settings
    <root>/history/<run>/         one entry per invocation that did work: run.json, status.json,
                                  driver.log, the selection and the eval results of that run
    <root>/status.json            the latest invocation's status (machine-readable)
    <root>/latest.json            where the latest trained model, eval and selection are (written last)

An inner call (``run_pipeline(..., record=False)``: the bench's and the demo comparison's shared
stages) leaves ``config.yaml`` (written only where there is none), ``status.json`` and ``latest.json``
to the user's own invocations; its history entry (when it did work or failed) says ``"inner": true``.
    <root>/_lease.json            the live run's lease (one writer per root)

Each stage directory holds ``manifest.json`` (inputs and their digests, config, versions, counts,
timings, the digest of every artifact) and, once the stage has finished, ``_SUCCESS`` holding the
stage's key: a sha256 of what the stage declares it reads (config values, upstream artifact digests,
input files). A rerun skips a stage whose marker holds the same key and whose artifacts are intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import pyarrow.fs as pafs

from spice_ray.config import Config, dump_config, redact
from spice_ray.executor import Executor, make_executor
from spice_ray.lease import Lease
from spice_ray.stage_results import Upstream
from spice_ray.stages import STAGE_NAMES, Stage, StageContext, StageDirs
from spice_ray.stages import STAGES as STAGE_DEFS
from spice_ray.storage import STAGE_MARKER, Store

logger = logging.getLogger(__name__)

STAGES = STAGE_NAMES  # in order
MARKER = STAGE_MARKER  # "_SUCCESS", holding the stage's key
MANIFEST = "manifest.json"
HISTORY = "history"
STATUS_FILE = "status.json"
LATEST_FILE = "latest.json"
KEY_FORMAT = "2"  # bump when the meaning of a key changes
HASH_LIMIT = 512 * 1024**2  # files above this are checked by size only (hashing would re-read them)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("spice-ray", "torch", "ray", "transformers", "deepspeed", "peft", "numpy", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


class RunRoot:
    """A run's root: a local directory or an object-store URI, through :class:`Store`."""

    def __init__(self, root: str | Path) -> None:
        self.store = Store(str(root))

    @property
    def uri(self) -> str:
        return self.store.uri()

    def marker_key(self, stage: str) -> str | None:
        return self.store.done_key(stage, marker=MARKER)

    def manifest(self, stage: str) -> dict[str, Any]:
        """The stage's manifest, its ``root:`` paths resolved against this root (see :func:`portable`)."""
        return resolve(json.loads(self.store.read_text(f"{stage}/{MANIFEST}")), self.uri)


ROOT_PREFIX = "root:"


def portable(value: Any, root_uri: str) -> Any:
    """``value`` with every string under ``root_uri`` written as ``root:<path inside the root>``, so
    a manifest names its artifacts wherever the root is copied or mounted."""
    if isinstance(value, dict):
        return {k: portable(v, root_uri) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root_uri) for v in value]
    if isinstance(value, str) and value.startswith(root_uri.rstrip("/") + "/"):
        return ROOT_PREFIX + value[len(root_uri.rstrip("/")) + 1 :]
    return value


def resolve(value: Any, root_uri: str) -> Any:
    """The inverse of :func:`portable` for the root at ``root_uri``."""
    if isinstance(value, dict):
        return {k: resolve(v, root_uri) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, root_uri) for v in value]
    if isinstance(value, str) and value.startswith(ROOT_PREFIX):
        return f"{root_uri.rstrip('/')}/{value[len(ROOT_PREFIX):]}"
    return value


@dataclass
class StageOutcome:
    stage: str
    skipped: bool
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        return self.manifest.get("result", {})


# ------------------------------------------------------------------------------------------ digests


def _sha256(store: Store, rel: str) -> str:
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path(rel)) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_digests(store: Store, stage: str, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file a stage's result points to inside the stage directory, keyed by
    the path relative to the root."""
    prefix = store.uri(stage) + "/"
    out: dict[str, dict[str, Any]] = {}
    for value in result.values():
        if not (isinstance(value, str) and value.startswith(prefix)):
            continue
        info = store.fs.get_file_info(store.path(f"{stage}/{value[len(prefix):]}"))
        infos = [info] if info.type == pafs.FileType.File else []
        if info.type == pafs.FileType.Directory:
            infos = [i for i in store.fs.get_file_info(pafs.FileSelector(info.path, recursive=True)) if i.type == pafs.FileType.File]
        for i in infos:
            rel = i.path[len(store.path()) + 1 :]
            out[rel] = {"bytes": i.size, "sha256": _sha256(store, rel) if i.size <= HASH_LIMIT else None}
    return dict(sorted(out.items()))


def verify_artifacts(store: Store, outputs: dict[str, dict[str, Any]]) -> list[str]:
    """The recorded artifacts that are missing, resized or changed (empty: all intact)."""
    damaged = []
    for rel, want in outputs.items():
        info = store.fs.get_file_info(store.path(rel))
        if info.type != pafs.FileType.File:
            damaged.append(f"{rel} missing")
        elif info.size != want["bytes"]:
            damaged.append(f"{rel} is {info.size} bytes, expected {want['bytes']}")
        elif want.get("sha256") and _sha256(store, rel) != want["sha256"]:
            damaged.append(f"{rel} content changed")
    return damaged


def need_digest(store: Store, manifest: dict[str, Any], field_name: str) -> str:
    """What a downstream key sees of an upstream result field: the digest of the artifact it points
    to (a file or directory under the root), else its value. An artifact with a file too large to
    hash falls back to the upstream key, so nothing changes unseen."""
    value = manifest["result"].get(field_name)
    rel_prefix = value[len(store.uri()) + 1 :] if isinstance(value, str) and value.startswith(store.uri() + "/") else None
    if rel_prefix is None:
        return json.dumps(value, sort_keys=True, default=str)
    files = {rel: d for rel, d in manifest.get("outputs", {}).items() if rel == rel_prefix or rel.startswith(rel_prefix + "/")}
    if not files or any(d.get("sha256") is None for d in files.values()):
        return f"key:{manifest['key']}"
    return hashlib.sha256(json.dumps({rel[len(rel_prefix):]: d["sha256"] for rel, d in files.items()}, sort_keys=True).encode()).hexdigest()


def config_values(cfg: Config, reads: tuple[str, ...]) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for dotted in reads:
        node: Any = data
        for part in dotted.split("."):
            node = node[part]
        out[dotted] = node
    return out


def stage_key(stage: Stage, cfg: Config, upstream: dict[str, dict[str, Any]], store: Store) -> str:
    """sha256 of what ``stage`` declares it reads: config values, upstream digests, the fingerprint of
    its running parts' sections and input files."""
    needs = {}
    for need in stage.needs:
        up, _, field_name = need.partition(".")
        manifest = upstream[up]
        needs[need] = need_digest(store, manifest, field_name) if field_name else f"key:{manifest['key']}"
    payload = {"format": KEY_FORMAT, "stage": stage.name, "config": config_values(cfg, stage.reads), "needs": needs,
               "inputs": stage.key_inputs(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_rel(stage: Stage, key: str) -> str:
    return f"{stage.name}/{key[:16]}" if stage.versioned else stage.name


# ---------------------------------------------------------------------------------------- one stage


def finished(root: RunRoot, stage: Stage, key: str) -> dict[str, Any] | None:
    """The stage's manifest when it finished with ``key`` and its artifacts are intact, else None."""
    if root.marker_key(stage.name) != key:
        return None
    manifest = root.manifest(stage.name)
    damaged = verify_artifacts(root.store, manifest.get("outputs", {}))
    if damaged:
        logger.warning("%s: artifacts missing or corrupted (%s); recomputing", stage.name, "; ".join(damaged))
        return None
    return manifest


def run_stage(root: RunRoot, stage: Stage, key: str, cfg: Config, executor: Executor, upstream: dict[str, dict[str, Any]]) -> StageOutcome:
    """Run ``stage`` under ``key``: its work, then the manifest, then the marker (the commit point: a
    stage without its marker is never trusted downstream)."""
    if root.marker_key(stage.name) is not None:
        logger.warning("%s: config or inputs changed since it finished; recomputing", stage.name)
    root.store.clear_done(stage.name, marker=MARKER)
    rel = stage_rel(stage, key)
    started = time.time()
    logger.info("%s: started", stage.name)
    with tempfile.TemporaryDirectory(prefix=f"spice-{stage.name}-") as staging:
        local = Path(root.store.path(rel)) if root.store.is_local else Path(staging)
        local.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(cfg=stage.view(cfg), executor=executor, dirs=StageDirs(uri=root.store.uri(rel), local=local),
                           upstream=cast(Upstream, {name: m["result"] for name, m in upstream.items()}), root_uri=root.uri,
                           resources=stage.resources(cfg))
        result = stage.run(ctx)
        stage.check_result(result)
        if not root.store.is_local and any(Path(staging).iterdir()):
            root.store.upload_dir(staging, rel, replace=False)
    finished_at = time.time()
    manifest = {
        "stage": stage.name,
        "key": key,
        "dir": rel,
        "inputs": {need: upstream[need.partition(".")[0]]["key"] for need in stage.needs},
        "config": redact(cfg.model_dump(mode="json")),
        "versions": versions(),
        "executor": executor.name,
        "result": result,
        "outputs": artifact_digests(root.store, stage.name, result),
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "finished": datetime.fromtimestamp(finished_at, UTC).isoformat(),
        "seconds": round(finished_at - started, 3),
    }
    root.store.write_text(f"{stage.name}/{MANIFEST}", json.dumps(portable(manifest, root.uri), indent=2, sort_keys=True, default=str))
    root.store.mark_done(stage.name, key, marker=MARKER)
    logger.info("%s: done in %.1fs", stage.name, finished_at - started)
    return StageOutcome(stage.name, skipped=False, manifest=manifest)


# -------------------------------------------------------------------------------------- invocations


class Invocation:
    """One call of :func:`run_pipeline`: its status file, its driver log, and (when it did work or
    failed) its history entry ``history/<time>-<run id>/``."""

    def __init__(self, root: RunRoot, run_id: str, stages: list[str], *, record: bool = True) -> None:
        self.root, self.run_id, self.stages = root, run_id, stages
        self.record_root = record  # False: an inner call, which leaves the root's status.json alone
        self.started = datetime.now(UTC)
        self.entry = f"{HISTORY}/{self.started.strftime('%Y%m%dT%H%M%S.%fZ')}-{run_id}"  # sorts by start, to the µs
        self._dir = tempfile.TemporaryDirectory(prefix="spice-run-")
        self.log_path = Path(self._dir.name) / "driver.log"
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setLevel(logging.INFO)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)  # every library's warnings
        self._level = logging.getLogger("spice_ray").level
        if logging.getLogger("spice_ray").getEffectiveLevel() > logging.INFO:
            logging.getLogger("spice_ray").setLevel(logging.INFO)  # and spice-ray's own progress lines

    def status(self, state: str, *, stage: str | None = None, error: str | None = None, in_history: bool = False) -> dict[str, Any]:
        """The root's ``status.json`` (not for an inner call) and, ``in_history``, the entry's."""
        record = {"run": self.run_id, "state": state, "stage": stage, "stages": self.stages, "error": error,
                  "started": self.started.isoformat(), "updated": datetime.now(UTC).isoformat(),
                  "entry": self.entry if in_history else None}
        text = json.dumps(record, indent=2)
        if self.record_root:
            self.root.store.write_text(STATUS_FILE, text)
        if in_history:
            self.root.store.write_text(f"{self.entry}/{STATUS_FILE}", text)
        return record

    def record(self, outcomes: dict[str, StageOutcome], state: str, error: str | None = None) -> None:
        """Write the history entry: run.json, the selection and eval results, status and driver log."""
        store = self.root.store
        record = {
            "run": self.run_id,
            "started": self.started.isoformat(),
            "finished": datetime.now(UTC).isoformat(),
            "state": state,
            "error": error,
            "inner": not self.record_root,
            "stages": {name: {"key": o.manifest.get("key"), "skipped": o.skipped, "seconds": o.manifest.get("seconds"),
                              "dir": o.manifest.get("dir"), "result": o.result} for name, o in outcomes.items()},
        }
        for name, src in (("selection.parquet", "select/selection.parquet"), ("summary.json", "select/summary.json")):
            if "select" in outcomes and store.exists(src):
                store.copy(src, f"{self.entry}/{name}")
        results = outcomes["eval"].result.get("results_file") if "eval" in outcomes else None
        if results and store.exists(results[len(store.uri()) + 1 :]):
            store.copy(results[len(store.uri()) + 1 :], f"{self.entry}/eval_results.json")
        store.write_text(f"{self.entry}/run.json", json.dumps(portable(record, store.uri()), indent=2, sort_keys=True, default=str))
        self.status(state, error=error, in_history=True)
        self._handler.flush()
        store.write_bytes(f"{self.entry}/driver.log", self.log_path.read_bytes())

    def latest(self, outcomes: dict[str, StageOutcome]) -> None:
        """``latest.json``: where this root's current selection, model and eval are, as paths inside the
        root (written last)."""
        pointer = {"run": self.entry, "updated": datetime.now(UTC).isoformat()}
        for stage, fieldname in (("select", "selection"), ("train", "model"), ("eval", "results_file")):
            if stage in outcomes:
                pointer[stage] = outcomes[stage].result.get(fieldname)
        root = self.root.store.uri().rstrip("/") + "/"
        relative = {k: v[len(root):] if isinstance(v, str) and v.startswith(root) else v for k, v in pointer.items()}
        self.root.store.write_text(LATEST_FILE, json.dumps(relative, indent=2))

    def note_traceback(self) -> None:
        """The current exception's traceback, into the driver log (the terminal shows it too)."""
        import traceback

        self._handler.flush()
        with self.log_path.open("a") as fh:
            fh.write(redact(traceback.format_exc()))

    def close(self) -> None:
        logging.getLogger("spice_ray").setLevel(self._level)
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        self._dir.cleanup()


def _run_stages(root: RunRoot, cfg: Config, wanted: list[str], executor: Executor, lease: Lease, run: Invocation,
                outcomes: dict[str, StageOutcome]) -> None:
    """Walk the stages in order: skip what finished under the same key, run what is wanted."""
    manifests: dict[str, dict[str, Any]] = {}
    for stage in STAGE_DEFS:
        missing = [up for up in stage.upstream if up not in manifests]
        if missing:
            if stage.name in wanted:
                raise StageNotReady(f"stage {stage.name}: its input stage {missing[0]} has not finished for this config under {root.uri}; run it first")
            continue
        key = stage_key(stage, cfg, manifests, root.store)
        manifest = finished(root, stage, key)
        if manifest is not None:
            manifests[stage.name] = manifest
            if stage.name in wanted or stage.name == "models":
                # an inner call (the bench's shared stages) does not repeat what the user just read
                logger.log(logging.INFO if run.record_root else logging.DEBUG, "%s: finished earlier, skipped", stage.name)
                outcomes[stage.name] = StageOutcome(stage.name, skipped=True, manifest=manifest)
            continue
        if stage.name not in wanted and stage.name != "models":
            continue
        lease.check()
        run.status("running", stage=stage.name)
        upstream = {up: manifests[up] for up in stage.upstream}
        outcomes[stage.name] = run_stage(root, stage, key, cfg, executor, upstream)
        manifests[stage.name] = outcomes[stage.name].manifest


class StageNotReady(RuntimeError):
    """A requested stage's inputs have not finished for this config."""


def run_pipeline(cfg: Config, *, stages: list[str] | None = None, executor: Executor | None = None,
                 lease_ttl: float | None = None, record: bool = True) -> dict[str, StageOutcome]:
    """Run the configured stages in order under ``cfg.run.root``; returns each stage's outcome.

    ``executor``: where the work runs (default: ``run.executor``). Holds the root's lease throughout
    (:class:`spice_ray.lease.LeaseHeld` when another run holds it). ``record=False``: an inner call
    (the bench's shared stages) that leaves the root's ``config.yaml``, ``status.json`` and
    ``latest.json`` to the user's own invocations; it still writes a history entry when it did work
    or failed."""
    root = RunRoot(cfg.run.root)
    wanted = list(stages or cfg.run.stages)
    lease = Lease(root.store, ttl=lease_ttl or cfg.run.lease_ttl_s)
    outcomes: dict[str, StageOutcome] = {}
    with lease:
        run = Invocation(root, lease.run_id, wanted, record=record)
        try:
            run.status("running")
            if record or not root.store.exists("config.yaml"):  # an inner call never replaces the user's
                root.store.write_text("config.yaml", dump_config(cfg, redacted=True))
            executor = executor or make_executor(cfg.run.executor, address=cfg.run.ray_address)
            _run_stages(root, cfg, wanted, executor, lease, run, outcomes)
            if any(not o.skipped for o in outcomes.values()):
                run.record(outcomes, "succeeded")
                if record:
                    run.latest(outcomes)
            else:
                run.status("noop")
        except BaseException as e:
            run.note_traceback()
            run.record(outcomes, "failed", error=f"{type(e).__name__}: {redact(str(e))}")
            raise
        finally:
            run.close()
    return outcomes


def list_runs(root: str | Path) -> list[dict[str, Any]]:
    """One row per recorded invocation of a run root, oldest first."""
    store = Store(str(root))
    if not store.exists(HISTORY):
        return []
    entries = sorted(i.base_name for i in store.fs.get_file_info(pafs.FileSelector(store.path(HISTORY))) if i.type == pafs.FileType.Directory)
    rows = []
    for name in entries:
        if not store.exists(f"{HISTORY}/{name}/run.json"):
            continue
        run = resolve(json.loads(store.read_text(f"{HISTORY}/{name}/run.json")), store.uri())
        stages = run["stages"]
        result = {s: (stages.get(s) or {}).get("result") or {} for s in STAGES}
        tuned = next(iter(result["eval"].get("sets", {}).values()), {}).get("tuned", {}) if result["eval"] else {}
        rows.append(
            {
                "run": name,
                "state": run.get("state", "succeeded"),
                "inner": bool(run.get("inner", False)),
                "records": result["ingest"].get("n_kept"),
                "quarantined": result["ingest"].get("n_quarantined"),
                "sketched": result["sketch"].get("n_computed", result["sketch"].get("n_sketches")),
                "selected": result["select"].get("k_selected"),
                "method": result["select"].get("method"),
                "logdet": result["select"].get("logdet"),
                "mean_conflict": result["select"].get("mean_conflict"),
                "model": result["train"].get("model"),
                "eval_loss": tuned.get("loss"),
                "redone": [s for s in STAGES if s in stages and not stages[s]["skipped"]],
            }
        )
    return rows
