"""Load a causal LM and its tokenizer from a local directory, an object-store URI or a hub id; attach LoRA.

An ``s3://`` / ``gs://`` model directory is downloaded once per node into a local cache
(:func:`spice_ray.storage.ensure_local`); every loader here goes through it.

Weights load through safetensors (``use_safetensors=True``); ``trust_remote_code`` is passed only
as the config says (default off).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spice_ray.storage import ensure_local

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path_or_id: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(ensure_local(path_or_id), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path_or_id: str, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        ensure_local(path_or_id),
        dtype=_DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    return model


def add_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    target_modules: list[str],
    dropout: float = 0.0,
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (the keywords are :class:`spice_ray.config.LoraConfig`'s
    fields, so ``add_lora(model, **cfg.model.target_lora.model_dump(), seed=…)``). The init is seeded, so every worker builds the same
    adapters (LoRA A is random; B starts at zero, so the adapted model equals the base)."""
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def model_fingerprint(path_or_id: str) -> str:
    """sha256 over a model directory's config and weight files (local, or a remote one's cached
    copy); the id itself for a hub id."""
    path = Path(ensure_local(path_or_id))
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(path_or_id.encode())
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        if f.suffix in {".json", ".safetensors"} and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def tokenizer_fingerprint(path_or_id: str) -> str:
    """sha256 over a tokenizer's files (what ingest's token counts depend on); the id for a hub id."""
    path = Path(ensure_local(path_or_id))
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(path_or_id.encode())
        return h.hexdigest()
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
