"""Per-sample gradients of the trainable linear layers (LoRA A and B), projected to sketches.

For a linear layer y = x Wᵀ, the gradient of sample i's loss is a sum of outer products over its
tokens, ∇W ℓ_i = Σ_t δ_{i,t} x_{i,t}ᵀ, with x the layer input and δ = ∂ℓ_i/∂y. One forward and one
backward of the batch loss Σ_i ℓ_i give every sample's (x, δ) at once: samples never interact in
a causal LM with right padding (pad positions come after every real token, so nothing attends to
them and their δ is exactly zero). Forward hooks keep x and a tensor hook on y catches δ; the
per-sample gradient is materialised one layer at a time (LoRA factors are small) to get its exact
norm, then projected by the layer's Kronecker factors.

The loss ℓ_i is the mean token cross-entropy over the labelled tokens of sample i (the response
tokens, or all tokens, as the labels say).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spice_ray.sketch.projection import KroneckerProjection


def trainable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose weight is trainable (with LoRA: every lora_A / lora_B)."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    for name, m in found.items():
        if m.bias is not None and m.bias.requires_grad:
            raise ValueError(f"{name}: trainable bias is not supported in sketches")
    if not found:
        raise ValueError("the model has no trainable linear layers to sketch")
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
class SketchBatch:
    sketch: torch.Tensor  # (B, d) float32
    loss: torch.Tensor  # (B,)
    grad_norm: torch.Tensor  # (B,) exact ‖∇θ ℓ_i‖ over all trainable linear weights
    n_loss_tokens: torch.Tensor  # (B,)


class GradientSketcher:
    """Sketches of per-sample gradients for one model: one forward + one backward per batch."""

    def __init__(self, model: nn.Module, dim: int, seed: int):
        self.model = model
        self.layers = trainable_linears(model)
        device = next(model.parameters()).device
        shapes = {name: tuple(m.weight.shape) for name, m in self.layers.items()}
        self.projection = KroneckerProjection(shapes, dim=dim, seed=seed, device=device)
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        for name, module in self.layers.items():
            module.register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            self._inputs[name] = args[0].detach()

            def keep_grad(grad: torch.Tensor) -> None:
                self._grads[name] = grad.detach()

            output.register_hook(keep_grad)

        return hook

    def _forward_backward(self, input_ids, labels, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()  # no dropout: the gradient is a function of the record alone
        self.model.zero_grad(set_to_none=True)
        self._inputs.clear()
        self._grads.clear()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss, counts = per_sample_loss(logits, labels)
        loss.sum().backward()
        self.model.zero_grad(set_to_none=True)
        return loss.detach(), counts

    def _layer_grads(self):
        """Yield (layer name, per-sample ∇W of shape (B, out, in)), one layer at a time."""
        for name in self.layers:
            x = self._inputs.pop(name).float()
            delta = self._grads.pop(name).float()
            yield name, torch.einsum("bto,bti->boi", delta, x)

    def per_sample_gradients(self, input_ids, labels, attention_mask) -> dict[str, torch.Tensor]:
        """Every layer's per-sample gradients at once (tests and fidelity checks; small models)."""
        self._forward_backward(input_ids, labels, attention_mask)
        return dict(self._layer_grads())

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> SketchBatch:
        loss, counts = self._forward_backward(input_ids, labels, attention_mask)
        batch = input_ids.shape[0]
        sketch = torch.zeros(batch, self.projection.dim, device=input_ids.device)
        sq_norm = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
        for name, grads in self._layer_grads():
            sq_norm += grads.double().pow(2).sum(dim=(1, 2))
            sketch += self.projection.project(name, grads)
        return SketchBatch(sketch=sketch, loss=loss, grad_norm=sq_norm.sqrt().float(), n_loss_tokens=counts)
