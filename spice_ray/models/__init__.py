"""Models: built-in tiny configs and tokenizer, loading from a local path or hub id, LoRA, pre-training.

Attributes are imported on first use, so ``import spice_ray.models`` does not load transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

BUILTIN_PREFIX = "builtin:"


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


_HOME = {
    "materialize_builtin": "builtin",
    "train_tokenizer": "builtin",
    "add_lora": "load",
    "load_causal_lm": "load",
    "load_tokenizer": "load",
    "model_fingerprint": "load",
    "tokenizer_fingerprint": "load",
}
__all__ = sorted([*_HOME, "BUILTIN_PREFIX", "is_builtin"])


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"spice_ray.models.{_HOME[name]}"), name)
