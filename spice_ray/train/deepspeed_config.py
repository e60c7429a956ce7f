"""DeepSpeed presets for the train stage: ZeRO-2 (LoRA) and ZeRO-3 (full fine-tuning).

The config never holds an ``optimizer`` or ``scheduler`` block: the train loop passes a
``torch.optim.AdamW`` and a torch ``LambdaLR`` to ``deepspeed.initialize`` itself, which keeps
DeepSpeed from JIT-building its fused Adam op (slow, and CUDA-only in practice) and keeps the
optimizer identical on CPU and GPU. ``zero_allow_untested_optimizer`` is therefore required.
"""

from __future__ import annotations

from typing import Any

from spice_ray.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, *, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` workers.

    bf16 is enabled only on GPU (CPU training stays in fp32). ``train_batch_size`` is given
    explicitly so DeepSpeed checks micro batch × grad accumulation × world size for us.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": use_gpu,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
    }
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_param_persistence_threshold": 10_000,
                "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
            }
        )
    else:
        zero.update({"allgather_bucket_size": 200_000_000, "reduce_bucket_size": 200_000_000})
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bool(use_gpu)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
