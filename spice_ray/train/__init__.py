"""Train stage: fine-tune the target model on the selection (plain torch at one worker, DeepSpeed ZeRO on several).

``run_train_stage`` (driver side) is imported lazily so that importing this package starts
nothing heavy (no Ray, DeepSpeed or torch import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spice_ray.train.trainer import run_train_stage

__all__ = ["run_train_stage"]


def __getattr__(name: str) -> Any:
    if name == "run_train_stage":
        from spice_ray.train.trainer import run_train_stage

        return run_train_stage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
