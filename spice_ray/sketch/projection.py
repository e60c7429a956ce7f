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
shape), so every process, worker count, batch order and device draws the same numbers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch


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


@dataclass(frozen=True)
class ProjectionSpec:
    """What a sketch depends on besides the model and the record; it goes into the manifest."""

    kind: str
    dim: int
    seed: int
    layers: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


class KroneckerProjection:
    """Per-layer factors (P_out, P_in) for the named weight shapes, built once and kept on device."""

    kind = "kronecker-gaussian"

    def __init__(self, shapes: dict[str, tuple[int, int]], dim: int, seed: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.seed = seed
        self.d_out, self.d_in = factor_dim(dim)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (n_out, n_in) in shapes.items():
            p_out = gaussian_factor(seed, name, "out", self.d_out, n_out)
            p_in = gaussian_factor(seed, name, "in", self.d_in, n_in)
            self.factors[name] = (p_out.to(device), p_in.to(device))

    @property
    def spec(self) -> ProjectionSpec:
        return ProjectionSpec(self.kind, self.dim, self.seed, tuple(sorted(self.factors)))

    def project(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Project per-sample gradients (B, out, in) of layer ``name`` to (B, d)."""
        p_out, p_in = self.factors[name]
        g = grads.to(p_out.dtype)
        return torch.einsum("ao,boi,ci->bac", p_out, g, p_in).reshape(g.shape[0], self.dim)

    def dense(self, name: str) -> torch.Tensor:
        """The explicit (d × out·in) matrix P_out ⊗ P_in — for tests on small layers only."""
        p_out, p_in = self.factors[name]
        return torch.kron(p_out, p_in)
