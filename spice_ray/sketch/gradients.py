"""Per-sample gradients of the trainable linear layers, projected to sketches inside the backward.

For a linear layer y = x Wᵀ, the gradient of sample i's loss is a sum of outer products over its
tokens, ∇W ℓ_i = Σ_t δ_{i,t} x_{i,t}ᵀ, with x the layer input and δ = ∂ℓ_i/∂y. One forward and one
backward of the batch loss Σ_i ℓ_i give every sample's (x, δ) at once: samples never interact, and
in a causal LM with right padding the pad positions come after every real token, so nothing real
attends to them, their loss weight is zero and their δ is exactly zero. That is why no attention
mask is passed (the model's plain causal mask is exact for right padding, and lets attention
kernels take their causal fast path).

A forward hook on each trainable layer keeps its input x and puts a tensor hook on its output;
when δ arrives during the backward, the hook folds the layer's contribution into the batch's
sketch at once and drops x, so no layer's (x, δ) outlives its part of the backward:

* ``materialize``: G (B, out, in) = δᵀx per sample, then P_out G P_inᵀ; the exact ‖G‖ comes free.
  Cheapest for LoRA factors (one side is the rank r).
* ``factored``: (δ P_outᵀ)ᵀ(x P_inᵀ) per sample — G is never formed; the norm comes from the Gram
  form ‖G‖² = Σ_{t,s}(δ_t·δ_s)(x_t·x_s) or from G, whichever is cheaper for the layer.
* ``auto`` (default): per layer, whichever of the two costs fewer multiply-adds at this batch's
  sequence length (``projection.choose_method``). For LoRA factors that is ``materialize``.

With Adam preconditioning (LESS) the sketched vector is, per layer, one Adam step's update
direction computed from the sample's gradient and the checkpoint's moments (``adam_update``). It is
elementwise in G, so G is materialised for every layer.

The loss ℓ_i is the mean token cross-entropy over the labelled tokens of sample i (the response
tokens, or all tokens, as the labels say).

LoRA at init: B = 0, so δ at lora_A's output (= scale·Bᵀδ_y) is zero and every lora_A gradient is
exactly zero; the sketch is then the sketch of the lora_B gradients s·(Σ_t δ_t x_tᵀ)Aᵀ alone, i.e.
of each adapted layer's full-weight gradient seen through the random r-dimensional A. Those
layers are skipped (their contribution is known to be zero) unless Adam preconditioning is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from spice_ray.sketch.projection import KroneckerProjection, choose_method, layer_costs

Method = Literal["auto", "materialize", "factored"]


def trainable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose weight is trainable (with LoRA: every lora_A / lora_B)."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    for name, m in found.items():
        if m.bias is not None and m.bias.requires_grad:
            raise ValueError(f"{name}: trainable bias is not supported in sketches")
    if not found:
        raise ValueError("the model has no trainable linear layers to sketch")
    others = [n for n, p in model.named_parameters() if p.requires_grad and not any(p is m.weight for m in found.values())]
    if others:
        raise ValueError(f"trainable parameters outside linear weights are not sketched: {others[:3]}")
    return found


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) mean next-token cross-entropy over each sample's labelled tokens, and their counts."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


@dataclass
class AdamMoments:
    """Adam state of the sketched weights, keyed by layer (module) name, shaped like the weights."""

    step: int
    beta1: float
    beta2: float
    eps: float
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]

    def to(self, device: str | torch.device) -> AdamMoments:
        return AdamMoments(
            self.step,
            self.beta1,
            self.beta2,
            self.eps,
            {k: v.to(device, torch.float32) for k, v in self.exp_avg.items()},
            {k: v.to(device, torch.float32) for k, v in self.exp_avg_sq.items()},
        )


def adam_update(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """The direction of one more Adam step from moments (m, v) after ``step`` steps, taken with
    gradient g (broadcast over a leading batch dimension): m̂'/(√v̂' + ε), where
    m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g², m̂' = m'/(1−β1^{t+1}), v̂' = v'/(1−β2^{t+1}), t = step."""
    t = step + 1
    m1 = beta1 * m + (1 - beta1) * g
    v1 = beta2 * v + (1 - beta2) * g * g
    return (m1 / (1 - beta1**t)) / ((v1 / (1 - beta2**t)).sqrt() + eps)


@dataclass
class SketchBatch:
    sketch: torch.Tensor  # (B, d) float32
    loss: torch.Tensor  # (B,)
    grad_norm: torch.Tensor  # (B,) exact norm of the sketched vector (the gradient, or the Adam update)
    n_loss_tokens: torch.Tensor  # (B,)
    exact: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # per layer (B, out, in), if asked


class GradientSketcher:
    """Sketches of per-sample gradients for one model: one forward + one backward per batch."""

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        seed: int,
        *,
        method: Method = "auto",
        adam: AdamMoments | None = None,
        skip_zero_layers: bool = True,
    ):
        if method not in ("auto", "materialize", "factored"):
            raise ValueError(f"unknown sketch method {method!r}")
        if adam is not None and method == "factored":
            raise ValueError("Adam preconditioning is elementwise in the per-sample gradient: use method 'auto' or 'materialize'")
        self.model = model
        self.method = method
        self.layers = trainable_linears(model)
        self.device = next(model.parameters()).device
        shapes = {name: tuple(m.weight.shape) for name, m in self.layers.items()}
        self.projection = KroneckerProjection(shapes, dim=dim, seed=seed, device=self.device)
        self.adam = None
        if adam is not None:
            missing = sorted(set(self.layers) - set(adam.exp_avg))
            if missing:
                raise ValueError(f"the optimizer state has no moments for {len(missing)} sketched layer(s), e.g. {missing[:3]}")
            for name, m in self.layers.items():
                for moments in (adam.exp_avg, adam.exp_avg_sq):
                    if tuple(moments[name].shape) != tuple(m.weight.shape):
                        raise ValueError(f"{name}: optimizer state shape {tuple(moments[name].shape)} != weight shape {tuple(m.weight.shape)}")
            self.adam = adam.to(self.device)
        self.skip_zero_layers = skip_zero_layers and adam is None
        # LoRA pairs: lora_A's output gradient is scale·Bᵀδ, exactly zero while lora_B is zero.
        self._partner = {n: n.replace("lora_A", "lora_B") for n in self.layers if "lora_A" in n and n.replace("lora_A", "lora_B") in self.layers}
        self._state: dict | None = None
        self._handles = [module.register_forward_hook(self._make_hook(name)) for name, module in self.layers.items()]

    # ---- planning
    def methods_for(self, tokens: int) -> dict[str, str]:
        """The method each layer uses at sequence length ``tokens``."""
        if self.adam is not None:
            return {name: "materialize" for name in self.layers}
        if self.method != "auto":
            return {name: self.method for name in self.layers}
        p = self.projection
        return {name: choose_method(o, i, p.d_out, p.d_in, tokens) for name, (o, i) in p.shapes.items()}

    def zero_layers(self) -> set[str]:
        """Layers whose per-sample gradient is exactly zero now (lora_A while its lora_B is zero)."""
        if not self.skip_zero_layers:
            return set()
        return {a for a, b in self._partner.items() if not torch.any(self.layers[b].weight)}

    # ---- hooks
    def _make_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            state = self._state
            if state is None or not torch.is_grad_enabled() or name in state["skip"]:
                return
            if name in state["seen"]:
                raise RuntimeError(f"{name} ran twice in one forward: shared layers are not supported in sketches")
            state["seen"].add(name)
            x = args[0].detach()
            output.register_hook(lambda grad: self._fold(name, x, grad.detach()))

        return hook

    def _fold(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Add layer ``name``'s per-sample contribution (from its input x and output gradient δ)."""
        state = self._state
        assert state is not None
        x = x.float()
        delta = delta.float()
        proj = self.projection
        if state["methods"][name] == "materialize" or state["exact"] is not None:
            g = torch.matmul(delta.transpose(1, 2), x)  # (B, out, in) = Σ_t δ_t x_tᵀ
            if self.adam is not None:
                a = self.adam
                g = adam_update(g, a.exp_avg[name], a.exp_avg_sq[name], a.step, a.beta1, a.beta2, a.eps)
            state["sq"] += g.square().sum(dim=(1, 2), dtype=torch.float64)
            state["sketch"] += proj.project_grads(name, g)
            if state["exact"] is not None:
                state["exact"][name] = g
            return
        state["sketch"] += proj.project_tokens(name, delta, x)
        o, i = proj.shapes[name]
        c = layer_costs(o, i, proj.d_out, proj.d_in, x.shape[1])
        if c.norm_gram < c.norm_materialize:
            dd = torch.matmul(delta, delta.transpose(1, 2)).double()  # (B, T, T)
            xx = torch.matmul(x, x.transpose(1, 2)).double()
            state["sq"] += (dd * xx).sum(dim=(1, 2))
        else:
            state["sq"] += torch.matmul(delta.transpose(1, 2), x).square().sum(dim=(1, 2), dtype=torch.float64)

    # ---- entry points
    def __call__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        exact: bool = False,
    ) -> SketchBatch:
        """Sketch a right-padded batch. ``attention_mask`` may be omitted (exact for right padding).
        ``exact=True`` also returns every layer's materialised per-sample vectors (small models)."""
        batch, width = input_ids.shape
        skip = set() if exact else self.zero_layers()
        self._state = {
            "sketch": torch.zeros(batch, self.projection.dim, device=input_ids.device),
            "sq": torch.zeros(batch, dtype=torch.float64, device=input_ids.device),
            "methods": self.methods_for(width),
            "skip": skip,
            "seen": set(),
            "exact": {} if exact else None,
        }
        try:
            self.model.eval()  # no dropout: the gradient is a function of the record alone
            self.model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss, counts = per_sample_loss(logits, labels)
                del logits
                if loss.requires_grad:  # False only when every layer is skipped
                    loss.sum().backward()
            self.model.zero_grad(set_to_none=True)
            state = self._state
        finally:
            self._state = None
        expected = set(self.layers) - skip
        if state["seen"] != expected:
            raise RuntimeError(f"layers never ran in the forward: {sorted(expected - state['seen'])[:3]}")
        return SketchBatch(
            sketch=state["sketch"],
            loss=loss.detach(),
            grad_norm=state["sq"].sqrt().float(),
            n_loss_tokens=counts,
            exact=state["exact"],
        )

    def per_sample_gradients(self, input_ids, labels, attention_mask=None) -> dict[str, torch.Tensor]:
        """Every layer's per-sample gradients (B, out, in) — or Adam updates — at once (tests, fidelity)."""
        out = self(input_ids, labels, attention_mask, exact=True)
        assert out.exact is not None
        return out.exact

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
