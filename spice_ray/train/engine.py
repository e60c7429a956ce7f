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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from spice_ray.config import TrainConfig

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
