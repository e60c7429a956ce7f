"""Sketches: seeded projection, per-sample gradients (projection folded into the backward),
checkpoint/optimizer-state loading for Adam sketches, and the Ray Data worker that runs them."""

from spice_ray.sketch.checkpoint import CheckpointMismatch, TrainingState, apply_weights, load_training_state
from spice_ray.sketch.gradients import (
    AdamMoments,
    GradientSketcher,
    SketchBatch,
    adam_update,
    per_sample_loss,
    trainable_linears,
)
from spice_ray.sketch.projection import (
    KroneckerProjection,
    ProjectionSpec,
    choose_method,
    factor_dim,
    layer_costs,
    stable_seed,
)

__all__ = [
    "AdamMoments",
    "CheckpointMismatch",
    "GradientSketcher",
    "KroneckerProjection",
    "ProjectionSpec",
    "SketchBatch",
    "TrainingState",
    "adam_update",
    "apply_weights",
    "choose_method",
    "factor_dim",
    "layer_costs",
    "load_training_state",
    "per_sample_loss",
    "stable_seed",
    "trainable_linears",
]
