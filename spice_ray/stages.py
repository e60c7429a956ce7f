"""The pipeline's stages, each declared as data: its name, the config it reads, the upstream results it
needs, and the function that does its work. The pipeline (:mod:`spice_ray.pipeline`) is a loop over
``STAGES``; a stage's key is derived only from what it declares:

- ``reads``: config sections (``"sketch"``, ``"model.proxy_lora"``) or single fields (``"corpus.max_tokens"``);
- ``needs``: upstream results, ``"stage.field"``: the content digest of that artifact (a file or
  directory the stage wrote) or the field's value (``"models.proxy_fingerprint"``). So a rerun of
  an upstream stage that writes the same bytes does not invalidate anything downstream;
- ``inputs``: a key over files outside the run root (the corpus, eval sets, a target list).

So changing ``model.target`` reruns train and eval only, and a corpus rewritten with the same
records reruns ingest and nothing after it. ``versioned`` stages write into ``<stage>/<key[:16]>/``:
another set of inputs gets another directory, so a model or eval result that a user may be reading
is never overwritten, and a checkpoint is only ever resumed by a run of the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spice_ray.config import Config
from spice_ray.executor import Executor
from spice_ray.storage import files_key

_LOADING = ("model.init_seed", "model.trust_remote_code")


@dataclass
class StageDirs:
    """Where a stage writes: ``uri`` under the run root (what workers write to directly), and
    ``local``, a local directory for driver-side files: ``uri`` itself for a local root, else a
    staging directory uploaded to ``uri`` when the stage succeeds."""

    uri: str
    local: Path


@dataclass
class StageContext:
    cfg: Config
    executor: Executor
    dirs: StageDirs
    upstream: dict[str, dict[str, Any]]  # the result of every stage named in ``needs``
    root_uri: str


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    run: Callable[[StageContext], dict[str, Any]]
    needs: tuple[str, ...] = ()
    inputs: Callable[[Config], list[str]] = field(default=lambda cfg: [])
    versioned: bool = False
    describe: Callable[[Config, dict[str, Any]], str] = field(default=lambda cfg, r: "")

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.split(".", 1)[0] for n in self.needs))


# ------------------------------------------------------------------------------------------- models


def resolve_model(spec: str, dirs: StageDirs, seed: int) -> tuple[str, str]:
    """(URI every worker loads, local path to fingerprint). A built-in is written into the run
    root's models/ once; a local path, remote URI or hub id passes through."""
    from spice_ray.models import is_builtin, materialize_builtin

    if is_builtin(spec):
        name = spec.removeprefix("builtin:")
        local = materialize_builtin(spec, dirs.local / name, seed=seed)
        return f"{dirs.uri}/{name}", str(local)
    local = Path(spec).expanduser()
    resolved = str(local.resolve()) if local.exists() else spec
    return resolved, resolved


def run_models(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.models import model_fingerprint, tokenizer_fingerprint

    m = ctx.cfg.model
    proxy, proxy_local = resolve_model(m.proxy, ctx.dirs, m.init_seed)
    target, target_local = resolve_model(m.target, ctx.dirs, m.init_seed)
    tok, tok_local = resolve_model(m.tokenizer, ctx.dirs, m.init_seed) if m.tokenizer else (None, None)
    return {
        "proxy": proxy,
        "target": target,
        "tokenizer": tok or target,
        "proxy_tokenizer": tok or proxy,
        "proxy_fingerprint": model_fingerprint(proxy_local),
        "target_fingerprint": model_fingerprint(target_local),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok_local or target_local),
        "proxy_tokenizer_fingerprint": tokenizer_fingerprint(tok_local or proxy_local),
        "trust_remote_code": m.trust_remote_code,
    }


# ------------------------------------------------------------------------------------------- ingest


INGEST_CACHE = "cache/ingest"


def run_ingest(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.corpus.ingest import QUARANTINE_FILE, RECORDS_FILE, ingest
    from spice_ray.corpus.ingest_cache import IngestCache
    from spice_ray.models import load_tokenizer
    from spice_ray.storage import ensure_local

    models = ctx.upstream["models"]
    tokenizer = load_tokenizer(ensure_local(models["tokenizer"]), trust_remote_code=ctx.cfg.model.trust_remote_code)
    # Files unchanged since an earlier run (same content, name and settings) come from the cache.
    cache = IngestCache(f"{ctx.root_uri}/{INGEST_CACHE}", models["tokenizer_fingerprint"])
    result = ingest(ctx.cfg.corpus, tokenizer, ctx.dirs.local, cache=cache)  # no corpus.paths: the demo corpus
    out = {
        "records": f"{ctx.dirs.uri}/{RECORDS_FILE}",
        "quarantine": f"{ctx.dirs.uri}/{QUARANTINE_FILE}",
        "holdout": None,
        "n_in": result.n_in,
        "n_kept": result.n_kept,
        "n_quarantined": result.n_quarantined,
        "reasons": result.reasons,
        "sources": result.sources,
        "files": result.files,
        "files_read": result.files_read,
        "files_reused": result.files_reused,
        "max_tokens": result.max_tokens,  # corpus.max_tokens capped to the model's context
    }
    return out | split_holdout(ctx.cfg, ctx.dirs)


def within_context(ctx: StageContext) -> Config:
    """The config downstream of ingest: ``corpus.max_tokens`` as ingest applied it (capped to the
    model's context), so no stage encodes a row longer than the model can read."""
    applied = ctx.upstream.get("ingest", {}).get("max_tokens")
    if applied is None or applied >= ctx.cfg.corpus.max_tokens:
        return ctx.cfg
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.corpus.max_tokens = applied
    return cfg


HOLDOUT = "holdout"


def split_holdout(cfg: Config, dirs: StageDirs) -> dict[str, Any]:
    """Cut the ingested records into the pool (``records.parquet``) and the held-out splits
    (``holdout/validation.parquet``, ``holdout/test.parquet``); nothing to do without a holdout."""
    import pyarrow.parquet as pq

    from spice_ray.corpus.ingest import RECORDS_FILE
    from spice_ray.corpus.split import split_records

    c = cfg.corpus
    if c.holdout_validation == 0 and c.holdout_test == 0 and c.pool_fraction == 1:
        return {}
    records = dirs.local / RECORDS_FILE
    split = split_records(pq.read_table(records), seed=c.split_seed, validation=c.holdout_validation, test=c.holdout_test,
                          pool_fraction=c.pool_fraction)
    (dirs.local / HOLDOUT).mkdir(exist_ok=True)
    for name in ("validation", "test"):
        pq.write_table(split.tables[name], dirs.local / HOLDOUT / f"{name}.parquet")
    tmp = records.with_name(f".{RECORDS_FILE}.tmp")
    pq.write_table(split.tables["pool"], tmp)
    tmp.replace(records)
    return {"holdout": f"{dirs.uri}/{HOLDOUT}", "n_pool": split.counts["pool"], "splits": split.counts, "split_sources": split.sources}


# ------------------------------------------------------------------------------------------- sketch


def sketch_inputs(cfg: Config) -> list[str]:
    """A warm-up trains with the train section's settings; an optimizer_state is keyed by content."""
    out = [cfg.fingerprint("train")] if cfg.sketch.warmup_fraction > 0 else []
    if cfg.sketch.optimizer_state:
        from spice_ray.sketch.stage import digest_path
        from spice_ray.storage import ensure_local

        out.append(digest_path(Path(ensure_local(cfg.sketch.optimizer_state)).expanduser()))
    return out


def run_sketch(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.sketch.stage import run_sketch_stage

    models = ctx.upstream["models"]
    counts = run_sketch_stage(
        within_context(ctx),
        ctx.executor,
        records_path=ctx.upstream["ingest"]["records"],
        model_path=models["proxy"],
        tokenizer_path=models["proxy_tokenizer"],
        out_dir=ctx.dirs.uri,
        cache_dir=ctx.cfg.sketch.cache_dir or f"{ctx.root_uri}/cache/sketches",
        model_fingerprint=models["proxy_fingerprint"],
    )
    return {"sketches": f"{ctx.dirs.uri}/sketches", **counts}


# ------------------------------------------------------------------------------------------- select


def run_select(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.select.output import SELECTION_FILE
    from spice_ray.select.stage import run_select_stage

    summary = run_select_stage(ctx.upstream["sketch"]["sketches"], ctx.dirs.uri, ctx.cfg.select, ctx.executor,
                               records_path=ctx.upstream["ingest"]["records"])
    return {"selection": f"{ctx.dirs.uri}/{SELECTION_FILE}", **summary}


# -------------------------------------------------------------------------------------------- train


def run_train(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.train import run_train_stage

    models = ctx.upstream["models"]
    cfg = within_context(ctx)
    return run_train_stage(
        cfg,
        ctx.executor,
        records_path=ctx.upstream["ingest"]["records"],
        selection_path=ctx.upstream["select"]["selection"],
        model_path=models["target"],
        tokenizer_path=models["tokenizer"],
        out_dir=ctx.dirs.uri,
        max_tokens=cfg.corpus.max_tokens,
    )


# --------------------------------------------------------------------------------------------- eval


def run_eval(ctx: StageContext) -> dict[str, Any]:
    from spice_ray.evaluate import RESULTS_FILE, run_eval_stage

    models = ctx.upstream["models"]
    return {"results_file": f"{ctx.dirs.uri}/{RESULTS_FILE}"} | run_eval_stage(
        within_context(ctx),
        ctx.executor,
        out_dir=str(ctx.dirs.local),
        base_model=models["target"],
        tuned_model=ctx.upstream["train"]["model"],
        tokenizer_path=models["tokenizer"],
        selection_path=ctx.upstream["select"]["selection"],
        holdout=ctx.upstream["ingest"].get("holdout"),
    )


# ----------------------------------------------------------------------------------------- one line


def _describe_ingest(cfg: Config, r: dict[str, Any]) -> str:
    line = f"{r['n_in']} rows in, {r['n_kept']} kept, {r['n_quarantined']} quarantined {r['reasons']}"
    if "files_read" not in r:  # a manifest written before the ingest cache
        return line
    return f"{line} ({r['files_reused']} {_files(r['files_reused'])} reused, {r['files_read']} read)"


def _files(n: int) -> str:
    return "file" if n == 1 else "files"


def _describe_select(cfg: Config, r: dict[str, Any]) -> str:
    frac = r["k_selected"] / max(1, r["n_candidates"])
    return (f"{r['method']}: {r['k_selected']} of {r['n_candidates']} ({frac:.1%}), log det {r['logdet']:.3f}, "
            f"mean conflict {r['mean_conflict']:.4f}, stop: {r['stop_reason']}")


def _describe_eval(cfg: Config, r: dict[str, Any]) -> str:
    def fmt(m: dict[str, Any] | None) -> str:
        return "n/a" if not m or m.get("loss") is None else f"loss {m['loss']:.4f} (ppl {m['perplexity']:.2f})"

    sets = r.get("sets", {})
    if "overall" in sets:  # the holdout split: one set per source; the overall line says enough
        sets = {f"overall of {len(sets) - 1} sources": sets["overall"]}
    parts = []
    for name, e in sets.items():
        base = f"base {fmt(e.get('base'))} → " if "base" in e else ""
        parts.append(f"{name} ({e.get('n', 0)} rows, {e.get('tokens', 0)} tokens): {base}tuned {fmt(e.get('tuned'))}")
    return "; ".join(parts) or "no eval sets"


STAGES: tuple[Stage, ...] = (
    Stage("models", reads=("model.proxy", "model.target", "model.tokenizer", *_LOADING), run=run_models,
          describe=lambda cfg, r: f"proxy {r.get('proxy')}, target {r.get('target')}"),
    Stage("ingest", reads=("corpus",), run=run_ingest, needs=("models.tokenizer_fingerprint",),
          inputs=lambda cfg: [files_key(cfg.corpus.paths)], describe=_describe_ingest),
    Stage("sketch", reads=("sketch", "corpus.max_tokens", "model.proxy_lora", *_LOADING), run=run_sketch,
          needs=("models.proxy_fingerprint", "models.proxy_tokenizer_fingerprint", "ingest.records"),
          inputs=sketch_inputs, describe=lambda cfg, r: f"{r['n_sketches']} sketches ({r['n_computed']} computed), d={cfg.sketch.dim}"),
    Stage("select", reads=("select",), run=run_select, needs=("sketch.sketches", "ingest.records"),
          inputs=lambda cfg: [files_key([cfg.select.target])] if cfg.select.target else [], describe=_describe_select),
    Stage("train", reads=("train", "corpus.max_tokens", "model.target_lora", *_LOADING), run=run_train,
          needs=("models.target_fingerprint", "models.tokenizer_fingerprint", "ingest.records", "select.selection"),
          versioned=True, describe=lambda cfg, r: f"{r['steps']} steps, final loss {r['loss']:.4f}, model: {r['model']}"),
    Stage("eval", reads=("eval", "corpus.max_tokens", "model.trust_remote_code"), run=run_eval,
          needs=("models.target_fingerprint", "models.tokenizer_fingerprint", "train.model", "select.selection", "ingest.holdout"),
          inputs=lambda cfg: [files_key(cfg.eval.paths)], versioned=True, describe=_describe_eval),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGE_NAMES)}")
