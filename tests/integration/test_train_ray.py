"""Train stage on Ray Train + DeepSpeed, 2 workers: ZeRO-2 LoRA with a killed worker that resumes,
checkpoints, export and a resuming rerun; ZeRO-2 vs ZeRO-3 full fine-tuning; uneven shards under ZeRO-3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spice_ray.testing import train_config, write_train_inputs

pytestmark = pytest.mark.deepspeed


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

    records, selection, _ = write_train_inputs(tmp_path)
    out_dir = tmp_path / "train"
    cfg = train_config(epochs=2, checkpoint_every=4, max_failures=1, keep_checkpoints=2)

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
    peft = add_lora(load_causal_lm(str(tiny_model_dir)), r=cfg.model.target_lora.r, alpha=cfg.model.target_lora.alpha,
                    target_modules=cfg.model.target_lora.target_modules)
    missing = peft.load_state_dict(lora_states, strict=False)
    assert not missing.unexpected_keys
    merged = peft.merge_and_unload().eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(exported(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)

    # ---- rerun, same storage, 3 epochs: resumes at step 16 and runs steps 17..24
    cfg3 = train_config(epochs=3, checkpoint_every=4, keep_checkpoints=2)
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


@pytest.mark.timeout(600)
def test_train_full_finetune_zero2_equals_zero3(ray_executor, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Full fine-tuning (no LoRA): ZeRO-2 (rank 0 holds the weights) and the ZeRO-3 preset (weights
    gathered from the shards at export; with gradient checkpointing) train the same model; both
    exports are plain HF checkpoints with every weight moved."""
    import torch
    from transformers import AutoModelForCausalLM

    from spice_ray.models import load_causal_lm
    from spice_ray.train import run_train_stage

    records, selection, _ = write_train_inputs(tmp_path)
    base = load_causal_lm(str(tiny_model_dir)).eval()
    logits = {}
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    for stage, zero_stage, checkpointing in ((2, 2, False), (3, None, True)):
        cfg = train_config(max_steps=3, zero_stage=zero_stage, lora=False, gradient_checkpointing=checkpointing)
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

    records, selection, _ = write_train_inputs(tmp_path)
    cfg = train_config(zero_stage=3, lora=True, grad_accum=2, length_window=2, checkpoint_every=100)
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
