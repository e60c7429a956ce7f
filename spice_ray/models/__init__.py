"""Models: built-in tiny configs and tokenizer, loading from a local path or hub id, LoRA."""

from spice_ray.models.builtin import BUILTIN_PREFIX, is_builtin, materialize_builtin, train_tokenizer
from spice_ray.models.load import add_lora, load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint

__all__ = [
    "BUILTIN_PREFIX",
    "add_lora",
    "is_builtin",
    "load_causal_lm",
    "load_tokenizer",
    "materialize_builtin",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
