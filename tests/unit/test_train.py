"""Train stage without Ray: DeepSpeed presets, LR schedule, length grouping, the training rows, export
helpers. The loop in one process (plain torch; DeepSpeed under gloo), as the local executor trains,
is in tests/integration/test_train_local.py; the 2-worker Ray Train + DeepSpeed runs are in
tests/integration/test_train_ray.py."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spice_ray.config import LoraConfig, ModelConfig, TrainConfig
from spice_ray.testing import train_records
from spice_ray.train.deepspeed_config import deepspeed_config

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

    rows = train_records(10)
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
    batch = pad_batch(encode_batch(tok, [r["messages"] for r in train_records(4)]), tok.pad_token_id)
    grads = {}
    for gc in (False, True):
        model = _build_model(ModelConfig(target_lora=LoraConfig(r=4, alpha=8.0)), TrainConfig(gradient_checkpointing=gc), str(tiny_model_dir))
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

    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs" / f"{name}.yaml")
    m, t = cfg.model, cfg.train
    proxy = {"Qwen/Qwen2-7B": "Qwen/Qwen2-0.5B", "meta-llama/Llama-2-7b-hf": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"}
    assert proxy[m.target] == m.proxy
    assert t.lora and t.resolved_zero_stage == 2 and t.use_gpu and t.gradient_checkpointing and t.max_failures > 0
    effective = t.micro_batch_size * t.grad_accum * t.num_workers
    for lora in (m.proxy_lora, m.target_lora):
        if name.endswith("_less"):
            assert (lora.r, lora.alpha, lora.dropout) == (128, 512, 0.1)
        else:
            assert (lora.r, lora.alpha) == (16, 32)
        assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    if name.endswith("_less"):
        assert (t.lr, t.epochs, t.lr_scheduler, t.warmup_ratio, effective, t.max_length) == (2e-5, 4, "linear", 0.03, 128, 2048)
    else:
        assert (t.lr, t.epochs, t.lr_scheduler, effective) == (5e-5, 3, "cosine", 512)
    assert "eval" in cfg.run.stages and cfg.eval.paths


def test_unregistered_checkpoints_are_pruned(tmp_path: Path) -> None:
    """A worker killed while reporting can leave a checkpoint directory that Ray Train never
    registered (so outside keep_checkpoints); the train stage removes those after the run."""
    from types import SimpleNamespace

    from spice_ray.ray_executor import (
        prune_unregistered_checkpoints as _prune_unregistered_checkpoints,
    )

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
