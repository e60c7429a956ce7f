"""SketchWorker: the callable class Ray Data runs on each actor of the sketch pool.

The model, tokenizer and projection are built once per actor in ``__init__``; ``__call__`` turns a
batch of records (uid, messages) into sketch rows. Nothing here imports Ray: the class is plain
Python, so it can be used and tested without a cluster.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from spice_ray.config import ModelConfig, SketchConfig
from spice_ray.corpus.tokenize import encode_batch, pad_batch
from spice_ray.models import add_lora, load_causal_lm, load_tokenizer
from spice_ray.sketch.gradients import GradientSketcher

logger = logging.getLogger(__name__)


def sketch_schema(dim: int, dtype: str) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("uid", pa.string()),
            ("sketch", pa.list_(value, dim)),
            ("loss", pa.float32()),
            ("grad_norm", pa.float32()),
            ("n_tokens", pa.int32()),
        ]
    )


def build_sketcher(model_path: str, model_cfg: ModelConfig, sketch_cfg: SketchConfig, device: str):
    """Load the proxy model with LoRA adapters and wrap it in a GradientSketcher."""
    model = load_causal_lm(model_path, trust_remote_code=model_cfg.trust_remote_code)
    model = add_lora(
        model,
        r=model_cfg.lora_r,
        alpha=model_cfg.lora_alpha,
        target_modules=model_cfg.lora_target_modules,
        dropout=model_cfg.lora_dropout,
        seed=model_cfg.init_seed,
    ).to(device)
    return GradientSketcher(model, dim=sketch_cfg.dim, seed=sketch_cfg.seed)


class SketchWorker:
    """Callable class for ``Dataset.map_batches(..., batch_format="pyarrow")``."""

    def __init__(self, model_path: str, tokenizer_path: str, model_cfg: dict, sketch_cfg: dict, max_tokens: int):
        self.model_cfg = ModelConfig(**model_cfg)
        self.sketch_cfg = SketchConfig(**sketch_cfg)
        self.max_tokens = max_tokens
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=self.model_cfg.trust_remote_code)
        self.sketcher = build_sketcher(model_path, self.model_cfg, self.sketch_cfg, self.device)
        self.schema = sketch_schema(self.sketch_cfg.dim, self.sketch_cfg.dtype)
        logger.info("sketch worker ready on %s: %d layers, d=%d", self.device, len(self.sketcher.layers), self.sketch_cfg.dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        uids = batch.column("uid").to_pylist()
        encoded = encode_batch(
            self.tokenizer, batch.column("messages").to_pylist(), max_tokens=self.max_tokens, loss_on=self.sketch_cfg.loss
        )
        tensors = {k: v.to(self.device) for k, v in pad_batch(encoded, self.tokenizer.pad_token_id).items()}
        out = self.sketcher(tensors["input_ids"], tensors["labels"], tensors["attention_mask"])
        np_dtype = np.float16 if self.sketch_cfg.dtype == "float16" else np.float32
        sketch = out.sketch.cpu().numpy().astype(np_dtype)
        value_type = self.schema.field("sketch").type
        return pa.table(
            {
                "uid": pa.array(uids, pa.string()),
                "sketch": pa.FixedSizeListArray.from_arrays(pa.array(sketch.reshape(-1)), value_type.list_size),
                "loss": pa.array(out.loss.cpu().numpy(), pa.float32()),
                "grad_norm": pa.array(out.grad_norm.cpu().numpy(), pa.float32()),
                "n_tokens": pa.array([e.n_tokens for e in encoded], pa.int32()),
            },
            schema=self.schema,
        )
