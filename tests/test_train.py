"""Train stage: DeepSpeed presets, LR schedule, length grouping, the tokenizing UDF, and real
2-worker Ray Train + DeepSpeed runs: ZeRO-2 LoRA with a killed worker that resumes, checkpoints,
export and a resuming rerun; ZeRO-2 vs ZeRO-3 full fine-tuning; uneven shards under ZeRO-3; and the
same loop in one process without Ray."""

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


def test_training_rows_are_the_selection_tokenized_in_seeded_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    from spice_ray.models import load_tokenizer
    from spice_ray.train.trainer import tokenize_selection, training_rows

    rows = _records(10)
    tok = load_tokenizer(str(tiny_model_dir))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "records.parquet")
    wanted = {rows[1]["uid"], rows[4]["uid"], rows[7]["uid"]}
    pq.write_table(pa.table({"uid": sorted(wanted)}), tmp_path / "selection.parquet")
    out, n_selected = training_rows(str(tmp_path / "records.parquet"), str(tmp_path / "selection.parquet"), tok, max_tokens=1024, seed=0)
    again, _ = training_rows(str(tmp_path / "records.parquet"), str(tmp_path / "selection.parquet"), tok, max_tokens=1024, seed=0)
    other, _ = training_rows(str(tmp_path / "records.parquet"), str(tmp_path / "selection.parquet"), tok, max_tokens=1024, seed=5)
    assert n_selected == 3 and out.equals(again)
    assert sorted(other.column("uid").to_pylist()) == sorted(out.column("uid").to_pylist())
    assert out.column_names == ["uid", "input_ids", "labels", "n_tokens"]
    assert set(out.column("uid").to_pylist()) == wanted
    for ids, labels, n in zip(*(out.column(c).to_pylist() for c in ("input_ids", "labels", "n_tokens"))):
        assert len(ids) == len(labels) == n
        assert labels[0] == -100  # the prompt is masked
        assert any(label != -100 for label in labels)
    # a max_tokens that cuts every response off leaves no trainable row
    table = pa.Table.from_pylist(rows).select(["uid", "messages"])
    assert tokenize_selection(table, tok, max_tokens=3).num_rows == 0


# ------------------------------------------------------------------------------- Ray + DeepSpeed


def _cfg(max_steps: int | None = None, **train) -> Config:
    values = dict(
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
    )
    values.update(train)
    return Config(model=ModelConfig(lora_r=4, lora_alpha=8.0), train=TrainConfig(**values))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_lora_zero2_killed_worker_resumes_then_rerun_resumes(ray_executor, tiny_model_dir: Path, tmp_path: Path) -> None:
    """ZeRO-2 + LoRA, 2 workers, 16 steps. Rank 1's process is SIGKILLed after the first checkpoint
    (step 4); FailureConfig(max_failures=1) restarts the worker group, which resumes from the latest
    checkpoint and ends at the same 16 steps with each step in the history once. Then checkpoint
    content, export (reload + logits), and a rerun with 3 epochs that resumes at step 16."""
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import add_lora, load_causal_lm
    from spice_ray.train import run_train_stage
    from spice_ray.train.faults import KillWorkerAfterCheckpoint

    records, selection, _ = _write_inputs(tmp_path)
    out_dir = tmp_path / "train"
    cfg = _cfg(epochs=2, checkpoint_every=4, max_failures=1, keep_checkpoints=2)

    # ---- first run: 32 rows / 2 workers / micro-batch 2 = 8 steps per epoch, 2 epochs; killed once
    summary = run_train_stage(
        cfg, ray_executor, records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(out_dir),
        callbacks=[KillWorkerAfterCheckpoint(rank=1, after=1)],
    )
    assert summary["planned_steps"] == 16
    assert summary["steps"] == 16 and summary["epoch"] == 1  # the last step's (0-based) epoch
    assert summary["resumed_from_step"] in (4, 8, 12), summary  # restarted from a checkpoint, not from 0
    assert summary["n_selected"] == 32 and summary["n_train_rows"] == 32
    assert summary["world_size"] == 2 and summary["use_gpu"] is False and summary["zero_stage"] == 2
    assert summary["dropped_rows"] == 0 and summary["effective_batch"] == 4
    assert math.isfinite(summary["loss"]) and summary["tokens"] > 0
    assert summary["peak_memory_gb"] > 0
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 17))
    assert all(math.isfinite(m["loss"]) and m["lr"] > 0 for m in history)
    assert [m["epoch"] for m in history] == [0] * 8 + [1] * 8
    assert history[-1]["tokens"] == summary["tokens"]
    # warm-up then cosine decay: peak at the end of the warm-up (1 step), lower at the end
    assert history[0]["lr"] == pytest.approx(5e-3) and history[-1]["lr"] < history[8]["lr"] < history[0]["lr"]

    # the latest checkpoint: one merged directory with both ranks' ZeRO shards and the loop state
    ckpt = Path(summary["checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 16 and (state["epoch"], state["batches_in_epoch"]) == (1, 8)  # at the end of epoch 1
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
    peft = add_lora(load_causal_lm(str(tiny_model_dir)), r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, target_modules=cfg.model.lora_target_modules)
    missing = peft.load_state_dict(lora_states, strict=False)
    assert not missing.unexpected_keys
    merged = peft.merge_and_unload().eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(exported(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)

    # ---- rerun, same storage, 3 epochs: resumes at step 16 and runs steps 17..24
    cfg3 = _cfg(epochs=3, checkpoint_every=4, keep_checkpoints=2)
    summary2 = run_train_stage(
        cfg3, ray_executor, records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(out_dir)
    )
    assert summary2["resumed_from_step"] == 16
    assert summary2["steps"] == 24 and summary2["epoch"] == 2
    history2 = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history2] == list(range(1, 25))
    assert history2[:16] == history  # the pre-resume history is kept, not redone
    assert history2[16]["tokens"] > history[-1]["tokens"] and all(m["lr"] > 0 for m in history2)
    state2 = json.loads((Path(summary2["checkpoint"]) / "train_state.json").read_text())
    assert state2["step"] == 24 and (state2["epoch"], state2["batches_in_epoch"]) == (2, 8)
    exported2 = AutoModelForCausalLM.from_pretrained(export)
    assert not torch.equal(exported2.state_dict()[q], exported.state_dict()[q])
    # keep_checkpoints=2: only the two latest checkpoints (steps 20 and 24) are left
    run_dir = out_dir / "checkpoints" / "ray_train"
    kept = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert sorted(json.loads((p / "train_state.json").read_text())["step"] for p in kept) == [20, 24]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_full_finetune_zero2_equals_zero3(ray_executor, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning (no LoRA): ZeRO-2 (rank 0 holds the weights) and the ZeRO-3 preset (weights
    gathered from the shards at export; with gradient checkpointing) train the same model; both
    exports are plain HF checkpoints with every weight moved."""
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import load_causal_lm
    from spice_ray.train import run_train_stage

    records, selection, _ = _write_inputs(tmp_path)
    base = load_causal_lm(str(tiny_model_dir)).eval()
    logits = {}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    for stage, zero_stage, checkpointing in ((2, 2, False), (3, None, True)):
        cfg = _cfg(max_steps=3, zero_stage=zero_stage, lora=False, gradient_checkpointing=checkpointing)
        summary = run_train_stage(
            cfg, ray_executor, records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(tmp_path / f"zero{stage}")
        )
        assert summary["zero_stage"] == stage  # zero_stage: null + full fine-tuning -> ZeRO-3
        assert summary["steps"] == 3 and math.isfinite(summary["loss"])
        assert summary["trainable_params"] == sum(p.numel() for p in base.parameters())
        model = AutoModelForCausalLM.from_pretrained(summary["model"]).eval()
        sd, base_sd = model.state_dict(), base.state_dict()
        assert sd.keys() == base_sd.keys()
        assert all(not torch.equal(sd[k], base_sd[k]) for k in sd)
        with torch.no_grad():
            logits[stage] = model(input_ids=ids).logits
    # the 32 rows are shuffled with the same seed into one block and split equally, and the length
    # windows are seeded by (seed, epoch, rank, window), so each step's global batch is the same in
    # both runs: the same model (gradient checkpointing changes memory, not the math)
    torch.testing.assert_close(logits[2], logits[3], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_uneven_shards_do_not_hang_zero3_lora(ray_executor, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 gets 20 rows and rank 1 gets 12 (not Ray Train's equal split). ZeRO-3 gathers weights
    in every forward, so a rank that ran more micro-batches than the other would wait forever; the
    loop's MIN all-reduce per window runs 6 micro-batches on both and drops rank 0's other 8 rows.
    Also: the ZeRO-3 + LoRA export (adapters gathered from the shards, then merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import load_causal_lm
    from spice_ray.train import run_train_stage
    from spice_ray.train.faults import UnevenShards

    records, selection, _ = _write_inputs(tmp_path)
    cfg = _cfg(zero_stage=3, lora=True, grad_accum=2, length_window=2, checkpoint_every=100)
    summary = run_train_stage(
        cfg, ray_executor, records_path=records, selection_path=selection, model_path=str(tiny_model_dir), out_dir=str(tmp_path / "uneven"),
        data_config=UnevenShards([20]),
    )
    # windows of 4 rows: rank 0 has 5, rank 1 has 3 -> 3 windows x 2 micro-batches = 6 = 3 steps
    assert summary["steps"] == 3 and summary["dropped_rows"] == 8
    assert summary["zero_stage"] == 3 and math.isfinite(summary["loss"])
    exported = AutoModelForCausalLM.from_pretrained(summary["model"]).eval()
    base = load_causal_lm(str(tiny_model_dir)).eval()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported.state_dict()[q], base.state_dict()[q])


# -------------------------------------------------------------- the loop without Ray (one process)


def _tokenized_table(tiny_model_dir: Path, n: int = 24):
    from spice_ray.models import load_tokenizer
    from spice_ray.train.trainer import tokenize_selection

    table = pa.Table.from_pylist(_records(n)).select(["uid", "messages"])
    return tokenize_selection(table, load_tokenizer(str(tiny_model_dir)), max_tokens=1024)


@pytest.mark.parametrize("engine", ["torch", pytest.param("deepspeed", marks=[pytest.mark.slow, pytest.mark.deepspeed])])
@pytest.mark.timeout(300)
def test_local_session_loop_checkpoints_and_resumes(tiny_model_dir: Path, tmp_path: Path, engine: str) -> None:
    """``run_loop`` in this process (world size 1; DeepSpeed under gloo): 3 steps with a checkpoint
    at 2, then a second call that resumes at 3 and runs to 5 — the same steps as one run of 5."""
    import contextlib

    from spice_ray.train.loop import LocalSession, local_process_group, run_loop
    from spice_ray.train.trainer import loop_config

    table = _tokenized_table(tiny_model_dir)
    group = local_process_group(tmp_path / "pg") if engine == "deepspeed" else contextlib.nullcontext()
    with group:
        results = []
        for max_steps in (3, 5):
            cfg = _cfg(max_steps=max_steps, num_workers=1, micro_batch_size=4, gradient_checkpointing=True, engine=engine)
            config = loop_config(
                cfg, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                export_dir=str(tmp_path / "model"), use_gpu=False, pad_id=0, total_steps=5,  # one schedule: 3 steps, then resume to 5
            )
            session = LocalSession(table, tmp_path / "ckpt", keep=2)
            results.append(run_loop(config, session))
        straight = run_loop(dict(config, export_dir=str(tmp_path / "model-straight")), LocalSession(table, tmp_path / "ckpt-straight", keep=2))
    first, second = results
    assert [m["loss"] for m in second["history"]] == pytest.approx([m["loss"] for m in straight["history"]], rel=1e-6)
    assert first["resumed_from_step"] is None and [m["step"] for m in first["history"]] == [1, 2, 3]
    assert second["resumed_from_step"] == 3 and [m["step"] for m in second["history"]] == [1, 2, 3, 4, 5]
    assert second["history"][:3] == first["history"]
    assert second["steps_this_process"] == 2 and second["tokens_per_s"] > 0
    assert 0 <= first["padding_fraction"] < 1
    assert len(list((tmp_path / "ckpt").glob("checkpoint_*"))) == 2
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert first["engine"] == second["engine"] == engine
    if engine == "torch":  # its checkpoints are safetensors + JSON: nothing to unpickle
        files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
        assert files == {"train_state.json", "engine_state.json", "trainable.safetensors", "optimizer.safetensors"}


# ------------------------------------------------------------------------------------ unit: parts


def test_micro_batches_cover_every_row_once_and_group_by_length() -> None:
    import random

    from spice_ray.train.loop import micro_batches, padding_fraction

    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(203)]
    for group in (False, True):
        chunks = micro_batches(lengths, 8, group=group, rng=random.Random(1))
        assert len(chunks) == math.ceil(203 / 8)
        assert sorted(i for c in chunks for i in c) == list(range(203))
        assert sum(len(c) != 8 for c in chunks) == 1  # one partial micro-batch
    plain = micro_batches(lengths, 8, group=False, rng=random.Random(1))
    grouped = micro_batches(lengths, 8, group=True, rng=random.Random(1))
    assert plain == [list(range(i, min(i + 8, 203))) for i in range(0, 203, 8)]
    assert padding_fraction(lengths, grouped) < 0.1 < padding_fraction(lengths, plain)
    # the order of the grouped micro-batches is shuffled (not sorted by length), and seeded
    assert grouped == micro_batches(lengths, 8, group=True, rng=random.Random(1))
    maxima = [max(lengths[i] for i in c) for c in grouped]
    assert maxima != sorted(maxima)


def test_lr_schedule() -> None:
    from spice_ray.train.deepspeed_config import LRSchedule, lr_multiplier

    total, warm = 100, 3
    for kind in ("cosine", "linear", "constant"):
        m = [lr_multiplier(s, total_steps=total, warmup_steps=warm, kind=kind) for s in range(total)]
        assert m[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up, never 0
        assert all(x > 0 for x in m) and max(m) == pytest.approx(1.0)
        if kind == "constant":
            assert m[3:] == [1.0] * 97
        else:
            assert all(a >= b for a, b in zip(m[3:], m[4:]))  # non-increasing after the warm-up
            assert m[-1] < 0.05
    assert lr_multiplier(50, total_steps=100, warmup_steps=0, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    sched = LRSchedule(total_steps=200, warmup_ratio=0.03, kind="linear")
    assert sched.warmup_steps == 6 and sched(5) == pytest.approx(1.0) and sched(6) == pytest.approx(1.0)
    assert LRSchedule(10, 0.0, "cosine").warmup_steps == 0


def test_presets_and_offload_config() -> None:
    assert TrainConfig().resolved_zero_stage == 2  # LoRA -> ZeRO-2
    assert TrainConfig(lora=False).resolved_zero_stage == 3  # full fine-tuning -> ZeRO-3
    assert TrainConfig(lora=False, zero_stage=2).resolved_zero_stage == 2
    z3 = deepspeed_config(TrainConfig(lora=False, offload=True), world_size=8, use_gpu=True)["zero_optimization"]
    assert z3["stage"] == 3 and z3["offload_optimizer"]["device"] == "cpu" and z3["offload_param"]["device"] == "cpu"
    assert z3["offload_optimizer"]["pin_memory"] is True
    z2 = deepspeed_config(TrainConfig(offload=True), world_size=1, use_gpu=False)["zero_optimization"]
    assert z2["stage"] == 2 and "offload_optimizer" in z2 and "offload_param" not in z2
    assert "offload_optimizer" not in deepspeed_config(TrainConfig(), world_size=1, use_gpu=True)["zero_optimization"]


def test_gradient_checkpointing_same_loss_and_grads(tiny_model_dir: Path) -> None:
    """With and without gradient checkpointing (non-reentrant, LoRA on top): same loss, same grads."""
    import torch

    from spice_ray.corpus.tokenize import encode_batch, pad_batch
    from spice_ray.models import load_tokenizer
    from spice_ray.train.loop import _build_model

    tok = load_tokenizer(str(tiny_model_dir))
    batch = pad_batch(encode_batch(tok, [r["messages"] for r in _records(4)]), tok.pad_token_id)
    grads = {}
    for gc in (False, True):
        model = _build_model(ModelConfig(lora_r=4, lora_alpha=8.0), TrainConfig(gradient_checkpointing=gc), str(tiny_model_dir))
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads[gc] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-6)
    assert grads[False][1].keys() == grads[True][1].keys() and grads[False][1]
    for name, g in grads[False][1].items():
        torch.testing.assert_close(g, grads[True][1][name], atol=1e-6, rtol=1e-5)


def test_publish_dir_to_uri(tmp_path: Path) -> None:
    from spice_ray.train.loop import publish_dir

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "x.bin").write_bytes(b"abc")
    publish_dir(src, f"file://{tmp_path}/dst/model")
    assert (tmp_path / "dst" / "model" / "config.json").read_text() == "{}"
    assert (tmp_path / "dst" / "model" / "sub" / "x.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("name", ["qwen2_7b", "llama2_7b", "qwen2_7b_less", "llama2_7b_less"])
def test_recipes(name: str) -> None:
    """jobs/: the paper's setup and LESS's, for both targets, each with its same-family proxy."""
    from spice_ray.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / f"{name}.yaml")
    m, t = cfg.model, cfg.train
    proxy = {"Qwen/Qwen2-7B": "Qwen/Qwen2-0.5B", "meta-llama/Llama-2-7b-hf": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"}
    assert proxy[m.target] == m.proxy
    assert t.lora and t.resolved_zero_stage == 2 and t.use_gpu and t.gradient_checkpointing and t.max_failures > 0
    effective = t.micro_batch_size * t.grad_accum * t.num_workers
    if name.endswith("_less"):
        assert (m.lora_r, m.lora_alpha, m.lora_dropout) == (128, 512, 0.1)
        assert (t.lr, t.epochs, t.lr_scheduler, t.warmup_ratio, effective, t.max_length) == (2e-5, 4, "linear", 0.03, 128, 2048)
    else:
        assert (m.lora_r, m.lora_alpha) == (16, 32)
        assert (t.lr, t.epochs, t.lr_scheduler, effective) == (5e-5, 3, "cosine", 512)
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "eval" in cfg.run.stages and cfg.eval.paths


def test_unregistered_checkpoints_are_pruned(tmp_path: Path) -> None:
    """A worker killed while reporting can leave a checkpoint directory that Ray Train never
    registered (so outside keep_checkpoints); the train stage removes those after the run."""
    from types import SimpleNamespace

    from spice_ray.ray_executor import prune_unregistered_checkpoints as _prune_unregistered_checkpoints

    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        (tmp_path / name).mkdir()
    (tmp_path / "other").mkdir()
    kept = [(SimpleNamespace(path=str(tmp_path / n)), {}) for n in ("checkpoint_b", "checkpoint_c")]
    _prune_unregistered_checkpoints(str(tmp_path), SimpleNamespace(best_checkpoints=kept))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_b", "checkpoint_c", "other"]
    _prune_unregistered_checkpoints(str(tmp_path), SimpleNamespace(best_checkpoints=[]))  # nothing known: keep all
    assert len(list(tmp_path.iterdir())) == 3


def test_stale_extension_lock_is_removed_and_a_fresh_one_named(tmp_path: Path, caplog) -> None:
    import os
    import time

    from spice_ray.train.loop import clear_stale_extension_locks

    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "cpu_adam").mkdir()
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    stale.write_text("")
    fresh.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    with caplog.at_level("WARNING"):
        assert clear_stale_extension_locks(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and fresh.exists()
    assert str(fresh) in caplog.text and "waiting for that build" in caplog.text
