"""Train stage: DeepSpeed presets, the tokenizing UDF, and a real 2-worker Ray Train + DeepSpeed run
(ZeRO-2, LoRA) with checkpoints, export and resume."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import Config, ModelConfig, TrainConfig
from spice_ray.train.deepspeed_config import deepspeed_config

TOPICS = ["rivers", "bread", "stars", "trains", "music", "chess", "tea", "rain", "maps", "bees"]


def _records(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        messages = [
            {"role": "user", "content": f"Tell me one fact about {topic} (question {i})."},
            {"role": "assistant", "content": f"Here is fact number {i} about {topic}: it is {i % 7 + 2} times nicer than you think."},
        ]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are brief."})
        uid = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        rows.append({"uid": uid, "source": f"src{i % 2}", "messages": messages, "n_tokens": 0, "file": "inline", "line": i})
    return rows


def _write_inputs(tmp_path: Path, n: int = 40, n_selected: int = 32) -> tuple[str, str, list[dict]]:
    rows = _records(n)
    records = tmp_path / "records"
    records.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), records / "part-0.parquet")
    picked = rows[::-1][:n_selected]  # not the records' order: the filter must go by uid
    selection = pa.table(
        {
            "uid": [r["uid"] for r in picked],
            "rank": list(range(len(picked))),
            "gain": [1.0 / (k + 1) for k in range(len(picked))],
            "conflict": [0.0] * len(picked),
            "score": [1.0 / (k + 1) for k in range(len(picked))],
        }
    )
    pq.write_table(selection, tmp_path / "selection.parquet")
    return str(records), str(tmp_path / "selection.parquet"), rows


# ---------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_config(stage: int, use_gpu: bool) -> None:
    cfg = TrainConfig(zero_stage=stage, micro_batch_size=3, grad_accum=2, max_grad_norm=0.5)
    ds = deepspeed_config(cfg, world_size=4, use_gpu=use_gpu)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] is use_gpu
    assert not ds.get("fp16", {}).get("enabled", False)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    with pytest.raises(ValueError):
        deepspeed_config(cfg, world_size=0, use_gpu=False)


def test_select_and_tokenize_udf(tiny_model_dir: Path, tmp_path: Path) -> None:
    from spice_ray.train.trainer import SelectAndTokenize

    rows = _records(10)
    table = pa.Table.from_pylist(rows).select(["uid", "messages"])
    wanted = {rows[1]["uid"], rows[4]["uid"], rows[7]["uid"]}
    udf = SelectAndTokenize(str(tiny_model_dir), wanted, max_tokens=1024)
    out = udf(table)
    assert out.column_names == ["uid", "input_ids", "labels", "n_tokens"]
    assert set(out.column("uid").to_pylist()) == wanted
    for ids, labels, n in zip(*(out.column(c).to_pylist() for c in ("input_ids", "labels", "n_tokens"))):
        assert len(ids) == len(labels) == n
        assert labels[0] == -100  # the prompt is masked
        assert any(label != -100 for label in labels)
    # a max_tokens that cuts every response off leaves no trainable row
    assert SelectAndTokenize(str(tiny_model_dir), wanted, max_tokens=3)(table).num_rows == 0
    assert udf(table.slice(0, 0)).num_rows == 0


# ------------------------------------------------------------------------------- Ray + DeepSpeed


def _cfg(max_steps: int) -> Config:
    return Config(
        model=ModelConfig(lora_r=4, lora_alpha=8.0),
        train=TrainConfig(
            num_workers=2,
            cpus_per_worker=0.5,
            use_gpu=None,
            zero_stage=2,
            lora=True,
            epochs=1,
            max_steps=max_steps,
            micro_batch_size=2,
            grad_accum=1,
            lr=5e-3,
            checkpoint_every=2,
        ),
    )


@pytest.mark.slow
def test_train_lora_zero2_checkpoint_export_resume(ray_session, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import add_lora, load_causal_lm
    from spice_ray.train import run_train_stage

    records, selection, _ = _write_inputs(tmp_path)
    out_dir = tmp_path / "train"

    # ---- first run: 4 steps, checkpoints at 2 and 4
    summary = run_train_stage(
        _cfg(max_steps=4), records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(out_dir)
    )
    assert summary["steps"] == 4
    assert summary["resumed_from_step"] is None
    assert summary["n_selected"] == 32 and summary["n_train_rows"] == 32
    assert summary["world_size"] == 2 and summary["use_gpu"] is False
    assert math.isfinite(summary["loss"]) and summary["tokens"] > 0
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and m["lr"] > 0 for m in history)
    assert history[-1]["tokens"] == summary["tokens"]

    # the latest checkpoint: one merged directory with both ranks' ZeRO shards and the loop state
    ckpt = Path(summary["checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 4 and state["batches_in_epoch"] == 4
    shards = sorted(p.name for p in (ckpt / state["tag"]).iterdir())
    assert "mp_rank_00_model_states.pt" in shards
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(shards)

    # the export: plain HF weights (LoRA merged), same architecture, different from the base
    export = Path(summary["model"])
    assert export == out_dir / "model" and (export / "model.safetensors").exists()
    assert (export / "tokenizer.json").exists()
    assert not (export / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(export).eval()
    base = load_causal_lm(str(tiny_model_dir)).eval()
    assert exported.config.model_type == base.config.model_type
    assert exported.config.hidden_size == base.config.hidden_size
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported.state_dict()[q], base.state_dict()[q])
    k = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: untouched
    assert torch.equal(exported.state_dict()[k], base.state_dict()[k])
    # inside the worker: trained (unmerged) module vs merged export, same logits
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    # here: the LoRA weights of the checkpoint, merged into the base, give the export's logits
    module_states = torch.load(ckpt / state["tag"] / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    lora_states = {k: v for k, v in module_states.items() if "lora_" in k}
    assert lora_states
    cfg = _cfg(4)
    peft = add_lora(load_causal_lm(str(tiny_model_dir)), r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, target_modules=cfg.model.lora_target_modules)
    missing = peft.load_state_dict(lora_states, strict=False)
    assert not missing.unexpected_keys
    merged = peft.merge_and_unload().eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(exported(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)

    # ---- rerun, same storage, max_steps 6: resumes at step 4 and runs steps 5 and 6
    summary2 = run_train_stage(
        _cfg(max_steps=6), records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(out_dir)
    )
    assert summary2["resumed_from_step"] == 4
    assert summary2["steps"] == 6
    history2 = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history2] == [1, 2, 3, 4, 5, 6]
    assert history2[:4] == history  # the pre-resume history is kept, not redone
    assert history2[4]["tokens"] > history[-1]["tokens"]
    state2 = json.loads((Path(summary2["checkpoint"]) / "train_state.json").read_text())
    assert state2["step"] == 6 and state2["batches_in_epoch"] == 6
    exported2 = AutoModelForCausalLM.from_pretrained(export)
    assert not torch.equal(exported2.state_dict()[q], exported.state_dict()[q])
    # num_to_keep=2: only the two latest checkpoints (steps 4 and 6) are left
    run_dir = out_dir / "ray_train" / "train"
    assert len([p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]) == 2


@pytest.mark.slow
def test_train_full_finetune_zero2_equals_zero3(ray_session, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning (no LoRA): ZeRO-2 (rank 0 holds the weights) and ZeRO-3 (weights consolidated
    at export) train the same model; both exports are plain HF checkpoints with every weight moved."""
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import load_causal_lm
    from spice_ray.train import run_train_stage

    records, selection, _ = _write_inputs(tmp_path)
    base = load_causal_lm(str(tiny_model_dir)).eval()
    logits = {}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    for stage in (2, 3):
        cfg = _cfg(max_steps=2)
        cfg.train.zero_stage = stage
        cfg.train.lora = False
        summary = run_train_stage(
            cfg, records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(tmp_path / f"zero{stage}")
        )
        assert summary["steps"] == 2 and math.isfinite(summary["loss"])
        assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
        model = AutoModelForCausalLM.from_pretrained(summary["model"]).eval()
        sd, base_sd = model.state_dict(), base.state_dict()
        assert sd.keys() == base_sd.keys()
        assert all(not torch.equal(sd[k], base_sd[k]) for k in sd)
        with torch.no_grad():
            logits[stage] = model(input_ids=ids).logits
    # the 32 rows are shuffled with the same seed into one block and split equally, so each step's
    # global batch (the union of the ranks' micro-batches) is the same in both runs: same model
    torch.testing.assert_close(logits[2], logits[3], atol=1e-4, rtol=1e-4)


def test_publish_dir_to_uri(tmp_path: Path) -> None:
    from spice_ray.train.loop import publish_dir

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "x.bin").write_bytes(b"abc")
    publish_dir(src, f"file://{tmp_path}/dst/model")
    assert (tmp_path / "dst" / "model" / "config.json").read_text() == "{}"
    assert (tmp_path / "dst" / "model" / "sub" / "x.bin").read_bytes() == b"abc"
