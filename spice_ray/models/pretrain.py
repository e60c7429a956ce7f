"""Pre-train a causal LM on an instruction corpus, so a proxy has learned something before it is
sketched (a random-init proxy's gradients say little about what a record teaches).

The loop is nanoGPT's: every record rendered with the chat template, concatenated (an end-of-text
token between records), cut into ``block_size``-token blocks, next-token loss on every token, AdamW
with a linear warm-up and cosine decay to 10%, gradient clipping at 1. One thread and a fixed seed,
so the same inputs give the same weights. ``spice-ray pretrain`` runs it on any corpus;
``builtin:tiny-llama-pretrained`` (:mod:`spice_ray.models.builtin`) is the built-in tiny Llama
pre-trained with it on a generated demo corpus.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spice_ray.storage import replace_atomically

logger = logging.getLogger(__name__)


def token_blocks(texts: list[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """The texts tokenized, joined by end-of-text and cut into (n, block_size) blocks (the tail dropped)."""
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 512):
        for row in tokenizer(texts[start : start + 512], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(sep)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{len(ids)} tokens: not one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def pretrain_model(model: Any, blocks: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train every weight of ``model`` on random batches of ``blocks``; the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    losses = []
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pretrain(model_path: str, texts: list[str], out_dir: str | Path, *, steps: int, block_size: int = 128, batch_size: int = 16,
             lr: float = 3e-3, seed: int = 0, trust_remote_code: bool = False) -> dict[str, Any]:
    """Pre-train the model at ``model_path`` (weights and tokenizer) on ``texts``; write it to ``out_dir``
    (Hugging Face layout, safetensors, with ``pretrain.json``: the recipe and the loss curve)."""
    from spice_ray.executor import torch_threads
    from spice_ray.models.load import load_causal_lm, load_tokenizer

    t0 = time.time()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    blocks = token_blocks(texts, tokenizer, block_size)
    with torch_threads(1):
        torch.manual_seed(seed)
        model = load_causal_lm(model_path, trust_remote_code=trust_remote_code)
        losses = pretrain_model(model, blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    log = {"base": model_path, "steps": steps, "block_size": block_size, "batch_size": batch_size, "lr": lr, "seed": seed,
           "blocks": len(blocks), "tokens_seen": steps * batch_size * block_size, "loss_first": losses[0],
           "loss_last": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.time() - t0, 1)}
    (tmp / "pretrain.json").write_text(json.dumps(log | {"losses": losses}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    replace_atomically(tmp, out)
    logger.info("pretrained %s for %d steps: loss %.3f → %.3f (%.0f s)", model_path, steps, log["loss_first"], log["loss_last"], log["seconds"])
    return log
