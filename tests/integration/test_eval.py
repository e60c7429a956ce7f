"""Eval stage: held-out loss / perplexity against a per-token cross-entropy computed by hand, the
stage's results.json (base vs tuned, overlap with the selection dropped), the CLI's message when
lm-eval is missing, and an lm-eval-harness smoke on an exported model (when lm-eval is installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spice_ray.config import Config, EvalConfig
from spice_ray.corpus.formats import canonical_uid, normalize_row

ALPACA = [
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."}
    for a, b in [(3, 4), (10, 22), (7, 7), (120, 5), (1, 99), (45, 45)]
]
CHATS = [
    {"messages": [{"role": "user", "content": f"Say the word {w} twice."}, {"role": "assistant", "content": f"{w} {w}"}]}
    for w in ["apple", "river", "stone", "cloud", "violin"]
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hand_loss(model, rows) -> tuple[float, int]:
    """Σ −log p(label_t | tokens_<t) over the label tokens, one row at a time, no batching."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(1, len(r["labels"])):
                if r["labels"][t] != -100:
                    total -= float(logp[t - 1, r["labels"][t]])
                    count += 1
    return total, count


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """A 'fine-tuned' model: the tiny model with its q projections nudged (same tokenizer)."""
    from spice_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(src))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "q_proj" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    load_tokenizer(str(src)).save_pretrained(dst)
    return dst


def test_loss_sums_match_per_token_cross_entropy_by_hand(tiny_model_dir: Path) -> None:
    from spice_ray.corpus.tokenize import encode_batch
    from spice_ray.evaluate import loss_sums, summarize
    from spice_ray.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    chats = [normalize_row(r) for r in ALPACA + CHATS]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encode_batch(tok, chats, loss_on="response")]
    model = load_causal_lm(str(tiny_model_dir)).eval()
    expected_total, expected_count = _hand_loss(model, rows)
    for batch_size in (1, 4, 64):  # batching by length and padding do not change the numbers
        total, count = loss_sums(model, rows, batch_size=batch_size, pad_id=tok.pad_token_id)
        assert count == expected_count
        assert total == pytest.approx(expected_total, rel=1e-5)
    s = summarize(expected_total, expected_count)
    assert s["loss"] == pytest.approx(expected_total / expected_count)
    assert s["perplexity"] == pytest.approx(math.exp(expected_total / expected_count))
    assert summarize(0.0, 0) == {"loss": None, "perplexity": None}


def test_eval_stage_results_match_direct_computation(ray_executor, tiny_model_dir: Path, tmp_path: Path) -> None:
    from spice_ray.corpus.tokenize import encode_batch
    from spice_ray.evaluate import RESULTS_FILE, run_eval_stage
    from spice_ray.models import load_causal_lm, load_tokenizer

    tuned = _perturbed_copy(tiny_model_dir, tmp_path / "tuned")
    math_file = _write_jsonl(tmp_path / "math.jsonl", ALPACA)
    chat_file = _write_jsonl(tmp_path / "words.jsonl", [*CHATS, {"bad": "row"}])
    # the selection (rows trained on) holds the first arithmetic row: it must not be evaluated
    trained_uid = canonical_uid(normalize_row(ALPACA[0]))
    pq.write_table(pa.table({"uid": [trained_uid, "not-in-any-set"]}), tmp_path / "selection.parquet")

    cfg = Config(eval=EvalConfig(paths=[str(math_file), str(chat_file)], batch_size=3))
    results = run_eval_stage(
        cfg, ray_executor, out_dir=str(tmp_path / "eval"), base_model=str(tiny_model_dir), tuned_model=str(tuned),
        tokenizer_path=str(tiny_model_dir), selection_path=str(tmp_path / "selection.parquet"),
    )
    assert json.loads((tmp_path / "eval" / RESULTS_FILE).read_text()) == results
    assert set(results["sets"]) == {"math", "words"}
    assert results["models"] == {"base": str(tiny_model_dir), "tuned": str(tuned)}
    m, w = results["sets"]["math"], results["sets"]["words"]
    assert (m["n"], m["n_overlap_dropped"], m["n_quarantined"]) == (5, 1, 0)
    assert (w["n"], w["n_overlap_dropped"], w["n_quarantined"]) == (5, 0, 1)  # the bad row is quarantined

    tok = load_tokenizer(str(tiny_model_dir))
    sets = {"math": [normalize_row(r) for r in ALPACA[1:]], "words": [normalize_row(r) for r in CHATS]}
    for label, path in (("base", tiny_model_dir), ("tuned", tuned)):
        model = load_causal_lm(str(path)).eval()
        for name, chats in sets.items():
            rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in encode_batch(tok, chats, loss_on="response")]
            total, count = _hand_loss(model, rows)
            entry = results["sets"][name]
            assert entry["tokens"] == count
            assert entry[label]["loss"] == pytest.approx(total / count, rel=1e-5)
            assert entry[label]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    for entry in (m, w):
        assert entry["loss_delta"] == pytest.approx(entry["tuned"]["loss"] - entry["base"]["loss"])
        assert entry["tuned"]["loss"] != entry["base"]["loss"]


def test_cli_lm_eval_missing_says_how_to_install(monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import spice_ray.evaluate as evaluate
    from spice_ray.cli import app

    monkeypatch.setattr(evaluate, "lm_eval_available", lambda: False)
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--lm-eval", "hellaswag"])
    assert result.exit_code == 2
    assert "pip install 'spice-ray[eval]'" in result.output and "Traceback" not in result.output
    with pytest.raises(evaluate.LmEvalMissing, match="lm-eval"):
        evaluate.run_lm_eval(str(tmp_path), ["hellaswag"])


LM_EVAL_TASK = """\
task: spice_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_lm_eval_smoke_on_an_exported_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The exported layout (config, safetensors, tokenizer) loads as lm-eval-harness's ``hf`` model;
    a local multiple-choice task (no download) runs end to end."""
    pytest.importorskip("lm_eval", reason="lm-eval-harness not installed (pip install 'spice-ray[eval]')")
    from spice_ray.evaluate import run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _write_jsonl(
        tmp_path / "smoke.jsonl",
        [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]],
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "spice_smoke.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = run_lm_eval(str(tiny_model_dir), ["spice_smoke"], out_path=tmp_path / "lm_eval.json", limit=4,
                      batch_size=2, include_path=str(tasks), device="cpu")
    acc = out["results"]["spice_smoke"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert json.loads((tmp_path / "lm_eval.json").read_text())["results"]["spice_smoke"]["acc,none"] == acc
