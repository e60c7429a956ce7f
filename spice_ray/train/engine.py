"""The two training engines behind one small interface: plain torch (world size 1) and DeepSpeed.

``run_loop`` drives an engine through the calls DeepSpeed's engine offers and nothing more:
``engine(**batch)``, ``backward(loss)``, ``step()``, ``is_gradient_accumulation_boundary()``,
``global_steps``, ``get_lr()``, ``train()``, ``module``, ``device``, ``save_checkpoint(dir, tag)``
and ``load_checkpoint(dir, tag)``.

:class:`TorchEngine` is that interface over a plain ``torch.optim`` optimizer for one worker: no
process group, no JIT-built C++ op (DeepSpeed builds one on its first ``initialize``, minutes on a
busy CPU). It keeps DeepSpeed's semantics where they show in the numbers: the loss is divided by
``grad_accum`` in ``backward``, gradients are clipped to ``max_grad_norm`` at the accumulation
boundary, and the LR scheduler steps once per optimizer step. Its checkpoints hold tensors in
safetensors and everything else in JSON, so loading one never unpickles anything.

``train.engine: auto`` (the default) uses it at world size 1 without offload; DeepSpeed (ZeRO-2/3,
offload) everywhere else, where sharding or offload is what makes the model fit.

:func:`build_engine` builds the configured one: the model (:func:`build_model`: gradient
checkpointing, LoRA), the optimizer, the LR schedule, and for DeepSpeed its JIT-built C++ ops'
cache (:func:`torch_extensions_dir`, with stale build locks cleared).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spice_ray.config import ModelConfig, TrainConfig

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_JSON = "engine_state.json"


def resolved_engine(tcfg: TrainConfig) -> str:
    """``torch`` or ``deepspeed``: what ``train.engine`` means for this config."""
    if tcfg.engine != "auto":
        return tcfg.engine
    return "torch" if tcfg.num_workers == 1 and not tcfg.offload else "deepspeed"


class TorchEngine:
    """A plain-torch stand-in for a DeepSpeed engine at world size 1 (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, tcfg: TrainConfig, device: torch.device) -> None:
        self.module = model.to(device)
        self.optimizer = optimizer
        self.lr_scheduler = scheduler
        self.device = device
        self.grad_accum = tcfg.grad_accum
        self.max_grad_norm = tcfg.max_grad_norm
        self.global_steps = 0
        self.micro_steps = 0
        self._autocast = device.type == "cuda"

    def __call__(self, **inputs: torch.Tensor) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            return self.module(**inputs)

    def train(self) -> None:
        self.module.train()

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    # ------------------------------------------------------------------------------- checkpoints

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def save_checkpoint(self, save_dir: str | Path, *, tag: str, exclude_frozen_parameters: bool = True) -> None:
        """Trainable weights and optimizer tensors as safetensors, the rest as JSON, under ``save_dir/tag``."""
        out = Path(save_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        names = list(self._trainable())
        save_file({n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}, out / TRAINABLE_FILE)
        tensors, meta = _optimizer_tensors(self.optimizer, names)
        save_file(tensors, out / OPTIMIZER_FILE)
        state = {
            "global_steps": self.global_steps,
            "micro_steps": self.micro_steps,
            "optimizer": meta,
            "scheduler": {"last_epoch": self.lr_scheduler.last_epoch, "base_lrs": list(self.lr_scheduler.base_lrs)},
        }
        (out / STATE_JSON).write_text(json.dumps(state))

    def load_checkpoint(self, load_dir: str | Path, *, tag: str, **_: Any) -> tuple[str | None, dict[str, Any]]:
        """Restore what :meth:`save_checkpoint` wrote; (path, {}) like DeepSpeed, (None, {}) when absent."""
        src = Path(load_dir) / tag
        if not (src / STATE_JSON).is_file():
            return None, {}
        state = json.loads((src / STATE_JSON).read_text())
        weights = load_file(src / TRAINABLE_FILE)
        trainable = self._trainable()
        if set(weights) != set(trainable):
            raise RuntimeError(f"checkpoint {src}: trainable parameters differ from the model's")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        _load_optimizer(self.optimizer, load_file(src / OPTIMIZER_FILE), state["optimizer"], list(trainable))
        self.lr_scheduler.last_epoch = int(state["scheduler"]["last_epoch"])
        self.lr_scheduler.base_lrs = list(state["scheduler"]["base_lrs"])
        self.global_steps = int(state["global_steps"])
        self.micro_steps = int(state["micro_steps"])
        return str(src), {}


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as named tensors (``<param name>/<key>``) and JSON metadata."""
    sd = optimizer.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, name in zip(order, names, strict=True):
        for key, value in sd["state"].get(index, {}).items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], names: list[str]) -> None:
    sd = optimizer.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    by_name: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, field = key.split("/", 1)
        by_name.setdefault(name, {})[field] = t
    state: dict[int, dict[str, Any]] = {}
    for index, name in zip(order, names, strict=True):
        entry = by_name.get(name, {}) | meta["scalars"].get(name, {})
        if entry:
            state[index] = entry
    groups = [dict(saved, params=g["params"]) for saved, g in zip(meta["groups"], sd["param_groups"], strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------- building one

DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/spice-ray/torch_extensions"
STALE_LOCK_S = 30 * 60  # a JIT build takes minutes; a lock this old was left by a killed build


def torch_extensions_dir(configured: str | None = None) -> str:
    """Where DeepSpeed's JIT-built ops are cached: $TORCH_EXTENSIONS_DIR, else the configured
    directory, else ``~/.cache/spice-ray/torch_extensions`` (the first build takes ~40 s)."""
    return os.path.expanduser(os.environ.get("TORCH_EXTENSIONS_DIR") or configured or DEFAULT_TORCH_EXTENSIONS_DIR)


def clear_stale_extension_locks(root: str, stale_after_s: float = STALE_LOCK_S) -> list[str]:
    """torch's JIT build holds ``<extensions dir>/<op>/lock`` while it compiles; a build killed midway
    leaves it, and every later build waits on it forever without a word. Locks older than
    ``stale_after_s`` are removed with a warning naming them; younger ones are named (a build may be
    running). Returns the removed paths."""
    removed = []
    for lock in Path(root).glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        if age > stale_after_s:
            logger.warning("removing a stale torch-extension build lock %s (%.0f min old: a killed build left it)", lock, age / 60)
            lock.unlink(missing_ok=True)
            removed.append(str(lock))
        else:
            logger.warning("a torch-extension build lock %s is %.0f s old: waiting for that build (remove the file if no build runs)", lock, age)
    return removed


def build_model(mcfg: ModelConfig, tcfg: TrainConfig, model_path: str, dtype: str = "float32"):
    """The target model from ``model_path``, with gradient checkpointing and LoRA as configured."""
    from spice_ray.models import add_lora, load_causal_lm

    model = load_causal_lm(model_path, trust_remote_code=mcfg.trust_remote_code, dtype=dtype)
    if tcfg.gradient_checkpointing:
        # non-reentrant checkpointing: no need for inputs that require grad (frozen embeddings + LoRA)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if tcfg.lora:
        model = add_lora(model, **mcfg.target_lora.model_dump(), seed=mcfg.init_seed)
    return model


def _optimizer(tcfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW; DeepSpeedCPUAdam (AdamW mode) under offload, as ZeRO-Offload requires (JIT-built once)."""
    if tcfg.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def set_schedule(scheduler: Any, schedule: Any) -> None:
    """Put ``schedule`` into a (restored) LambdaLR and set each group's LR for its next step."""
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.lr_lambdas[i] = schedule
        group["lr"] = scheduler.base_lrs[i] * schedule(scheduler.last_epoch)


def build_engine(config: dict[str, Any], world_size: int) -> tuple[Any, dict[str, Any]]:
    """The model, optimizer and LR schedule wrapped in the configured engine; and facts about it
    (``engine``, ``dtype``, ``total_steps``, ``trainable_params``, ``zero_stage``, ``pad_id``).
    ``config``: the loop's dict (see spice_ray.train.loop)."""
    from spice_ray.train.deepspeed_config import LRSchedule, deepspeed_config

    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    use_gpu = bool(config["use_gpu"])
    kind = resolved_engine(tcfg)
    if kind == "torch" and world_size != 1:
        raise RuntimeError(f"train.engine=torch runs one worker, not {world_size}")
    dtype = "bfloat16" if use_gpu and kind == "deepspeed" else "float32"
    model = build_model(mcfg, tcfg, config["model_path"], dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(tcfg, trainable)
    total_steps = int(config.get("total_steps") or tcfg.max_steps or 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler))
    facts = {"engine": kind, "dtype": "bfloat16" if use_gpu else "float32", "total_steps": total_steps,
             "trainable_params": sum(p.numel() for p in trainable), "zero_stage": None,
             "pad_id": config.get("pad_id") if config.get("pad_id") is not None else (model.config.pad_token_id or 0)}
    if kind == "torch":
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        return TorchEngine(model, optimizer, scheduler, tcfg=tcfg, device=device), facts
    clear_stale_extension_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(tcfg, world_size=world_size, use_gpu=use_gpu),
        dist_init_required=False,  # Ray Train's TorchConfig (or the caller) already set up torch.distributed
    )
    facts["zero_stage"] = tcfg.resolved_zero_stage
    return engine, facts
