"""Load a training checkpoint's trainable weights and Adam moments for Adam-preconditioned sketches.

Two layouts are read:

* **Hugging Face / plain torch**: a directory holding ``optimizer.pt`` (a ``torch.optim`` state
  dict) and, optionally, ``adapter_model.safetensors`` / ``adapter_model.bin`` (PEFT adapter
  weights), or the ``optimizer.pt`` file itself. Torch numbers the optimizer's parameters 0..n-1
  in the order they were handed to it; they are matched to the model's trainable parameters in
  ``named_parameters()`` order (what the train stage, PEFT and the HF Trainer do for LoRA-only
  training); a state keyed by parameter names is matched by name.
* **DeepSpeed** (ZeRO stage 0, 1 or 2): a save directory (``latest`` names the tag), a tag
  directory (``mp_rank_00_model_states.pt`` + ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt``),
  or a Ray Train checkpoint of the train stage (``train_state.json`` names the tag). Each rank's
  flat fp32 partition of ``exp_avg`` / ``exp_avg_sq`` is cut to its unpadded length, the ranks are
  concatenated, and the flat vector is split by the ``param_shapes`` the model states record — the
  same reconstruction ``deepspeed.utils.zero_to_fp32`` applies to the fp32 weights. The model
  states' ``module`` (the trainable weights with ``exclude_frozen_parameters``) is loaded too.
  ZeRO-3 (per-parameter partitions) is refused with a clear error.
* **spice-ray's plain-torch engine** (``spice_ray.train.engine``, what one-worker training and the
  warm-up write): a checkpoint whose ``train_state.json`` names a tag directory holding
  ``engine_state.json``, ``trainable.safetensors`` and ``optimizer.safetensors``. Read with
  safetensors and json only: nothing is unpickled.

Everything is checked against the model: every trainable parameter must have moments of its exact
shape, and no state may name a parameter the model lacks; a mismatch raises ``CheckpointMismatch``
naming the parameters. The files are read with ``torch.load(weights_only=False)`` (DeepSpeed pickles
Python objects in them): load only checkpoints you trust.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spice_ray.sketch.gradients import AdamMoments

OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class CheckpointMismatch(ValueError):
    """The optimizer state (or weights) of a checkpoint do not fit the model being sketched."""


@dataclass
class TrainingState(AdamMoments):
    """A checkpoint's Adam moments, keyed by *parameter* name here, and, when it has them, weights."""

    path: str
    format: str  # "torch" | "deepspeed"
    weights: dict[str, torch.Tensor] | None  # trainable parameter name -> tensor; None: keep the model's

    def moments_for(self, layers: dict[str, nn.Linear]) -> AdamMoments:
        """The moments keyed by layer (module) name, for ``GradientSketcher(adam=...)``."""
        return AdamMoments(
            step=self.step,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            exp_avg={name: self.exp_avg[f"{name}.weight"] for name in layers},
            exp_avg_sq={name: self.exp_avg_sq[f"{name}.weight"] for name in layers},
        )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check(where: str, model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    params = _trainable(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    bad = sorted(n for n in set(params) & set(state) if tuple(state[n].shape) != tuple(params[n].shape))
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trainable parameter(s) without {what} (e.g. {missing[:2]})")
        if unexpected:
            parts.append(f"{len(unexpected)} {what} entr(ies) for parameters the model lacks (e.g. {unexpected[:2]})")
        if bad:
            n = bad[0]
            parts.append(f"{len(bad)} shape mismatch(es) (e.g. {n}: {tuple(state[n].shape)} vs {tuple(params[n].shape)})")
        raise CheckpointMismatch(
            f"the checkpoint at {where} does not match the model being sketched: " + "; ".join(parts)
            + " — check model.proxy and model.proxy_lora against the run that wrote it"
        )


def _group_hparams(group: dict) -> tuple[float, float, float]:
    betas = group.get("betas", (0.9, 0.999))
    return float(betas[0]), float(betas[1]), float(group.get("eps", 1e-8))


def _step(value) -> int:
    return int(value.item() if torch.is_tensor(value) else value)


def _from_torch_state(where: str, sd: dict, model: nn.Module) -> tuple[dict, dict, int, tuple[float, float, float]]:
    """A torch optimizer state dict → per-name moments (validated against the model)."""
    if "state" not in sd or "param_groups" not in sd:
        raise CheckpointMismatch(f"{where} is not a torch optimizer state dict (no 'state' / 'param_groups')")
    names = list(_trainable(model))
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    by_name = all(isinstance(i, str) for i in ids)
    if not by_name and len(ids) != len(names):
        raise CheckpointMismatch(
            f"the optimizer state at {where} holds {len(ids)} parameters and the model has {len(names)} trainable ones"
        )
    name_of = {i: (i if by_name else names[k]) for k, i in enumerate(ids)}
    exp_avg, exp_avg_sq, steps = {}, {}, set()
    for i, st in sd["state"].items():
        if "exp_avg" not in st or "exp_avg_sq" not in st:
            raise CheckpointMismatch(f"the optimizer state at {where} is not Adam's (no exp_avg / exp_avg_sq)")
        n = name_of[i]
        exp_avg[n], exp_avg_sq[n] = st["exp_avg"].float(), st["exp_avg_sq"].float()
        steps.add(_step(st.get("step", 0)))
    _check(where, model, exp_avg, "optimizer state")
    if len(steps) != 1:
        raise CheckpointMismatch(f"the optimizer state at {where} has parameters at different steps {sorted(steps)}")
    return exp_avg, exp_avg_sq, steps.pop(), _group_hparams(sd["param_groups"][0])


def _deepspeed_tag_dir(root: Path) -> Path | None:
    if (root / "mp_rank_00_model_states.pt").exists():
        return root
    if (root / "train_state.json").exists():  # the train stage's Ray Train checkpoint
        return root / json.loads((root / "train_state.json").read_text())["tag"]
    if (root / "latest").exists():  # a deepspeed save_checkpoint directory
        return root / (root / "latest").read_text().strip()
    return None


def _split_flat(flat: torch.Tensor, shapes: dict[str, torch.Size], paddings: list[int] | None) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        out[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
        offset += n + (paddings[k] if paddings is not None else 0)
    return out


def _from_deepspeed(tag_dir: Path, model: nn.Module) -> TrainingState:
    states = _load(tag_dir / "mp_rank_00_model_states.pt")
    weights = {k: v.float() for k, v in (states.get("module") or {}).items() if k in _trainable(model)}
    optim_files = sorted((int(m.group(1)), f) for f in tag_dir.iterdir() if (m := OPTIM_RE.search(f.name)))
    if not optim_files:
        if states.get("optimizer") is None:
            raise CheckpointMismatch(f"the DeepSpeed checkpoint at {tag_dir} has no optimizer state")
        exp_avg, exp_avg_sq, step, (b1, b2, eps) = _from_torch_state(str(tag_dir), states["optimizer"], model)
    else:
        ranks = [r for r, _ in optim_files]
        if ranks != list(range(len(ranks))):
            raise CheckpointMismatch(f"the DeepSpeed checkpoint at {tag_dir} lacks some ranks' optimizer files (have {ranks})")
        osds = [_load(f)["optimizer_state_dict"] for _, f in optim_files]
        stage = int(osds[0].get("zero_stage", 0))
        if stage not in (1, 2):
            raise CheckpointMismatch(f"DeepSpeed ZeRO stage {stage} optimizer states are not supported (ZeRO 0, 1 and 2 are)")
        base = [o["base_optimizer_state"] for o in osds]
        if not isinstance(base[0], dict):
            raise CheckpointMismatch(f"{tag_dir}: elastic ZeRO checkpoints are not supported")
        shapes = states["param_shapes"]
        align = osds[0].get("param_alignment_paddings")
        exp_avg, exp_avg_sq = {}, {}
        steps = set()
        for g, group_shapes in enumerate(shapes):
            for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                parts = []
                for o, b in zip(osds, base, strict=True):
                    flat = b["state"][g][key].float()
                    parts.append(flat[: flat.numel() - int(o["group_paddings"][g])])
                out.update(_split_flat(torch.cat(parts), group_shapes, align[g] if align else None))
            steps.add(_step(base[0]["state"][g]["step"]))
        _check(str(tag_dir), model, exp_avg, "optimizer state")
        if len(steps) != 1:
            raise CheckpointMismatch(f"the optimizer groups at {tag_dir} are at different steps {sorted(steps)}")
        step = steps.pop()
        b1, b2, eps = _group_hparams(base[0]["param_groups"][0])
    if weights:
        _check(str(tag_dir), model, weights, "weights")
    return TrainingState(step, b1, b2, eps, exp_avg, exp_avg_sq, path=str(tag_dir), format="deepspeed", weights=weights or None)


def _adapter_weights(root: Path, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """PEFT adapter weights saved beside optimizer.pt, renamed to the model's parameter names."""
    for fname in ("adapter_model.safetensors", "adapter_model.bin"):
        f = root / fname
        if not f.exists():
            continue
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            saved = load_file(str(f))
        else:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        params = _trainable(model)
        # PEFT drops the adapter name ("lora_A.default.weight" is saved as "lora_A.weight")
        by_plain = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", n): n for n in params}
        out = {}
        for k, v in saved.items():
            if k not in by_plain and k not in params:
                raise CheckpointMismatch(f"{f}: adapter weight {k} is not a trainable parameter of the model")
            out[by_plain.get(k, k)] = v.float()
        _check(str(f), model, out, "weights")
        return out
    return None


def _torch_engine_dir(root: Path) -> Path | None:
    """The tag directory of a plain-torch engine checkpoint under ``root``, if it is one."""
    from spice_ray.train.engine import STATE_JSON

    state = root / "train_state.json"
    if not state.is_file():
        return None
    tag_dir = root / str(json.loads(state.read_text()).get("tag", ""))
    return tag_dir if (tag_dir / STATE_JSON).is_file() else None


def _from_torch_engine(tag_dir: Path, model: nn.Module) -> TrainingState:
    from safetensors.torch import load_file

    from spice_ray.train.engine import OPTIMIZER_FILE, STATE_JSON, TRAINABLE_FILE

    meta = json.loads((tag_dir / STATE_JSON).read_text())["optimizer"]
    tensors = load_file(str(tag_dir / OPTIMIZER_FILE))
    exp_avg = {k.rsplit("/", 1)[0]: v.float() for k, v in tensors.items() if k.endswith("/exp_avg")}
    exp_avg_sq = {k.rsplit("/", 1)[0]: v.float() for k, v in tensors.items() if k.endswith("/exp_avg_sq")}
    steps = {_step(v) for k, v in tensors.items() if k.endswith("/step")} | {_step(s["step"]) for s in meta["scalars"].values() if "step" in s}
    _check(str(tag_dir), model, exp_avg, "optimizer state")
    if len(steps) != 1:
        raise CheckpointMismatch(f"the optimizer state at {tag_dir} has parameters at different steps {sorted(steps)}")
    weights = {k: v.float() for k, v in load_file(str(tag_dir / TRAINABLE_FILE)).items()}
    _check(str(tag_dir), model, weights, "weights")
    b1, b2, eps = _group_hparams(meta["groups"][0])
    return TrainingState(steps.pop(), b1, b2, eps, exp_avg, exp_avg_sq, path=str(tag_dir), format="torch", weights=weights)


def load_training_state(path: str | Path, model: nn.Module, *, pickles: bool = True) -> TrainingState:
    """Read the checkpoint at ``path`` (see the module doc for the layouts) for ``model``'s trainable
    parameters; raises ``CheckpointMismatch`` when the state does not fit the model. ``pickles=False``
    (a checkpoint the run wrote itself, e.g. the warm-up's): only the plain-torch engine's
    safetensors layout is read; anything that would need unpickling is refused."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"optimizer state not found: {path}")
    if not pickles:
        engine_dir = _torch_engine_dir(root) if root.is_dir() else None
        if engine_dir is None:
            raise CheckpointMismatch(f"refusing to unpickle {path}: this checkpoint should be safetensors + JSON (the plain-torch engine's)")
        return _from_torch_engine(engine_dir, model)
    if root.is_file():
        exp_avg, exp_avg_sq, step, (b1, b2, eps) = _from_torch_state(str(root), _load(root), model)
        return TrainingState(step, b1, b2, eps, exp_avg, exp_avg_sq, path=str(root), format="torch", weights=None)
    engine_dir = _torch_engine_dir(root)
    if engine_dir is not None:
        return _from_torch_engine(engine_dir, model)
    tag_dir = _deepspeed_tag_dir(root)
    if tag_dir is not None:
        return _from_deepspeed(tag_dir, model)
    if (root / "optimizer.pt").exists():
        exp_avg, exp_avg_sq, step, (b1, b2, eps) = _from_torch_state(str(root / "optimizer.pt"), _load(root / "optimizer.pt"), model)
        weights = _adapter_weights(root, model)
        return TrainingState(step, b1, b2, eps, exp_avg, exp_avg_sq, path=str(root), format="torch", weights=weights)
    raise CheckpointMismatch(
        f"no optimizer state found at {path}: expected optimizer.pt (Hugging Face / torch) or a DeepSpeed checkpoint "
        "(latest, mp_rank_00_model_states.pt + *_optim_states.pt, or the train stage's train_state.json)"
    )


def apply_weights(model: nn.Module, state: TrainingState) -> int:
    """Copy the checkpoint's trainable weights into ``model``; returns how many tensors were set."""
    if not state.weights:
        return 0
    params = _trainable(model)
    with torch.no_grad():
        for name, value in state.weights.items():
            params[name].copy_(value.to(params[name].dtype))
    return len(state.weights)
