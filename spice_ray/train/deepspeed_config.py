"""DeepSpeed presets for the train stage: ZeRO-2 (LoRA) and ZeRO-3 (full fine-tuning).

``train.zero_stage: null`` (the default) picks the preset from ``train.lora``: LoRA adapters are a
few MB of trainable state, so ZeRO-2 (optimizer states and gradients sharded, weights replicated)
costs nothing extra and keeps the frozen base whole on every GPU; full fine-tuning of a 7B model
needs its 16 bytes/parameter of model states sharded, i.e. ZeRO-3 (docs/memory_plan.md).
``train.offload`` moves the optimizer states (and under ZeRO-3 the parameters) to CPU memory.

The config never holds an ``optimizer`` or ``scheduler`` block: the train loop passes the optimizer
(``torch.optim.AdamW``; ``DeepSpeedCPUAdam`` under offload, which DeepSpeed requires there) and a
torch ``LambdaLR`` to ``deepspeed.initialize`` itself, which keeps DeepSpeed from JIT-building its
fused Adam op (slow, and CUDA-only in practice) and keeps the optimizer identical on CPU and GPU.
``zero_allow_untested_optimizer`` is therefore required.
"""

from __future__ import annotations

import math
from typing import Any

from spice_ray.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, *, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` workers.

    bf16 is enabled only on GPU (CPU training stays in fp32). ``train_batch_size`` is given
    explicitly so DeepSpeed checks micro batch × grad accumulation × world size for us. Gradient
    clipping (``max_grad_norm``) is DeepSpeed's, over the global (all-rank) gradient norm.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    stage = cfg.resolved_zero_stage
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": use_gpu,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
    }
    if stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_param_persistence_threshold": 10_000,
                "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000,
                "reduce_bucket_size": 50_000_000,
            }
        )
    else:
        zero.update({"allgather_bucket_size": 200_000_000, "reduce_bucket_size": 200_000_000})
    if cfg.offload:
        device = {"device": "cpu", "pin_memory": bool(use_gpu)}
        zero["offload_optimizer"] = dict(device)
        if stage == 3:
            zero["offload_param"] = dict(device)
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


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """LR multiplier of optimizer step ``step`` (0-based) out of ``total_steps``.

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, so no step runs at
    lr 0. Then ``constant`` (1), ``linear`` (1 → 0) or ``cosine`` (½(1 + cos πp) → 0) over the rest,
    with p = (step − warmup) / (total − warmup); the last step's multiplier stays above 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {kind!r}")


class LRSchedule:
    """A picklable ``LambdaLR`` function; its attributes travel with the scheduler's state_dict, so a
    resumed run keeps the schedule it started with."""

    def __init__(self, total_steps: int, warmup_ratio: float, kind: str) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = math.ceil(warmup_ratio * self.total_steps) if warmup_ratio > 0 else 0
        self.kind = kind

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, kind=self.kind)

