"""Sketches: seeded projection, per-sample gradients, and the Ray Data worker that runs them."""

from spice_ray.sketch.gradients import GradientSketcher, per_sample_loss, trainable_linears
from spice_ray.sketch.projection import KroneckerProjection, ProjectionSpec, factor_dim, stable_seed

__all__ = [
    "GradientSketcher",
    "KroneckerProjection",
    "ProjectionSpec",
    "factor_dim",
    "per_sample_loss",
    "stable_seed",
    "trainable_linears",
]
