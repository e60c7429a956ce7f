"""Publishing the trained model: Hugging Face format, written by rank 0, swapped into place whole.

:func:`export_model` is collective (under ZeRO-3 every rank gives its shard of the weights), then
rank 0 writes the model and the tokenizer into a staging directory (:func:`staging_dir`: beside a
local ``export_dir``, a local temporary one for a URI) and publishes it (:func:`publish`): a local
export replaces the older one with :func:`spice_ray.storage.replace_dir` (renamed aside, the new
one renamed in), a URI (``s3://``, ``gs://``, ...) gets a copy (:func:`publish_dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spice_ray.config import ModelConfig, TrainConfig
from spice_ray.storage import is_uri, replace_dir, uri_filesystem

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def export_model(
    engine,
    *,
    tcfg: TrainConfig,
    mcfg: ModelConfig,
    model_path: str,
    tokenizer_path: str,
    export_dir: str,
    dtype: str,
    zero_stage: int | None,
) -> dict[str, Any]:
    """Write the trained model to ``export_dir`` in Hugging Face format (rank 0 writes; collective).

    LoRA: the adapter weights are loaded into a fresh copy of the base model, merged
    (``merge_and_unload``) and saved, so the export holds plain weights in ``dtype``. The merged
    model's logits are compared with the trained (unmerged) module's on a short sample and the max
    abs difference is returned (not under ZeRO-3: elsewhere rank 0 holds the full module).
    ``zero_stage``: the DeepSpeed engine's ZeRO stage; None for the plain-torch engine.
    Full fine-tuning: ZeRO-2 ranks hold full weights, so rank 0 saves its module; under ZeRO-3 the
    16-bit weights are gathered from every rank's shard onto rank 0 first
    (``stage3_gather_16bit_weights_on_model_save``).
    The model is written to a temporary directory beside ``export_dir`` and renamed into place.
    Returns ``export_dir``, and on rank 0 ``export_seconds`` and (LoRA) ``export_max_abs_diff``.
    """
    from spice_ray.models import load_tokenizer

    stage = zero_stage or 0
    out: dict[str, Any] = {"export_dir": export_dir}
    if tcfg.lora:
        adapter = _gathered_trainable_state(engine, stage)
        full_state = None
    else:
        adapter = None
        full_state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if _rank() != 0:
        return out
    staging = staging_dir(export_dir)
    t0 = time.time()
    if tcfg.lora:
        assert adapter is not None
        merged = _merged_lora_model(adapter, tcfg=tcfg, mcfg=mcfg, model_path=model_path)
        if stage != 3:
            out["export_max_abs_diff"] = _merge_check(engine.module, merged)
        if dtype != "float32":
            merged = merged.to(getattr(torch, dtype))
        merged.save_pretrained(staging, safe_serialization=True)
    else:
        _save_full_model(engine.module, full_state, staging)
    load_tokenizer(tokenizer_path, trust_remote_code=mcfg.trust_remote_code).save_pretrained(staging)
    publish(staging, export_dir)
    out["export_seconds"] = round(time.time() - t0, 3)
    return out


# ---------------------------------------------------------------------------------- the weights


def _gathered_trainable_state(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The LoRA adapter weights as CPU fp32 tensors on rank 0 (None elsewhere). Collective."""
    from peft import get_peft_model_state_dict

    module = engine.module
    rank = _rank()
    if zero_stage == 3:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = get_peft_model_state_dict(module) if rank == 0 else None
            state = {k: v.detach().float().cpu().clone() for k, v in state.items()} if state else None
        return state
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def _merged_lora_model(adapter: dict[str, torch.Tensor], *, tcfg: TrainConfig, mcfg: ModelConfig, model_path: str):
    """A fresh fp32 copy of the base model with ``adapter`` loaded and merged in, in eval mode."""
    from peft import set_peft_model_state_dict

    from spice_ray.train.engine import build_model

    plain = tcfg.model_copy(update={"gradient_checkpointing": False})
    peft_model = build_model(mcfg, plain, model_path, dtype="float32")
    result = set_peft_model_state_dict(peft_model, adapter)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"LoRA export: adapter keys not found in the model: {unexpected[:5]}")
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


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


def _save_full_model(module, full_state: dict[str, torch.Tensor] | None, staging: Path) -> None:
    """Every weight of the trained module (``full_state``: ZeRO-3's gathered 16-bit weights)."""
    if getattr(module.config, "use_cache", None) is False:
        module.config.use_cache = True  # training switched it off for gradient checkpointing
    module.save_pretrained(staging, state_dict=full_state, safe_serialization=True)


# ---------------------------------------------------------------------------- the directory swap


def staging_dir(export_dir: str) -> Path:
    """A new directory to write the export into: beside a local ``export_dir`` (so that it renames
    into place), a local temporary one for a URI."""
    if is_uri(export_dir):  # write locally, then copy to the pyarrow-fs URI (s3://, gs://, ...)
        tmp = Path(tempfile.mkdtemp(prefix="spice-export-"))
    else:
        dst = Path(export_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o755)
    return tmp


def publish(staging: Path, export_dir: str) -> None:
    """Put the finished ``staging`` directory at ``export_dir``: renamed in place of an older local
    export (:func:`spice_ray.storage.replace_dir`), or copied to a URI and removed."""
    if is_uri(export_dir):
        publish_dir(staging, export_dir)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        replace_dir(staging, Path(export_dir))


def publish_dir(local: Path, uri: str) -> None:
    """Copy a finished local directory to a pyarrow-fs URI (files of an older copy are overwritten;
    object stores have no atomic rename, so readers should wait for the stage's completion marker)."""
    import pyarrow.fs as pafs

    fs, path = uri_filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
