"""``spice-ray bench``: does the selection train a better model? One sketch set, many selections.

The pipeline's ingest (with a held-out split) and sketch stages run once under the bench's run
root. Then every *cell* — an arm (a selection method and its settings), a budget and a seed — is
selected from those sketches, fine-tuned from the same base model with the train section's settings
(so every arm of one budget runs the same number of steps), and evaluated on the held-out splits,
per source. A cell is written under ``bench/cells/<arm>/<budget>/s<seed>/`` with a ``_DONE``
marker holding its key: a rerun reuses finished cells and the sketch cache, so a bench can be
interrupted and resumed, and extended with more arms or seeds.

The summary (``bench/results.json``, ``bench/results.md``, ``bench/index.html``), per split, arm and
budget: the overall held-out loss (token-weighted over every source) as mean ± sd over seeds; the
difference to the baseline arm paired by seed, with a 95% confidence interval (Student t); how many
sources are not worse than the baseline; the share of the gap from the baseline to the full-data
arm that the arm closes; the selection's source mix and tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from spice_ray import progress
from spice_ray.config import (
    Config,
    ConfigError,
    SelectConfig,
    _format_error,
    _Section,
    apply_overrides,
    read_yaml,
)
from spice_ray.executor import Executor, Resources, make_executor, resources_of
from spice_ray.storage import Store

logger = logging.getLogger(__name__)

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t, two-sided 95%


class Arm(_Section):
    """One selection to compare: a name, ``select`` settings over the pipeline's, and optionally its own budget."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Arm name (a directory name).")
    select: dict[str, Any] = Field(default_factory=dict, description="select.* settings of this arm.")
    fraction: float | None = Field(None, gt=0, le=1, description="This arm's budget (e.g. 1.0 for full data); None: bench.fractions.")
    seeds: list[int] | None = Field(None, min_length=1, description="This arm's seeds (e.g. one for the full-data arm); None: bench.seeds.")
    match_tokens: str | None = Field(
        None, description="Select as many loss tokens as this other arm's cell of the same budget and seed did "
        "(select.budget=tokens, k = its tokens): e.g. random at SPICE's token count.")


class BenchSection(_Section):
    arms: list[Arm] = Field(description="The selections to compare.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Seeds: selection (random elements) and training.")
    fractions: list[float] = Field(default_factory=lambda: [0.1], description="Budgets of arms without their own.")
    splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Held-out splits to evaluate on.")
    sources: list[str] | None = Field(
        None, min_length=1, description="Evaluate on these held-out sources only (a targeted setting: the target's); None: all.")
    baseline: str = Field("random", description="The arm others are paired against.")
    full: str | None = Field("full", description="The full-data arm, for the share of the gap closed (None: none).")
    keep_models: bool = Field(False, description="Keep each cell's trained model (else deleted once evaluated).")
    eval_batch_size: int = Field(16, gt=0, description="Rows per eval forward pass.")


def load_bench(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, BenchSection]:
    """A bench file: the pipeline's sections plus a ``bench:`` section. ``--set`` applies to both."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict) or "bench" not in data:
        raise ConfigError(f"bench config {path}: expected a mapping with a 'bench' section")
    apply_overrides(data, overrides or [])
    bench_data = data.pop("bench")
    try:
        return Config.model_validate(data), BenchSection.model_validate(bench_data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _cells(bench: BenchSection) -> list[tuple[Arm, float, int]]:
    return [(arm, fraction, seed) for arm in bench.arms for fraction in ([arm.fraction] if arm.fraction else bench.fractions)
            for seed in arm.seeds or bench.seeds]


def _budget_name(fraction: float) -> str:
    return f"f{fraction:g}"


# ------------------------------------------------------------------------------------------- eval


def holdout_rows(holdout: str, splits: list[str], tokenizer: Any, max_tokens: int,
                 sources: list[str] | None = None) -> dict[str, list[dict[str, list[int]]]]:
    """Tokenized held-out rows per ``<split>/<source>`` set (of ``sources`` only, when given)."""
    from spice_ray.evaluate import encode_records, holdout_sets

    out: dict[str, list[dict[str, list[int]]]] = {}
    with tempfile.TemporaryDirectory(prefix="spice-bench-") as tmp:
        for split in splits:
            for source, info in holdout_sets(f"{holdout}/{split}.parquet", Path(tmp) / split).items():
                if sources is not None and source not in sources:
                    continue
                out[f"{split}/{source}"], _ = encode_records(info["records"], tokenizer, max_tokens=max_tokens)
    return out


def score(losses: dict[str, Any], splits: list[str]) -> dict[str, dict[str, Any]]:
    """``{split: {"overall": {loss, tokens}, "sources": {source: {loss, tokens}}}}`` from per-set losses."""
    out: dict[str, dict[str, Any]] = {}
    for split in splits:
        sources = {name.split("/", 1)[1]: v for name, v in losses.items() if name.startswith(f"{split}/") and v["loss"] is not None}
        tokens = sum(v["tokens"] for v in sources.values())
        total = sum(v["loss"] * v["tokens"] for v in sources.values())
        out[split] = {"overall": {"loss": total / tokens if tokens else None, "tokens": tokens},
                      "sources": {s: {"loss": v["loss"], "tokens": v["tokens"]} for s, v in sorted(sources.items())}}
    return out


def _evaluate(executor: Executor, model: str, rows: dict[str, Any], *, batch_size: int, pad_id: int, trust_remote_code: bool,
              resources: Resources) -> dict[str, Any]:
    from spice_ray.evaluate import evaluate_models

    result = executor.call(evaluate_models, {"m": model}, rows, batch_size=batch_size, pad_id=pad_id,
                           trust_remote_code=trust_remote_code, resources=resources)
    return {name: per_model["m"] for name, per_model in result["sets"].items()}


# -------------------------------------------------------------------------------------------- cells


class Bench:
    """The state of one bench run: the shared inputs, and the cells computed or reused."""

    def __init__(self, cfg: Config, bench: BenchSection, executor: Executor) -> None:
        from spice_ray.models import load_tokenizer
        from spice_ray.pipeline import run_pipeline

        self.cfg, self.bench, self.executor = cfg, bench, executor
        # an inner call: the root's status.json and latest.json stay the user's last run's
        outcomes = run_pipeline(cfg, stages=["ingest", "sketch"], executor=executor, record=False)
        self.models = outcomes["models"].result
        self.ingest, self.sketch = outcomes["ingest"].result, outcomes["sketch"].result
        if not self.ingest.get("holdout"):
            raise ConfigError("bench: set corpus.holdout_validation / corpus.holdout_test > 0 (the bench evaluates on them)")
        self.store = Store(cfg.run.root)
        self.inputs_key = _digest({k: outcomes[k].manifest["outputs"] for k in ("ingest", "sketch")} | {
            "target": self.models["target_fingerprint"], "tokenizer": self.models["tokenizer_fingerprint"]})
        self.tokenizer = load_tokenizer(self.models["tokenizer"], trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._rows: dict[str, Any] | None = None

    @property
    def rows(self) -> dict[str, Any]:
        if self._rows is None:
            self._rows = holdout_rows(self.ingest["holdout"], self.bench.splits, self.tokenizer,
                                      self.cfg.eval.max_tokens or self.cfg.corpus.max_tokens, self.bench.sources)
            missing = sorted(set(self.bench.sources or []) - {name.split("/", 1)[1] for name in self._rows})
            if missing:
                raise ConfigError(f"bench.sources: no held-out rows of {', '.join(missing)}")
        return self._rows

    def eval_model(self, model: str) -> dict[str, Any]:
        losses = _evaluate(self.executor, model, self.rows, batch_size=self.bench.eval_batch_size, pad_id=self.pad_id,
                           trust_remote_code=self.cfg.model.trust_remote_code, resources=resources_of(self.cfg.eval))
        return score(losses, self.bench.splits)

    def base(self) -> dict[str, Any]:
        """The base model's held-out losses (computed once)."""
        return self._cached("bench/base", {"inputs": self.inputs_key, "splits": self.bench.splits} | self._sources_key(),
                            lambda out: {"eval": self.eval_model(self.models["target"])})

    def _sources_key(self) -> dict[str, Any]:
        return {"sources": self.bench.sources} if self.bench.sources else {}  # absent: the keys of earlier benches hold

    def _cached(self, rel: str, key_data: dict[str, Any], compute: Any) -> dict[str, Any]:
        key = _digest(key_data)
        if self.store.is_done(rel, key):
            return json.loads(self.store.read_text(f"{rel}/result.json"))
        result = compute(rel)
        self.store.write_text(f"{rel}/result.json", json.dumps(result, indent=2, sort_keys=True))
        self.store.mark_done(rel, key)
        return result

    def cell(self, arm: Arm, fraction: float, seed: int) -> dict[str, Any]:
        budget: dict[str, Any] = {"fraction": fraction, "k": None}
        if arm.match_tokens:  # the other arm's cell first: its tokens are this cell's budget
            other = self.cell(self.arm(arm.match_tokens), fraction, seed)
            budget = {"budget": "tokens", "fraction": None, "k": other["selection"]["loss_tokens"]}
        select = SelectConfig.model_validate(self.cfg.select.model_dump() | arm.select | budget | {"seed": seed})
        cfg = self.cfg.model_copy(deep=True)
        cfg.select, cfg.train.seed = select, seed
        rel = f"bench/cells/{arm.name}/{_budget_name(fraction)}/s{seed}"
        key_data = {"inputs": self.inputs_key, "select": select.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                    "model": cfg.model.model_dump(mode="json"), "max_tokens": cfg.corpus.max_tokens, "splits": self.bench.splits,
                    **self._sources_key()}
        result = self._cached(rel, key_data, lambda out: self._run_cell(cfg, arm, fraction, seed, out))
        if "seconds" not in result["train"] and self.store.exists(f"{rel}/train/train_summary.json"):  # a cell of an older bench
            result["train"]["seconds"] = json.loads(self.store.read_text(f"{rel}/train/train_summary.json")).get("wall_seconds")
        return result

    def arm(self, name: str) -> Arm:
        found = [a for a in self.bench.arms if a.name == name]
        if not found:
            raise ConfigError(f"bench: match_tokens names {name!r}, which is not one of the arms")
        return found[0]

    def _run_cell(self, cfg: Config, arm: Arm, fraction: float, seed: int, rel: str) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from spice_ray.select.stage import run_select_stage
        from spice_ray.train.trainer import run_train_stage

        logger.info("bench: %s at %s, seed %d", arm.name, _budget_name(fraction), seed)
        summary = run_select_stage(self.sketch["sketches"], self.store.uri(f"{rel}/select"), cfg.select, self.executor,
                                   records_path=self.ingest["records"])
        selection = self.store.uri(f"{rel}/select/selection.parquet")
        train = run_train_stage(cfg, self.executor, records_path=self.ingest["records"], selection_path=selection,
                                model_path=self.models["target"], tokenizer_path=self.models["tokenizer"],
                                out_dir=self.store.uri(f"{rel}/train"), max_tokens=cfg.corpus.max_tokens)
        result = {"arm": arm.name, "fraction": fraction, "seed": seed, "k": summary["k_selected"],
                  "selection": {k: summary.get(k) for k in ("method", "alpha", "lam", "scale", "quota", "logdet", "mean_conflict",
                                                            "loss_tokens", "budget")},
                  "source_mix": self._source_mix(pq.read_table(selection, columns=["uid"]).column("uid").to_pylist()),
                  "train": {k: train.get(k) for k in ("steps", "tokens", "loss", "n_train_rows")} | {"seconds": train.get("wall_seconds")},
                  "eval": self.eval_model(train["model"])}
        if not self.bench.keep_models:  # the numbers are kept; a model per cell would fill the disk
            self.store.delete(f"{rel}/train/model")
            self.store.delete(f"{rel}/train/checkpoints")
        return result

    def _source_mix(self, uids: list[str]) -> dict[str, int]:
        import pyarrow.parquet as pq

        from spice_ray.storage import ensure_local

        table = pq.read_table(ensure_local(self.ingest["records"]), columns=["uid", "source"])
        source = dict(zip(table.column("uid").to_pylist(), table.column("source").to_pylist(), strict=True))
        return dict(sorted(Counter(source[u] for u in uids).items()))


# ------------------------------------------------------------------------------------------ summary


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def paired(diffs: list[float]) -> dict[str, float | None]:
    """Mean of paired differences and its two-sided 95% confidence interval (Student t)."""
    mean, sd = _mean_sd(diffs)
    n = len(diffs)
    half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n, "ci_low": None if half is None else mean - half, "ci_high": None if half is None else mean + half}


def summarize(cells: list[dict[str, Any]], base: dict[str, Any], bench: BenchSection) -> dict[str, Any]:
    """Per split, arm and budget: loss mean ± sd, the paired difference to the baseline, sources not
    worse, the share of the baseline→full gap closed, source mix and tokens."""
    by = {(c["arm"], c["fraction"], c["seed"]): c for c in cells}
    rows: dict[str, list[dict[str, Any]]] = {}
    for split in bench.splits:
        full_losses = [c["eval"][split]["overall"]["loss"] for c in cells if c["arm"] == bench.full]
        full = statistics.fmean(full_losses) if full_losses else None
        rows[split] = []
        for arm in bench.arms:
            for fraction in [arm.fraction] if arm.fraction else bench.fractions:
                mine = [by[(arm.name, fraction, s)] for s in arm.seeds or bench.seeds if (arm.name, fraction, s) in by]
                if not mine:
                    continue
                losses = [c["eval"][split]["overall"]["loss"] for c in mine]
                mean, sd = _mean_sd(losses)
                row: dict[str, Any] = {"arm": arm.name, "fraction": fraction, "seeds": len(mine), "loss": mean, "sd": sd,
                                       "tokens": statistics.fmean(c["train"]["tokens"] for c in mine), "steps": mine[0]["train"]["steps"],
                                       "source_mix": _mean_mix([c["source_mix"] for c in mine]), "train_seconds": _mean_of(
                                           [c["train"].get("seconds") for c in mine])}
                pairs = [(c, by.get((bench.baseline, fraction, c["seed"]))) for c in mine]
                pairs = [(c, b) for c, b in pairs if b is not None]
                if pairs and arm.name != bench.baseline:
                    row["vs_baseline"] = paired([c["eval"][split]["overall"]["loss"] - b["eval"][split]["overall"]["loss"] for c, b in pairs])
                    row["sources_not_worse"], row["sources"] = _not_worse(pairs, split)
                    baseline = statistics.fmean(b["eval"][split]["overall"]["loss"] for _, b in pairs)
                    if full is not None and baseline != full:
                        row["gap_closed"] = (baseline - mean) / (baseline - full)
                rows[split].append(row)
    base_loss = {split: base["eval"][split]["overall"]["loss"] for split in bench.splits}
    return {"base": base_loss, "splits": rows, "per_source": _per_source(cells, base, bench)}


def _mean_of(xs: list[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.fmean(known) if known else None


def _mean_mix(mixes: list[dict[str, int]]) -> dict[str, float]:
    total = [sum(m.values()) or 1 for m in mixes]
    sources = sorted({s for m in mixes for s in m})
    return {s: statistics.fmean(m.get(s, 0) / t for m, t in zip(mixes, total, strict=True)) for s in sources}


def _not_worse(pairs: list[tuple[dict[str, Any], dict[str, Any]]], split: str) -> tuple[int, int]:
    sources = sorted(pairs[0][0]["eval"][split]["sources"])
    ok = 0
    for s in sources:
        diffs = [c["eval"][split]["sources"][s]["loss"] - b["eval"][split]["sources"][s]["loss"] for c, b in pairs]
        ok += statistics.fmean(diffs) <= 0
    return ok, len(sources)


def _per_source(cells: list[dict[str, Any]], base: dict[str, Any], bench: BenchSection) -> dict[str, Any]:
    """Mean loss per split, arm@budget and source (and the base model's)."""
    out: dict[str, Any] = {}
    for split in bench.splits:
        losses: dict[str, dict[str, list[float]]] = {}
        for c in cells:
            row = losses.setdefault(f"{c['arm']}@{_budget_name(c['fraction'])}", {})
            for source, v in c["eval"][split]["sources"].items():
                row.setdefault(source, []).append(v["loss"])
        out[split] = {"base": {s: v["loss"] for s, v in base["eval"][split]["sources"].items()}} | {
            name: {s: statistics.fmean(v) for s, v in row.items()} for name, row in losses.items()}
    return out


def table_rows(summary: dict[str, Any], bench: BenchSection, split: str) -> tuple[list[str], list[list[str]]]:
    """The comparison of one split as column names and rows of formatted cells (the Markdown table of
    ``results.md`` and the terminal's table show the same cells)."""
    columns = ["arm", "budget", f"loss (mean ± sd, {len(bench.seeds)} seeds)", f"Δ vs {bench.baseline} (95% CI)",
               "sources not worse", "gap to full closed", "tokens", "steps", "train s"]
    rows = []
    for r in summary["splits"][split]:
        vs = r.get("vs_baseline")
        delta = f"{vs['mean']:+.4f} [{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]" if vs and vs["ci_low"] is not None else (f"{vs['mean']:+.4f}" if vs else "—")
        nw = f"{r['sources_not_worse']}/{r['sources']}" if "sources" in r else "—"
        gap = f"{r['gap_closed']:.0%}" if r.get("gap_closed") is not None else "—"
        loss = f"{r['loss']:.4f} ± {r['sd']:.4f}"
        if r["seeds"] == 1 and len(bench.seeds) != 1:  # an arm run once (the demo's full data): no spread
            loss = f"{r['loss']:.4f} (1 seed)"
        elif r["seeds"] != len(bench.seeds):
            loss += f" ({r['seeds']} seeds)"
        train_s = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "—"
        rows.append([r["arm"], f"{r['fraction']:g}", loss, delta, nw, gap, f"{r['tokens']:.0f}", str(r["steps"]), train_s])
    return columns, rows


def split_title(summary: dict[str, Any], split: str) -> str:
    return f"{split} (base model: {summary['base'][split]:.4f})"


def markdown(summary: dict[str, Any], bench: BenchSection) -> str:
    lines = []
    for split in summary["splits"]:
        columns, rows = table_rows(summary, bench, split)
        lines += [f"### {split_title(summary, split)}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    if summary.get("sketch_seconds") is not None:
        lines += [f"The selection's own cost: sketching the pool took {summary['sketch_seconds']:.0f} s (the proxy's forward "
                  "and backward pass over every pool record), beside each arm's training seconds (`train s`).", ""]
    return "\n".join(lines)


def verdict(summary: dict[str, Any], bench: BenchSection, arm: str, split: str) -> str | None:
    """One sentence on ``arm`` against the baseline on ``split``: which is better, by how much, and
    whether the 95% interval of the paired difference excludes zero; None when they were not paired."""
    rows = {r["arm"]: r for r in summary["splits"].get(split, [])}
    mine, base = rows.get(arm), rows.get(bench.baseline)
    vs = (mine or {}).get("vs_baseline")
    if mine is None or base is None or vs is None:
        return None
    n, diff = vs["n"], vs["mean"]
    budget = f"{mine['fraction']:.0%}"
    if diff == 0:
        head = f"{arm} and {bench.baseline} ({budget} each) reach the same held-out {split} loss, {mine['loss']:.4f}"
    else:
        better, worse = (arm, bench.baseline) if diff < 0 else (bench.baseline, arm)
        rel = abs(diff) / base["loss"] if base["loss"] else 0.0
        head = (f"{better} ({budget}) trains a better model than {worse} ({budget}): held-out {split} loss "
                f"{mine['loss']:.4f} vs {base['loss']:.4f}, {abs(diff):.4f} ({rel:.2%}) {'lower' if diff < 0 else 'higher'} for {arm}")
    seeds = f"over {n} seed{'s' if n != 1 else ''}"
    if vs["ci_low"] is None:
        return f"{head}, {seeds}: one pair, so no interval; too few to tell."
    excludes = vs["ci_low"] > 0 or vs["ci_high"] < 0
    ci = f"[{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]"
    tail = (f"the 95% interval of the difference, {ci}, excludes zero: the difference is real at this confidence"
            if excludes else f"the 95% interval of the difference, {ci}, includes zero: the difference could be chance")
    return f"{head}, {seeds}; {tail}."


def full_data_note(summary: dict[str, Any], bench: BenchSection, split: str) -> str | None:
    """Where the full-data arm lands on ``split``, and the share of the gap the other arms close."""
    rows = {r["arm"]: r for r in summary["splits"].get(split, [])}
    full = rows.get(bench.full) if bench.full else None
    if full is None:
        return None
    closed = [f"{name} closes {r['gap_closed']:.0%} of the gap from {bench.baseline} to it"
              for name, r in rows.items() if r.get("gap_closed") is not None and name != bench.full]
    seeds = f"{full['seeds']} seed{'s' if full['seeds'] != 1 else ''}"
    return f"All the data ({seeds}): held-out {split} loss {full['loss']:.4f}" + (f"; {', '.join(closed)}." if closed else ".")


def run_bench(cfg: Config, bench: BenchSection, executor: Executor | None = None) -> dict[str, Any]:
    """Run (or resume) every cell, write ``bench/results.json``, ``results.md`` and ``index.html``; the summary."""
    if bench.baseline not in {a.name for a in bench.arms}:
        raise ConfigError(f"bench.baseline {bench.baseline!r} is not one of the arms")
    unknown = [a.match_tokens for a in bench.arms if a.match_tokens and a.match_tokens not in {b.name for b in bench.arms}]
    if unknown:
        raise ConfigError(f"bench: match_tokens names {unknown[0]!r}, which is not one of the arms")
    executor = executor or make_executor(cfg.run.executor, address=cfg.run.ray_address)
    state = Bench(cfg, bench, executor)
    base = state.base()
    todo = _cells(bench)
    cells = []
    for i, (arm, fraction, seed) in enumerate(todo):
        progress.update("bench (cells)", i, len(todo))
        cells.append(state.cell(arm, fraction, seed))
    progress.update("bench (cells)", len(todo), len(todo))
    summary = summarize(cells, base, bench)
    summary["cells"] = cells
    if not state.sketch.get("n_cached"):  # sketched here, not taken from the cache: its seconds are its cost
        summary["sketch_seconds"] = state.sketch.get("compute_seconds")
    state.store.write_text("bench/results.json", json.dumps(summary, indent=2, sort_keys=True))
    table = markdown(summary, bench)
    state.store.write_text("bench/results.md", table)
    from spice_ray.report.bench import write_bench_report

    write_bench_report(state.store, summary, bench, table)
    return summary


DEMO_SEEDS = 3  # the demo's comparison: enough seeds for a paired 95% interval


def demo_comparison(cfg: Config, executor: Executor | None = None) -> tuple[dict[str, Any], BenchSection]:
    """The demo's last word: the configured selection vs a random one of the same budget, each over
    three seeds (``train.seed`` and the next two: selection and training), and all the data once (it
    is not paired with anything; one seed keeps the demo short), on the test split. The demo's model
    is tiny, so the cells run in this process (the local executor, one train worker) unless an
    executor is given."""
    from spice_ray.executor import LocalExecutor

    local = cfg.model_copy(deep=True)
    local.train.num_workers, local.run.executor = 1, "local"
    seeds = [cfg.train.seed + i for i in range(DEMO_SEEDS)]
    arms = [{"name": cfg.select.method, "select": {}}, {"name": "random", "select": {"method": "random"}},
            {"name": "full", "select": {"method": "random"}, "fraction": 1.0, "seeds": seeds[:1]}]
    if cfg.select.method == "random":
        arms = arms[1:]
    bench = BenchSection.model_validate({"arms": arms, "seeds": seeds, "splits": ["test"],
                                         "fractions": [cfg.select.fraction or 0.1]})
    return run_bench(local, bench, executor or LocalExecutor()), bench
