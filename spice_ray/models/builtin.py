"""Built-in tiny models and a BPE tokenizer trained on the fly, so nothing is downloaded.

A built-in is named ``builtin:tiny-llama`` or ``builtin:tiny-qwen2`` (random weights), or
``builtin:tiny-llama-pretrained`` / ``builtin:tiny-qwen2-pretrained``: the same model pre-trained by
:func:`spice_ray.models.pretrain.pretrain` on a generated demo corpus of another seed than the demo's
pool and eval set, cached per node. ``materialize_builtin`` writes it once, in Hugging Face layout
(config.json, model.safetensors, tokenizer files), into a directory of the run root; every later
stage and every Ray worker loads that directory through the same code path as a real checkpoint, so
all of them see identical weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from spice_ray.models import BUILTIN_PREFIX, is_builtin  # noqa: F401  (re-exported)
from spice_ray.storage import publish_once

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2 uses: the built-in tokenizer exercises the chat-template path.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# hidden 64, 2 layers: small enough for a CPU test in seconds, the real architectures all the same.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
BUILTIN_CONFIGS = {
    "tiny-llama": (LlamaConfig, LlamaForCausalLM),
    "tiny-qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown tokens) with a ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tokenizer_texts() -> list[str]:
    # The built-in tokenizer is trained on the demo corpus with a fixed seed, so it never depends
    # on the user's corpus and the built-in model's fingerprint is stable across runs.
    from spice_ray.corpus.demo import generate_demo_corpus

    def strings(node: object) -> Iterable[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    return [text for row in generate_demo_corpus(n=600, seed=0) for text in strings(row)]


PRETRAINED = "-pretrained"
# How ``builtin:<base>-pretrained`` is pre-trained (:func:`spice_ray.models.pretrain.pretrain`); part
# of its cache key.
DEMO_PRETRAIN = {"rows": 3000, "seed": 7, "steps": 300, "block_size": 128, "batch_size": 16, "lr": 3e-3}


def materialize_builtin(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write built-in model ``name`` ('builtin:tiny-llama', 'tiny-llama', 'tiny-llama-pretrained', ...)
    to ``out_dir`` (written whole under a temporary name of its own, then renamed)."""
    key = name.removeprefix(BUILTIN_PREFIX)
    base = key.removesuffix(PRETRAINED)
    if base not in BUILTIN_CONFIGS:
        known = sorted([*BUILTIN_CONFIGS, *(k + PRETRAINED for k in BUILTIN_CONFIGS)])
        raise ValueError(f"unknown built-in model {name!r}; known: {known}")
    if key != base:
        return materialize_pretrained_builtin(base, out_dir, seed=seed)
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    config_cls, model_cls = BUILTIN_CONFIGS[base]
    tokenizer = train_tokenizer(_tokenizer_texts())
    config = config_cls(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **_TINY,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # unique per writer
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    publish_once(tmp, out)  # unless another writer finished first: theirs is the same model
    return out


def demo_texts(tokenizer: Any, rows: int, seed: int) -> list[str]:
    """Generated demo records (another seed than the demo's pool and eval set), rendered as chats."""
    from spice_ray.corpus.demo import generate_demo_corpus
    from spice_ray.corpus.formats import normalize_row
    from spice_ray.corpus.tokenize import render_text

    return [render_text(tokenizer, normalize_row(row)) for row in generate_demo_corpus(n=rows, seed=seed)]


def materialize_pretrained_builtin(base: str, out_dir: str | Path, seed: int = 0) -> Path:
    """``builtin:<base>-pretrained``: the built-in pre-trained on the demo recipe, cached per node
    under ``$SPICE_CACHE/builtin`` and copied to ``out_dir``."""
    from spice_ray.models.load import load_tokenizer
    from spice_ray.models.pretrain import pretrain

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    recipe = hashlib.sha256(json.dumps({"base": base, "init_seed": seed, **DEMO_PRETRAIN}, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SPICE_CACHE", Path.home() / ".cache" / "spice-ray")) / "builtin" / f"{base}-pretrained-{recipe}"
    if not (cache / "model.safetensors").exists():
        with tempfile.TemporaryDirectory(prefix="spice-builtin-") as tmp:
            init = materialize_builtin(base, Path(tmp) / base, seed=seed)
            texts = demo_texts(load_tokenizer(str(init)), DEMO_PRETRAIN["rows"], DEMO_PRETRAIN["seed"])
            pretrain(str(init), texts, cache, steps=DEMO_PRETRAIN["steps"], block_size=DEMO_PRETRAIN["block_size"],
                     batch_size=DEMO_PRETRAIN["batch_size"], lr=DEMO_PRETRAIN["lr"], seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    shutil.copytree(cache, tmp_out, dirs_exist_ok=True)
    publish_once(tmp_out, out)  # unless another writer finished first
    return out
