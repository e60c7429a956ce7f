"""Sketches: seeded projection, per-sample gradients (projection folded into the backward),
optimizer-state loading for Adam sketches, the worker that runs them (no Ray import: the executor
decides where), the sketch cache and the stage's work."""

from spice_ray.sketch.gradients import (
    AdamMoments,
    GradientSketcher,
    SketchBatch,
    adam_update,
    per_sample_loss,
    trainable_linears,
)
from spice_ray.sketch.optimizer_state import (
    CheckpointMismatch,
    TrainingState,
    apply_weights,
    load_training_state,
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
