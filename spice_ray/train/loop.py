"""The per-worker train loop (runs inside each Ray Train worker): DeepSpeed ZeRO on the selection.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` runs; ``config`` is a plain dict built by
``spice_ray.train.trainer.run_train_stage``:

    train          TrainConfig.model_dump()
    model          ModelConfig.model_dump()
    model_path     local directory of the target model (Hugging Face layout)
    tokenizer_path directory of its tokenizer (saved beside the exported model)
    export_dir     where rank 0 writes the final model (Hugging Face format)
    use_gpu        bool, resolved on the driver
    pad_id         the tokenizer's pad id (default: the model config's, else 0)
    torch_extensions_dir  optional cache for DeepSpeed's JIT-built C++ ops

Data: Ray Train V2's default ``DataConfig`` splits the "train" dataset with
``streaming_split(world_size, equal=True)``, so every rank gets the same number of rows and so the
same number of micro-batches and optimizer steps (no rank waits in a collective the others never
reach). Which rows a rank gets is decided at run time (blocks go to whichever shard asks), so a
resumed run skips as many micro-batches of the interrupted epoch as had been consumed, not exactly
the same rows.

Checkpoints: every ``checkpoint_every`` optimizer steps and at the end, every rank calls
``engine.save_checkpoint`` into its own temporary directory (DeepSpeed writes per-rank ZeRO shards;
rank 0 also writes the module states and ``train_state.json``) and then ``ray.train.report`` with
it; Ray Train merges the ranks' files into one checkpoint directory. With LoRA, frozen base weights
are left out of the checkpoint (``exclude_frozen_parameters``). On start, ``ray.train.get_checkpoint``
(the latest checkpoint of the same ``RunConfig(name, storage_path)``) is loaded and training
continues from its step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spice_ray.config import ModelConfig, TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/spice-ray/torch_extensions"


def torch_extensions_dir(configured: str | None = None) -> str:
    """Where DeepSpeed's JIT-built ops are cached: $TORCH_EXTENSIONS_DIR, else the configured
    directory, else ``~/.cache/spice-ray/torch_extensions`` (the first build takes ~40 s)."""
    return os.path.expanduser(os.environ.get("TORCH_EXTENSIONS_DIR") or configured or DEFAULT_TORCH_EXTENSIONS_DIR)


def constant_lr(_step: int) -> float:
    """LR multiplier of the (for now constant) schedule; a module-level function so it pickles."""
    return 1.0


def _collate(batch: dict[str, Any], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    from spice_ray.corpus.tokenize import Encoded, pad_batch

    encodeds = [
        Encoded(input_ids=[int(t) for t in ids], labels=[int(t) for t in labels], n_tokens=len(ids))
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]
    padded = pad_batch(encodeds, pad_id)
    return {k: v.to(device) for k, v in padded.items()}


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def _build_model(mcfg: ModelConfig, tcfg: TrainConfig, model_path: str, dtype: str = "float32"):
    from spice_ray.models import add_lora, load_causal_lm

    model = load_causal_lm(model_path, trust_remote_code=mcfg.trust_remote_code, dtype=dtype)
    if tcfg.lora:
        model = add_lora(
            model,
            r=mcfg.lora_r,
            alpha=mcfg.lora_alpha,
            target_modules=list(mcfg.lora_target_modules),
            dropout=mcfg.lora_dropout,
            seed=mcfg.init_seed,
        )
    return model


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``, replacing an older ``dst`` (a rerun's export)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_dir(local: Path, uri: str) -> None:
    """Copy a finished local directory to a pyarrow-fs URI (files of an older copy are overwritten;
    object stores have no atomic rename, so readers should wait for the stage's completion marker)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _gathered_trainable_state(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The LoRA adapter weights as CPU fp32 tensors on rank 0 (None elsewhere). Collective."""
    import deepspeed
    import torch.distributed as dist
    from peft import get_peft_model_state_dict

    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero_stage == 3:
        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = get_peft_model_state_dict(module) if rank == 0 else None
            state = {k: v.detach().float().cpu().clone() for k, v in state.items()} if state else None
        return state
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def export_model(
    engine,
    *,
    tcfg: TrainConfig,
    mcfg: ModelConfig,
    model_path: str,
    tokenizer_path: str,
    export_dir: str,
    dtype: str,
) -> dict[str, Any]:
    """Write the trained model to ``export_dir`` in Hugging Face format (rank 0 writes; collective).

    LoRA: the adapter weights are loaded into a fresh copy of the base model, merged
    (``merge_and_unload``) and saved, so the export holds plain weights in ``dtype``. The merged
    model's logits are compared with the trained (unmerged) module's on a short sample and the max
    abs difference is returned (ZeRO-2 only: there rank 0 holds the full module).
    Full fine-tuning: ZeRO-2 ranks hold full weights, so rank 0 saves its module; under ZeRO-3 the
    16-bit weights are consolidated on rank 0 first.
    The model is written to a temporary directory beside ``export_dir`` and renamed into place.
    """
    import torch.distributed as dist

    from spice_ray.models import load_tokenizer

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, Any] = {"export_dir": export_dir}
    if tcfg.lora:
        adapter = _gathered_trainable_state(engine, tcfg.zero_stage)
        full_state = None
    else:
        adapter = None
        full_state = engine._zero3_consolidated_16bit_state_dict() if tcfg.zero_stage == 3 else None
    if rank != 0:
        return out

    from peft import set_peft_model_state_dict

    remote = "://" in export_dir
    if remote:  # write locally, then copy to the pyarrow-fs URI (s3://, gs://, ...)
        tmp = Path(tempfile.mkdtemp(prefix="spice-export-"))
    else:
        dst = Path(export_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o755)
    t0 = time.time()
    if tcfg.lora:
        assert adapter is not None
        peft_model = _build_model(mcfg, tcfg, model_path, dtype="float32")
        result = set_peft_model_state_dict(peft_model, adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA export: adapter keys not found in the model: {unexpected[:5]}")
        merged = peft_model.merge_and_unload()
        merged.eval()
        if tcfg.zero_stage == 2:
            out["export_max_abs_diff"] = _merge_check(engine.module, merged)
        if dtype != "float32":
            merged = merged.to(getattr(torch, dtype))
        merged.save_pretrained(tmp, safe_serialization=True)
    else:
        module = engine.module
        module.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
    load_tokenizer(tokenizer_path, trust_remote_code=mcfg.trust_remote_code).save_pretrained(tmp)
    if remote:
        publish_dir(tmp, export_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _replace_dir(tmp, dst)
    out["export_seconds"] = round(time.time() - t0, 3)
    logger.info("exported the trained model to %s in %.1f s", export_dir, out["export_seconds"])
    return out


@torch.no_grad()
def _merge_check(trained, merged) -> float:
    """Max abs logit difference between the trained module and the merged export on one sample."""
    vocab = merged.config.vocab_size
    ids = (torch.arange(12) * 7 + 3) % vocab
    was_training = trained.training
    trained.eval()
    device = next(trained.parameters()).device
    a = trained(input_ids=ids[None].to(device)).logits.float().cpu()
    b = merged(input_ids=ids[None]).logits.float()
    trained.train(was_training)
    return float((a - b).abs().max())


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker's loop. Returns (on rank 0) the metric history and the export info."""
    t_enter = time.time()
    timings: dict[str, float] = {}
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir(config.get("torch_extensions_dir"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO)

    import deepspeed
    import ray.train

    from spice_ray.train.deepspeed_config import deepspeed_config

    timings["imports"] = round(time.time() - t_enter, 3)
    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    use_gpu = bool(config["use_gpu"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tcfg.seed + rank)

    model = _build_model(mcfg, tcfg, config["model_path"])
    pad_id = config.get("pad_id")
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, constant_lr)
    ds_config = deepspeed_config(tcfg, world_size=world_size, use_gpu=use_gpu)
    t0 = time.time()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,  # Ray Train's TorchConfig already set up torch.distributed
    )
    timings["setup"] = round(time.time() - t_enter, 3)
    logger.info("rank %d: deepspeed.initialize took %.1f s (%d trainable params)", rank, time.time() - t0, n_trainable)
    device = engine.device

    # ---- resume
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "history": []}
    resumed_from: int | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
            if state.get("world_size", world_size) != world_size:
                raise RuntimeError(
                    f"the checkpoint was written by {state['world_size']} workers and this run has {world_size}: "
                    "DeepSpeed ZeRO shards cannot be loaded at another world size; keep train.num_workers or "
                    "start a fresh run (a new out_dir)"
                )
            load_path, _ = engine.load_checkpoint(
                ckpt_dir,
                tag=state["tag"],
                load_module_strict=not tcfg.lora,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if load_path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint {state['tag']} from {checkpoint}")
        if engine.global_steps != state["step"]:
            raise RuntimeError(f"checkpoint step mismatch: engine {engine.global_steps} vs state {state['step']}")
        resumed_from = state["step"]
        logger.info("rank %d: resumed from step %d (epoch %d, batch %d)", rank, state["step"], state["epoch"], state["batches_in_epoch"])

    history: list[dict[str, Any]] = list(state.get("history", []))
    step, epoch, tokens = int(state["step"]), int(state["epoch"]), int(state["tokens"])
    # the position in the interrupted epoch, in micro-batches of this run's size
    skip = math.ceil(int(state["batches_in_epoch"]) * int(state.get("micro_batch_size", tcfg.micro_batch_size)) / tcfg.micro_batch_size)
    last_ckpt_step = step if checkpoint is not None else -1
    metrics: dict[str, Any] = history[-1] if history else {"step": step, "epoch": epoch, "loss": float("nan")}

    def save(metrics: dict[str, Any], batches_in_epoch: int) -> None:
        nonlocal last_ckpt_step
        tag = f"step_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="spice-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=tcfg.lora)
            if rank == 0:
                saved = {
                    "tag": tag,
                    "step": step,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "tokens": tokens,
                    "history": history,
                    "world_size": world_size,
                    "micro_batch_size": tcfg.micro_batch_size,
                }
                (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        last_ckpt_step = step

    def done() -> bool:
        return tcfg.max_steps is not None and step >= tcfg.max_steps

    shard = ray.train.get_dataset_shard("train")
    engine.train()
    micro_losses: list[float] = []
    micro_tokens = 0
    t_start = time.time()
    while epoch < tcfg.epochs and not done():
        batches = 0
        for batch in shard.iter_batches(batch_size=tcfg.micro_batch_size, batch_format="numpy", prefetch_batches=1):
            batches += 1
            if batches <= skip:
                continue
            inputs = _collate(batch, pad_id, device)
            boundary = engine.is_gradient_accumulation_boundary()
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            micro_losses.append(float(loss.detach()))
            micro_tokens += int(inputs["attention_mask"].sum())
            if not boundary:
                continue
            step = engine.global_steps
            loss_sum, n, tok = _all_reduce_sum([sum(micro_losses), len(micro_losses), micro_tokens], device)
            tokens += int(tok)
            micro_losses, micro_tokens = [], 0
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": loss_sum / n,
                "lr": float(engine.get_lr()[0]),
                "tokens": tokens,
                "elapsed_s": round(time.time() - t_start, 3),
            }
            history.append(metrics)
            if rank == 0 and (step == 1 or step % 10 == 0):
                logger.info("step %d epoch %d loss %.4f", step, epoch, metrics["loss"])
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")
            if step % tcfg.checkpoint_every == 0:
                save(metrics, batches)
            else:
                ray.train.report(metrics)
            if done():
                break
        else:
            if batches == 0:
                raise RuntimeError(f"rank {rank}: the train dataset shard is empty")
            epoch += 1
            skip = 0
            continue
        # left the epoch early (max_steps): keep the position within the epoch
        skip = batches
    if last_ckpt_step != step:
        save(metrics, skip)
    timings["train"] = round(time.time() - t_enter, 3)

    dtype = "bfloat16" if use_gpu else "float32"
    export = export_model(
        engine,
        tcfg=tcfg,
        mcfg=mcfg,
        model_path=config["model_path"],
        tokenizer_path=config.get("tokenizer_path") or config["model_path"],
        export_dir=config["export_dir"],
        dtype=dtype,
    )
    timings["export"] = round(time.time() - t_enter, 3)
    logger.info("rank %d: seconds since the loop started: %s", rank, timings)
    if rank != 0:
        return None
    return {
        "timings": timings,
        "history": history,
        "final": metrics,
        "resumed_from_step": resumed_from,
        "trainable_params": n_trainable,
        "world_size": world_size,
        **export,
    }
