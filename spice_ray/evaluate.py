"""Eval stage: held-out loss and perplexity of the base and the fine-tuned target model.

Eval sets are instruction files in any corpus format (``eval.paths``, one set per file or
directory, named by its stem). Each goes through the same ingest as the corpus (formats,
validation, quarantine, dedup: ``spice_ray.corpus.ingest``) into ``<root>/eval/sets/<name>/`` and is
tokenized with the same chat rendering and response mask as the sketch and train stages
(``spice_ray.corpus.tokenize.encode_batch``, ``loss_on="response"``). Rows whose uid was trained on
(in the selection) are dropped (``eval.exclude_train_overlap``). With no ``eval.paths`` the set is a
generated demo corpus with another seed (``eval.demo_seed``), so the demo shows eval numbers.

Metric, per set and model: the token-weighted mean cross-entropy over the response tokens,

    loss = Σ_rows Σ_{t: label_t ≠ -100} −log p(label_t | tokens_<t) / Σ_rows #{t: label_t ≠ -100}

(labels shifted by one, as the model's own loss), and perplexity = exp(loss). Both models run in
one unit of work of the executor (``eval.num_gpus``; bf16 on GPU, fp32 on CPU), one after the other.

Output: ``<root>/eval/results.json`` (and the stage manifest's result)::

    {"models": {"base": ..., "tuned": ...}, "device": ..., "dtype": ...,
     "sets": {"<name>": {"n": rows, "tokens": loss tokens, "n_quarantined": ..., "n_overlap_dropped": ...,
                         "base": {"loss": ..., "perplexity": ...}, "tuned": {...}, "loss_delta": tuned − base}}}

``run_lm_eval`` hands an exported model to lm-eval-harness (``pip install 'spice-ray[eval]'``) as
its ``hf`` model: ``spice-ray eval RUN --lm-eval TASKS``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from spice_ray.config import Config, CorpusConfig
from spice_ray.executor import Executor, Resources, resources_of
from spice_ray.storage import Store, is_uri, uri_filesystem

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LM_EVAL_FILE = "lm_eval.json"
DEMO_SET = "demo_heldout"


class LmEvalMissing(RuntimeError):
    """lm-eval-harness is not installed."""


# ------------------------------------------------------------------------------------------ eval sets


def _set_names(paths: Sequence[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = Path(p.rstrip("/")).stem or "eval"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def holdout_sets(split_path: str, out_dir: Path) -> dict[str, dict[str, Any]]:
    """One eval set per source of a holdout split (already ingested: no second ingest)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from spice_ray.storage import ensure_local

    table = pq.read_table(ensure_local(split_path))
    sets: dict[str, dict[str, Any]] = {}
    for source in sorted(set(table.column("source").to_pylist())):
        path = out_dir / "sets" / f"{source}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = table.filter(pc.equal(table.column("source"), source))
        pq.write_table(part, path)
        sets[source] = {"records": str(path), "n_in": part.num_rows, "n_quarantined": 0, "paths": [split_path]}
    return sets


def prepare_eval_sets(cfg: Config, tokenizer: Any, out_dir: str | Path, holdout: str | None = None) -> dict[str, dict[str, Any]]:
    """Ingest every eval set into ``out_dir/sets/<name>/``; ``{name: {records, n_in, n_quarantined, paths}}``.
    With ``eval.holdout`` the sets are the sources of that split under ``holdout`` (the ingest's)."""
    from spice_ray.corpus.demo import write_demo_corpus
    from spice_ray.corpus.ingest import ingest

    out = Path(out_dir)
    ecfg = cfg.eval
    if ecfg.holdout != "none":
        if not holdout:
            raise ValueError(f"eval.holdout={ecfg.holdout} needs a holdout split: set corpus.holdout_{ecfg.holdout} > 0")
        return holdout_sets(f"{holdout}/{ecfg.holdout}.parquet", out)
    ccfg = CorpusConfig(format=ecfg.format, max_tokens=ecfg.max_tokens or cfg.corpus.max_tokens)
    if ecfg.paths:
        inputs = {name: [p] for name, p in zip(_set_names(ecfg.paths), ecfg.paths, strict=True)}
    else:
        files = write_demo_corpus(out / "demo_corpus", n=ecfg.demo_size, seed=ecfg.demo_seed)
        inputs = {DEMO_SET: [str(f) for f in files]}
    sets: dict[str, dict[str, Any]] = {}
    for name, paths in inputs.items():
        result = ingest(ccfg, tokenizer, out / "sets" / name, inputs=paths)
        sets[name] = {
            "records": result.records_path,
            "n_in": result.n_in,
            "n_quarantined": result.n_quarantined,
            "paths": paths,
        }
    return sets


def encode_records(
    records_path: str, tokenizer: Any, *, max_tokens: int | None, exclude: frozenset[str] = frozenset()
) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenized rows (``input_ids``, ``labels``) of a records parquet, minus uids in ``exclude`` and
    rows with no response token; also the number of rows dropped as overlap."""
    import pyarrow.parquet as pq

    from spice_ray.corpus.tokenize import encode_batch

    table = pq.read_table(records_path, columns=["uid", "messages"])
    uids = table.column("uid").to_pylist()
    keep = [i for i, u in enumerate(uids) if u not in exclude]
    messages = table.column("messages").to_pylist()
    encoded = encode_batch(tokenizer, [messages[i] for i in keep], max_tokens=max_tokens, loss_on="response")
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if e.n_loss_tokens > 0]
    return rows, len(uids) - len(keep)


# ------------------------------------------------------------------------------------------- metric


@torch.no_grad()
def loss_sums(model: Any, rows: Sequence[dict[str, list[int]]], *, batch_size: int, pad_id: int) -> tuple[float, int]:
    """Σ per-token cross-entropy over the label tokens of ``rows`` and their count (labels shifted
    by one). Rows are batched by length (little padding); CE is computed in float32."""
    from spice_ray.corpus.tokenize import IGNORE_INDEX

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            labels[j, :n] = torch.tensor(r["labels"])
            mask[j, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for j in range(len(batch)):  # one row at a time: float32 logits of a whole batch can be GBs
            target = labels[j, 1:].to(device)
            keep = target != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            row_logits = logits[j, :-1][keep].float()
            total += float(torch.nn.functional.cross_entropy(row_logits, target[keep], reduction="sum"))
            count += int(keep.sum())
        del logits
    return total, count


def summarize(total: float, count: int) -> dict[str, float | None]:
    if count == 0:
        return {"loss": None, "perplexity": None}
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def evaluate_models(
    model_paths: dict[str, str],
    sets: dict[str, list[dict[str, list[int]]]],
    *,
    batch_size: int,
    pad_id: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity of every model on every set: ``{set: {model: {loss, perplexity, tokens}}}``."""
    from spice_ray.models import load_causal_lm

    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    dtype = "bfloat16" if use_gpu else "float32"
    out: dict[str, Any] = {"device": device.type, "dtype": dtype, "sets": {name: {} for name in sets}}
    for label, path in model_paths.items():
        t0 = time.time()
        with _local_model(path) as local:
            model = load_causal_lm(local, trust_remote_code=trust_remote_code, dtype=dtype).to(device).eval()
        for name, rows in sets.items():
            total, count = loss_sums(model, rows, batch_size=batch_size, pad_id=pad_id)
            out["sets"][name][label] = {**summarize(total, count), "tokens": count}
        logger.info("eval: %s (%s) on %d sets in %.1f s", label, path, len(sets), time.time() - t0)
        del model
        if use_gpu:
            torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def _local_model(path: str) -> Iterator[str]:
    """A local directory with the model at ``path``: itself, or a temporary copy of a URI (s3://, ...)."""
    if not is_uri(path):
        yield path
        return
    import pyarrow.fs as pafs

    fs, remote = uri_filesystem(path)
    with tempfile.TemporaryDirectory(prefix="spice-eval-model-") as tmp:
        pafs.copy_files(remote, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


# -------------------------------------------------------------------------------------------- stage


def run_eval_stage(
    cfg: Config,
    executor: Executor,
    *,
    out_dir: str,
    base_model: str,
    tuned_model: str,
    tokenizer_path: str,
    selection_path: str | None = None,
    holdout: str | None = None,
    resources: Resources | None = None,
) -> dict[str, Any]:
    """Evaluate ``base_model`` (when ``eval.base``) and ``tuned_model`` on the eval sets; write
    ``out_dir/results.json`` and return the same dict. ``resources``: the eval task's (default:
    ``resources_of(cfg.eval)``)."""
    from spice_ray.models import load_tokenizer

    t0 = time.time()
    ecfg = cfg.eval
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    exclude: frozenset[str] = frozenset()
    if ecfg.exclude_train_overlap and selection_path:
        import pyarrow.parquet as pq

        exclude = frozenset(u for u in pq.read_table(selection_path, columns=["uid"]).column("uid").to_pylist() if u)
    prepared = prepare_eval_sets(cfg, tokenizer, out, holdout)
    max_tokens = ecfg.max_tokens or cfg.corpus.max_tokens
    encoded: dict[str, list[dict[str, list[int]]]] = {}
    overlap: dict[str, int] = {}
    for name, info in prepared.items():
        encoded[name], overlap[name] = encode_records(info["records"], tokenizer, max_tokens=max_tokens, exclude=exclude)
        if not encoded[name]:
            logger.warning("eval set %s has no rows left to evaluate", name)

    model_paths = {"base": base_model, "tuned": tuned_model} if ecfg.base else {"tuned": tuned_model}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = executor.call(
        evaluate_models, model_paths, encoded, batch_size=ecfg.batch_size, pad_id=pad_id,
        trust_remote_code=cfg.model.trust_remote_code,
        resources=resources or resources_of(ecfg),
    )

    sets: dict[str, Any] = {}
    for name, info in prepared.items():
        per_model = scores["sets"][name]
        entry: dict[str, Any] = {
            "n": len(encoded[name]),
            "tokens": per_model["tuned"]["tokens"],
            "n_in": info["n_in"],
            "n_quarantined": info["n_quarantined"],
            "n_overlap_dropped": overlap[name],
        }
        for label in model_paths:
            entry[label] = {k: per_model[label][k] for k in ("loss", "perplexity")}
        if "base" in entry and entry["base"]["loss"] is not None and entry["tuned"]["loss"] is not None:
            entry["loss_delta"] = entry["tuned"]["loss"] - entry["base"]["loss"]
        sets[name] = entry
    if ecfg.holdout != "none":
        sets = {"overall": overall(sets, list(model_paths)), **sets}
    results = {
        "models": model_paths,
        "device": scores["device"],
        "dtype": scores["dtype"],
        "max_tokens": max_tokens,
        "sets": sets,
        "seconds": round(time.time() - t0, 3),
    }
    Store(str(out)).write_text(RESULTS_FILE, json.dumps(results, indent=2))
    for name, entry in sets.items():
        logger.info(
            "eval %s: n=%d tokens=%d base=%s tuned=%s", name, entry["n"], entry["tokens"],
            entry.get("base", {}).get("loss"), entry["tuned"]["loss"],
        )
    return results


def overall(sets: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """The token-weighted loss over several eval sets (every loss token counts once)."""
    entry: dict[str, Any] = {name: sum(e[name] for e in sets.values()) for name in ("n", "tokens", "n_in", "n_quarantined", "n_overlap_dropped")}
    for label in labels:
        tokens = sum(e["tokens"] for e in sets.values() if e[label]["loss"] is not None)
        total = sum(e[label]["loss"] * e["tokens"] for e in sets.values() if e[label]["loss"] is not None)
        entry[label] = summarize(total, tokens)
    if "base" in entry and entry["base"]["loss"] is not None and entry["tuned"]["loss"] is not None:
        entry["loss_delta"] = entry["tuned"]["loss"] - entry["base"]["loss"]
    return entry


# ------------------------------------------------------------------------------------------ lm-eval


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(
    model_dir: str,
    tasks: Sequence[str],
    *,
    out_path: str | Path | None = None,
    limit: float | None = None,
    batch_size: int | str = 8,
    include_path: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate an exported model with lm-eval-harness (its ``hf`` model) on ``tasks``.

    ``include_path``: a directory of extra task YAMLs (local data sets). Returns lm-eval's per-task
    ``results`` (and writes them, with the task configs, to ``out_path``). Raises
    :class:`LmEvalMissing` when lm-eval is not installed.
    """
    if not lm_eval_available():
        raise LmEvalMissing(
            "lm-eval-harness is not installed: pip install 'spice-ray[eval]' (or pip install lm-eval) "
            "in the environment that runs the evaluation"
        )
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    use_gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
    device = device or ("cuda" if use_gpu else "cpu")
    model_args = {"pretrained": str(model_dir), "dtype": "bfloat16" if use_gpu else "float32"}
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    out = evaluator.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
        task_manager=manager,
    )
    if out is None:  # only non-zero ranks of a distributed lm-eval return None
        return {}
    results = {"model": str(model_dir), "model_args": model_args, "tasks": list(tasks), "limit": limit,
               "results": out.get("results", {}), "versions": out.get("versions", {})}
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(results, indent=2, default=str))
    return results
