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

A stage also declares what it reads without it changing its output (``sees``: a loading permission,
a section handed whole to workers that use only declared fields of it; not part of the key), its
``parts`` (a sub-step that runs only for some configs and reads whole sections: the sketch stage's
warm-up trains with the train section; its sections' fingerprint is part of the key while it runs),
its ``resources`` (one :class:`~spice_ray.executor.Resources` from the config, through
:func:`~spice_ray.executor.resources_of`) and its ``outputs`` (the result keys it produces, typed
in :mod:`spice_ray.stage_results`). It runs with a view of the config (:meth:`Stage.view`) in which
reading anything else is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from spice_ray.config import Config
from spice_ray.config_view import ConfigView
from spice_ray.executor import Executor, Resources, resources_of
from spice_ray.stage_results import (
    EvalResult,
    IngestResult,
    ModelsResult,
    SelectResult,
    SketchResult,
    TrainResult,
    Upstream,
    outputs_of,
)
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
    cfg: Config  # the stage's view of the config (Stage.view): only what it declares
    executor: Executor
    dirs: StageDirs
    upstream: Upstream  # the result of every stage named in ``needs``
    root_uri: str
    resources: Resources | None = None  # what one unit of its work needs (Stage.resources)


@dataclass(frozen=True)
class Part:
    """A declared sub-step of a stage that runs only ``when(cfg)``: it reads the whole ``sections``,
    and while it runs their fingerprint (``Config.fingerprint``) is one of the stage's key inputs."""

    name: str
    sections: tuple[str, ...]
    when: Callable[[Config], bool]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]  # config values in the key
    run: Callable[[StageContext], Any]  # returns the stage's result (stage_results), a dict
    needs: tuple[str, ...] = ()
    inputs: Callable[[Config], list[str]] = field(default=lambda cfg: [])
    versioned: bool = False
    describe: Callable[[Config, dict[str, Any]], str] = field(default=lambda cfg, r: "")
    sees: tuple[str, ...] = ()  # config it reads that does not change its output (not in the key)
    parts: tuple[Part, ...] = ()
    resources: Callable[[Config], Resources | None] = field(default=lambda cfg: None)  # None: the driver only
    outputs: tuple[str, ...] = ()  # result keys it must return (the required keys of its result type)

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.split(".", 1)[0] for n in self.needs))

    def active_parts(self, cfg: Config) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.when(cfg))

    def key_inputs(self, cfg: Config) -> list[str]:
        """The key's ``inputs``: the fingerprint of each running part's sections, then ``inputs``."""
        return [cfg.fingerprint(*p.sections) for p in self.active_parts(cfg)] + self.inputs(cfg)

    def declared(self, cfg: Config) -> tuple[str, ...]:
        """Every config name the stage may read for ``cfg``: reads, sees and its running parts' sections."""
        return (*self.reads, *self.sees, *(s for p in self.active_parts(cfg) for s in p.sections))

    def view(self, cfg: Config) -> Config:
        """``cfg`` as this stage sees it: reading what it does not declare raises
        :class:`~spice_ray.config_view.UndeclaredConfigRead`."""
        return cast(Config, ConfigView(cfg, self.declared(cfg), self.name))

    def check_result(self, result: Any) -> None:
        """Refuse a result without one of the declared outputs."""
        if not isinstance(result, dict):
            raise TypeError(f"stage {self.name} returned a {type(result).__name__}, not a dict of its outputs")
        missing = [name for name in self.outputs if name not in result]
        if missing:
            raise ValueError(f"stage {self.name} returned no {', '.join(missing)} (its declared outputs: {', '.join(self.outputs)})")


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


def run_models(ctx: StageContext) -> ModelsResult:
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


def run_ingest(ctx: StageContext) -> IngestResult:
    from spice_ray.corpus.ingest import QUARANTINE_FILE, RECORDS_FILE, ingest
    from spice_ray.corpus.ingest_cache import IngestCache
    from spice_ray.models import load_tokenizer
    from spice_ray.storage import ensure_local

    models = ctx.upstream["models"]
    tokenizer = load_tokenizer(ensure_local(models["tokenizer"]), trust_remote_code=ctx.cfg.model.trust_remote_code)
    # Files unchanged since an earlier run (same content, name and settings) come from the cache.
    cache = IngestCache(f"{ctx.root_uri}/{INGEST_CACHE}", models["tokenizer_fingerprint"])
    result = ingest(ctx.cfg.corpus, tokenizer, ctx.dirs.local, cache=cache)  # no corpus.paths: the demo corpus
    out: IngestResult = {
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
    return cast(IngestResult, out | split_holdout(ctx.cfg, ctx.dirs))


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
    """An optimizer_state is keyed by content (a warm-up is the stage's part ``warmup``: WARMUP)."""
    if not cfg.sketch.optimizer_state:
        return []
    from spice_ray.sketch.stage import digest_path
    from spice_ray.storage import ensure_local

    return [digest_path(Path(ensure_local(cfg.sketch.optimizer_state)).expanduser())]


# The warm-up (sketch.warmup_fraction > 0) fine-tunes the proxy's LoRA with the train stage's code and
# settings (sketch.stage.run_warmup): the train section's fingerprint is in the sketch key while it runs.
WARMUP = Part("warmup", sections=("train",), when=lambda cfg: cfg.sketch.warmup_fraction > 0)


def run_sketch(ctx: StageContext) -> SketchResult:
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
        resources=ctx.resources,
    )
    return cast(SketchResult, {"sketches": f"{ctx.dirs.uri}/sketches", **counts})


# ------------------------------------------------------------------------------------------- select


def run_select(ctx: StageContext) -> SelectResult:
    from spice_ray.select.output import SELECTION_FILE
    from spice_ray.select.stage import run_select_stage

    summary = run_select_stage(ctx.upstream["sketch"]["sketches"], ctx.dirs.uri, ctx.cfg.select, ctx.executor,
                               records_path=ctx.upstream["ingest"]["records"], resources=ctx.resources)
    return cast(SelectResult, {"selection": f"{ctx.dirs.uri}/{SELECTION_FILE}", **summary})


# -------------------------------------------------------------------------------------------- train


def run_train(ctx: StageContext) -> TrainResult:
    from spice_ray.train import run_train_stage

    models = ctx.upstream["models"]
    cfg = within_context(ctx)
    return cast(TrainResult, run_train_stage(
        cfg,
        ctx.executor,
        records_path=ctx.upstream["ingest"]["records"],
        selection_path=ctx.upstream["select"]["selection"],
        model_path=models["target"],
        tokenizer_path=models["tokenizer"],
        out_dir=ctx.dirs.uri,
        max_tokens=cfg.corpus.max_tokens,
        resources=ctx.resources,
    ))


# --------------------------------------------------------------------------------------------- eval


def run_eval(ctx: StageContext) -> EvalResult:
    from spice_ray.evaluate import RESULTS_FILE, run_eval_stage

    models = ctx.upstream["models"]
    return cast(EvalResult, {"results_file": f"{ctx.dirs.uri}/{RESULTS_FILE}"} | run_eval_stage(
        within_context(ctx),
        ctx.executor,
        out_dir=str(ctx.dirs.local),
        base_model=models["target"],
        tuned_model=ctx.upstream["train"]["model"],
        tokenizer_path=models["tokenizer"],
        selection_path=ctx.upstream["select"]["selection"],
        holdout=ctx.upstream["ingest"].get("holdout"),
        resources=ctx.resources,
    ))


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


# What a stage reads without it changing its output (Stage.sees; not in the key):
_TOKENIZER_LOADING = ("model.trust_remote_code",)  # ingest loads the tokenizer its key has the fingerprint of
# The sketch workers and the train workers get the whole model section (they use only the proxy's or
# the target's LoRA, init_seed and trust_remote_code, which their stage reads); the warm-up's own
# cache key (sketch/<warmup>/_DONE) hashes it whole too.
_WHOLE_MODEL = ("model",)

STAGES: tuple[Stage, ...] = (
    Stage("models", reads=("model.proxy", "model.target", "model.tokenizer", *_LOADING), run=run_models,
          outputs=outputs_of(ModelsResult), describe=lambda cfg, r: f"proxy {r.get('proxy')}, target {r.get('target')}"),
    Stage("ingest", reads=("corpus",), sees=_TOKENIZER_LOADING, run=run_ingest, needs=("models.tokenizer_fingerprint",),
          inputs=lambda cfg: [files_key(cfg.corpus.paths)], outputs=outputs_of(IngestResult), describe=_describe_ingest),
    Stage("sketch", reads=("sketch", "corpus.max_tokens", "model.proxy_lora", *_LOADING), sees=_WHOLE_MODEL, parts=(WARMUP,),
          run=run_sketch, needs=("models.proxy_fingerprint", "models.proxy_tokenizer_fingerprint", "ingest.records"),
          inputs=sketch_inputs, resources=lambda cfg: resources_of(cfg.sketch), outputs=outputs_of(SketchResult),
          describe=lambda cfg, r: f"{r['n_sketches']} sketches ({r['n_computed']} computed), d={cfg.sketch.dim}"),
    Stage("select", reads=("select",), run=run_select, needs=("sketch.sketches", "ingest.records"),
          inputs=lambda cfg: [files_key([cfg.select.target])] if cfg.select.target else [],
          resources=lambda cfg: resources_of(cfg.select), outputs=outputs_of(SelectResult), describe=_describe_select),
    Stage("train", reads=("train", "corpus.max_tokens", "model.target_lora", *_LOADING), sees=_WHOLE_MODEL, run=run_train,
          needs=("models.target_fingerprint", "models.tokenizer_fingerprint", "ingest.records", "select.selection"),
          versioned=True, resources=lambda cfg: resources_of(cfg.train), outputs=outputs_of(TrainResult),
          describe=lambda cfg, r: f"{r['steps']} steps, final loss {r['loss']:.4f}, model: {r['model']}"),
    Stage("eval", reads=("eval", "corpus.max_tokens", "model.trust_remote_code"), run=run_eval,
          needs=("models.target_fingerprint", "models.tokenizer_fingerprint", "train.model", "select.selection", "ingest.holdout"),
          inputs=lambda cfg: [files_key(cfg.eval.paths)], versioned=True, resources=lambda cfg: resources_of(cfg.eval),
          outputs=outputs_of(EvalResult), describe=_describe_eval),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGE_NAMES)}")
