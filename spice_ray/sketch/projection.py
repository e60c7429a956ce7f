"""A seeded Kronecker-structured random projection that is a pure function of (seed, layer, shape).

For a linear layer's weight gradient G (out × in) the projection is

    sketch(G) = P_out G P_inᵀ  (d_out × d_in, flattened row-major)  =  (P_out ⊗ P_in) vec(G)

with P_out (d_out × out) and P_in (d_in × in) i.i.d. N(0, 1/d_out) and N(0, 1/d_in). Then
E[P_outᵀP_out] = I and E[P_inᵀP_in] = I, so E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I: inner products
are preserved in expectation. The sketch of all adapted layers is the SUM of the per-layer
sketches, i.e. the projection P = [P_1 | P_2 | …] of the concatenated gradient; independent
zero-mean blocks keep E[PᵀP] = I. Only the small factors are ever held (d_out·out + d_in·in
numbers per layer), never the d × D matrix.

Each factor is drawn on the CPU from a torch Generator seeded by sha256(seed, layer name, side,
shape), so every process, worker count, batch order and device draws the same numbers; the factors
are moved to the device after they are drawn.

Two ways to apply it, both exact (they compute the same numbers up to float rounding):

* ``project_grads``: per-sample gradients G (B, out, in) that were materialised, contracted with
  the cheaper association — (G P_inᵀ) first or (P_out G) first — for the layer's shape. Best for
  LoRA factors, where one side is the rank r.
* ``project_tokens``: the factored form. With G_b = Σ_t δ_{b,t} x_{b,t}ᵀ,
  P_out G_b P_inᵀ = Σ_t (P_out δ_{b,t})(P_in x_{b,t})ᵀ: project δ (B,T,out) → (B,T,d_out) and
  x (B,T,in) → (B,T,d_in) per token, then one batched product (B, d_out, d_in). G is never formed.
  Best for wide layers (full weights), where out·in ≫ T·(d_out + d_in).

``layer_costs`` gives the multiply-adds of each, which ``method="auto"`` compares per layer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

KIND = "kronecker-gaussian"


def factor_dim(dim: int) -> tuple[int, int]:
    """Split d into d_out × d_in with d_out the largest divisor of d not above √d."""
    d_out = max(f for f in range(1, math.isqrt(dim) + 1) if dim % f == 0)
    return d_out, dim // d_out


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from sha256 of the parts (never Python's salted ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_factor(seed: int, layer: str, side: str, rows: int, cols: int) -> torch.Tensor:
    """A (rows × cols) float32 N(0, 1/rows) matrix, a pure function of its arguments."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, layer, side, rows, cols))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32) / math.sqrt(rows)


def generator_digest() -> str:
    """sha256 of a fixed probe draw: changes if torch's CPU normal generator ever changes, so a
    sketch cache keyed on the projection spec is never reused across such a change."""
    return hashlib.sha256(gaussian_factor(0, "probe", "out", 8, 8).numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ProjectionSpec:
    """Everything the projection is a function of; it goes into the sketch manifest.

    ``layers`` holds (name, out, in) for every projected weight, sorted by name.
    """

    kind: str
    dim: int
    seed: int
    d_out: int
    d_in: int
    layers: tuple[tuple[str, int, int], ...]
    generator: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [list(x) for x in self.layers]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def for_shapes(cls, shapes: dict[str, tuple[int, int]], dim: int, seed: int) -> ProjectionSpec:
        d_out, d_in = factor_dim(dim)
        layers = tuple(sorted((name, int(o), int(i)) for name, (o, i) in shapes.items()))
        return cls(KIND, dim, seed, d_out, d_in, layers, generator_digest())


@dataclass(frozen=True)
class LayerCosts:
    """Multiply-adds per sample for one layer (T tokens) under each method."""

    materialize: float  # form G (T·o·i), then project with the cheaper association
    factored: float  # project both sides per token, then one (d_out × T)(T × d_in) product
    norm_materialize: float  # ‖G‖² from a materialised G (the factored path has to build it)
    norm_gram: float  # ‖G‖² = Σ_{t,s} (δ_t·δ_s)(x_t·x_s): T²·(o + i)


def layer_costs(out: int, inp: int, d_out: int, d_in: int, tokens: float) -> LayerCosts:
    proj = min(out * inp * d_in + d_out * out * d_in, d_out * out * inp + d_out * inp * d_in)
    return LayerCosts(
        materialize=tokens * out * inp + proj,
        factored=tokens * (out * d_out + inp * d_in + d_out * d_in),
        norm_materialize=tokens * out * inp,
        norm_gram=tokens * tokens * (out + inp),
    )


def choose_method(out: int, inp: int, d_out: int, d_in: int, tokens: float) -> str:
    """'materialize' or 'factored' for one layer, whichever costs fewer multiply-adds (with the norm)."""
    c = layer_costs(out, inp, d_out, d_in, tokens)
    factored = c.factored + min(c.norm_materialize, c.norm_gram)
    return "factored" if factored < c.materialize else "materialize"


class KroneckerProjection:
    """Per-layer factors (P_out, P_in) for the named weight shapes, built once and kept on device."""

    kind = KIND

    def __init__(self, shapes: dict[str, tuple[int, int]], dim: int, seed: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.seed = seed
        self.d_out, self.d_in = factor_dim(dim)
        self.shapes = {name: (int(o), int(i)) for name, (o, i) in shapes.items()}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (n_out, n_in) in self.shapes.items():
            p_out = gaussian_factor(seed, name, "out", self.d_out, n_out)
            p_in = gaussian_factor(seed, name, "in", self.d_in, n_in)
            self.factors[name] = (p_out.to(device), p_in.to(device))

    @property
    def spec(self) -> ProjectionSpec:
        return ProjectionSpec.for_shapes(self.shapes, self.dim, self.seed)

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`project_grads`."""
        return self.project_grads(name, grads)

    def project_grads(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Project materialised per-sample gradients (B, out, in) of layer ``name`` to (B, d)."""
        p_out, p_in = self.factors[name]
        g = grads.to(p_out.dtype)
        n_out, n_in = g.shape[1:]
        right_first = n_out * n_in * self.d_in + self.d_out * n_out * self.d_in
        left_first = self.d_out * n_out * n_in + self.d_out * n_in * self.d_in
        if right_first <= left_first:
            s = torch.matmul(p_out, torch.matmul(g, p_in.T))  # (B, out, d_in) then (B, d_out, d_in)
        else:
            s = torch.matmul(torch.matmul(p_out, g), p_in.T)  # (B, d_out, in) then (B, d_out, d_in)
        return s.reshape(g.shape[0], self.dim)

    def project_tokens(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The factored form: per-token output gradients δ (B, T, out) and inputs x (B, T, in) → (B, d),
        equal to ``project_grads(name, einsum('bto,bti->boi', δ, x))`` without forming G."""
        p_out, p_in = self.factors[name]
        dp = torch.matmul(delta.to(p_out.dtype), p_out.T)  # (B, T, d_out)
        xp = torch.matmul(x.to(p_in.dtype), p_in.T)  # (B, T, d_in)
        return torch.matmul(dp.transpose(1, 2), xp).reshape(delta.shape[0], self.dim)

    def dense(self, name: str) -> torch.Tensor:
        """The explicit (d × out·in) matrix P_out ⊗ P_in — for tests and the reference benchmark."""
        p_out, p_in = self.factors[name]
        return torch.kron(p_out, p_in)
