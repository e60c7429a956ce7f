"""SketchWorker: the callable class Ray Data runs on each actor of the sketch pool.

The model, tokenizer, projection (and optimizer state) are built once per actor in ``__init__``;
``__call__`` turns a batch of records (uid, messages) into sketch rows. The Ray Data batch is split
into sub-batches under a token budget (``sketch.max_tokens_per_batch``): the records are ordered by
their token count and packed greedily, so each sub-batch holds records of similar length and its
padded size (rows × width) stays under the budget. Rows come back in the input order. Every record
is padded to a width set by its own length (``padded_width``), and a sub-batch holds one width, so a
record's sketch does not depend on which other records share its batch (bit for bit on CPU).

Nothing here imports Ray: the class is plain Python, so it can be used and tested without a cluster.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from spice_ray.config import ModelConfig, SketchConfig
from spice_ray.corpus.tokenize import Encoded, encode_batch, pad_batch
from spice_ray.models import add_lora, load_causal_lm, load_tokenizer
from spice_ray.sketch.gradients import GradientSketcher, trainable_linears
from spice_ray.sketch.optimizer_state import apply_weights, load_training_state
from spice_ray.storage import ensure_local

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
            ("n_loss_tokens", pa.int32()),
        ]
    )


def token_budget_batches(
    lengths: list[int], max_tokens: int | None, max_rows: int | None = None, *, same_length: bool = False
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into sub-batches: sorted by length (ties by index), packed in
    order while rows × longest ≤ ``max_tokens`` (and rows ≤ ``max_rows``). A row longer than the
    budget gets a sub-batch of its own. ``max_tokens=None``: one sub-batch per ``max_rows`` rows.
    ``same_length``: a sub-batch holds rows of one length only."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max(lengths[i], max((lengths[j] for j in current), default=0))
        over_tokens = max_tokens is not None and longest * (len(current) + 1) > max_tokens
        over_rows = max_rows is not None and len(current) >= max_rows
        new_length = same_length and bool(current) and lengths[current[0]] != lengths[i]
        if current and (over_tokens or over_rows or new_length):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


PAD_MULTIPLE = 8


def padded_width(n_tokens: int) -> int:
    """The width a record is padded to in every sub-batch: its own length rounded up to a multiple of
    ``PAD_MULTIPLE``, whatever its batch mates. The reductions over the sequence (attention, the
    per-sample ∇W = Σ_t δ_t x_tᵀ) then see the same shapes wherever the record lands, so its sketch
    is bit for bit the same for any batching (any worker count, input order, retry after a restart;
    checked on CPU with one intra-op thread, as Ray gives a sketch actor of ≤ 1 CPU). Padding each
    record to its batch's longest one instead changed sketches in the last bits."""
    return -(-max(1, n_tokens) // PAD_MULTIPLE) * PAD_MULTIPLE


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the padded tokens that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def prepare_parameters(model: nn.Module, model_cfg: ModelConfig, sketch_cfg: SketchConfig) -> nn.Module:
    """Make the parameters to sketch trainable: LoRA adapters (``sketch.parameters = "lora"``) or the
    full weights of the ``model.proxy_lora.target_modules`` linear layers ("weights")."""
    if sketch_cfg.parameters == "lora":
        return add_lora(model, **model_cfg.proxy_lora.model_dump(), seed=model_cfg.init_seed)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(model_cfg.proxy_lora.target_modules)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            module.weight.requires_grad_(True)
    return model


def build_model(model_path: str, model_cfg: ModelConfig, sketch_cfg: SketchConfig, device: str) -> nn.Module:
    """The proxy model, with the sketched parameters trainable, on ``device``."""
    model = load_causal_lm(model_path, trust_remote_code=model_cfg.trust_remote_code)
    return prepare_parameters(model, model_cfg, sketch_cfg).to(device)


def layer_shapes(model_path: str, model_cfg: ModelConfig, sketch_cfg: SketchConfig) -> dict[str, tuple[int, int]]:
    """Names and (out, in) shapes of the sketched layers, from the model's config alone: the model is
    built on the meta device, so a driver learns the projection spec without loading any weight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ensure_local(model_path), trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        model = prepare_parameters(model, model_cfg, sketch_cfg)
    return {name: tuple(m.weight.shape) for name, m in trainable_linears(model).items()}


def build_sketcher(
    model_path: str, model_cfg: ModelConfig, sketch_cfg: SketchConfig, device: str, state_path: str | None = None
) -> GradientSketcher:
    """Load the proxy, apply a checkpoint's trainable weights (``state_path``: warm-up or
    ``sketch.optimizer_state``) and wrap it in a GradientSketcher (Adam moments when asked)."""
    model = build_model(model_path, model_cfg, sketch_cfg, device)
    adam = None
    if state_path is not None:
        # only a checkpoint the user named is trusted with pickles; the warm-up's is safetensors
        trusted = sketch_cfg.optimizer_state is not None and state_path == sketch_cfg.optimizer_state
        state = load_training_state(ensure_local(state_path), model, pickles=trusted)
        n = apply_weights(model, state)
        logger.info("loaded %s checkpoint %s (step %d, %d weight tensors)", state.format, state.path, state.step, n)
        if sketch_cfg.gradient == "adam":
            adam = state.moments_for(trainable_linears(model))
    elif sketch_cfg.gradient == "adam":
        raise ValueError("sketch.gradient='adam' needs an optimizer state: set sketch.optimizer_state or a warm-up")
    return GradientSketcher(model, dim=sketch_cfg.dim, seed=sketch_cfg.seed, method=sketch_cfg.method, adam=adam)


def distortion(sketches: np.ndarray, exact: np.ndarray) -> dict:
    """How well sketch inner products track exact ones: ``sketches`` (n, d), ``exact`` (n, D).

    ``norm_ratio``: ‖Pg‖²/‖g‖² per sample; ``pair_error``: |⟨Pg_i,Pg_j⟩ − ⟨g_i,g_j⟩| / (‖g_i‖‖g_j‖)
    over pairs i < j (relative to the norms: a near-orthogonal pair has a tiny inner product, and
    its plain relative error says nothing); ``pearson_inner`` / ``pearson_cosine``: correlation of
    the exact and sketched inner products / cosines over the pairs. Zero gradients are left out.
    """
    s = sketches.astype(np.float64)
    g = exact.astype(np.float64)
    e_gram = g @ g.T
    s_gram = s @ s.T
    e_sq = np.diag(e_gram)
    keep = e_sq > 0
    out: dict = {"n": int(len(s)), "n_zero_gradient": int((~keep).sum()), "d": int(s.shape[1]), "D": int(g.shape[1])}
    if keep.sum() < 2:
        return out
    e_gram, s_gram, e_sq = e_gram[np.ix_(keep, keep)], s_gram[np.ix_(keep, keep)], e_sq[keep]
    ratio = np.diag(s_gram) / e_sq
    iu = np.triu_indices(len(e_sq), k=1)
    scale = np.sqrt(np.outer(e_sq, e_sq))[iu]
    e_ij, s_ij = e_gram[iu], s_gram[iu]
    s_sq = np.diag(s_gram)
    e_cos = e_ij / scale
    s_cos = s_ij / np.sqrt(np.outer(s_sq, s_sq))[iu]
    err = np.abs(s_ij - e_ij) / scale

    def r(a: np.ndarray, b: np.ndarray) -> float | None:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None

    out.update(
        norm_ratio_median=float(np.median(ratio)),
        norm_ratio_rel_error_median=float(np.median(np.abs(ratio - 1))),
        norm_ratio_rel_error_max=float(np.max(np.abs(ratio - 1))),
        pair_error_median=float(np.median(err)),
        pair_error_max=float(np.max(err)),
        pearson_inner=r(e_ij, s_ij),
        pearson_cosine=r(e_cos, s_cos),
    )
    return out


class SketchWorker:
    """Callable class for ``Dataset.map_batches(..., batch_format="pyarrow")``."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str,
        model_cfg: dict,
        sketch_cfg: dict,
        max_tokens: int,
        state_path: str | None = None,
        expected_projection: str | None = None,
    ):
        self.model_cfg = ModelConfig(**model_cfg)
        self.sketch_cfg = SketchConfig(**sketch_cfg)
        self.max_tokens = max_tokens
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=self.model_cfg.trust_remote_code)
        self.sketcher = build_sketcher(model_path, self.model_cfg, self.sketch_cfg, self.device, state_path)
        spec = self.sketcher.projection.spec
        if expected_projection is not None and spec.digest() != expected_projection:
            raise RuntimeError(f"the worker's projection {spec.digest()[:12]} differs from the driver's {expected_projection[:12]}")
        self.schema = sketch_schema(self.sketch_cfg.dim, self.sketch_cfg.dtype)
        self.stats = {"records": 0, "tokens": 0, "padded_tokens": 0, "sub_batches": 0, "seconds": 0.0}
        logger.info("sketch worker ready on %s: %d layers, d=%d", self.device, len(self.sketcher.layers), self.sketch_cfg.dim)

    def _encode(self, batch: pa.Table) -> list[Encoded]:
        return encode_batch(
            self.tokenizer, batch.column("messages").to_pylist(), max_tokens=self.max_tokens, loss_on=self.sketch_cfg.loss
        )

    def _sketch(self, encoded: list[Encoded], exact: bool = False):
        """Yield (indices, SketchBatch) per token-budget sub-batch.

        ``sketch.padding``: ``record`` pads every record to its own width, whatever its batch mates
        (see :func:`padded_width`), so one sub-batch holds one width; ``batch`` packs by length and
        pads to each sub-batch's longest record."""
        lengths = [e.n_tokens for e in encoded]
        budget = self.sketch_cfg.max_tokens_per_batch
        if self.sketch_cfg.padding == "record":
            widths = [padded_width(n) for n in lengths]
            batches = [(idx, widths[idx[0]]) for idx in token_budget_batches(widths, budget, same_length=True)]
        else:
            batches = [(idx, None) for idx in token_budget_batches(lengths, budget)]
        for idx, width in batches:
            t0 = time.perf_counter()
            padded = pad_batch([encoded[i] for i in idx], self.tokenizer.pad_token_id, width=width)
            # right padding + a causal LM: no attention mask needed (see gradients.py)
            out = self.sketcher(padded["input_ids"].to(self.device), padded["labels"].to(self.device), exact=exact)
            self.stats["records"] += len(idx)
            self.stats["tokens"] += sum(lengths[i] for i in idx)
            self.stats["padded_tokens"] += padded["input_ids"].numel()
            self.stats["sub_batches"] += 1
            self.stats["seconds"] += time.perf_counter() - t0
            yield idx, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        uids = batch.column("uid").to_pylist()
        encoded = self._encode(batch)
        n, d = len(uids), self.sketch_cfg.dim
        sketch = np.zeros((n, d), np.float32)
        loss = np.zeros(n, np.float32)
        norm = np.zeros(n, np.float32)
        for idx, out in self._sketch(encoded):
            sketch[idx] = out.sketch.cpu().numpy()
            loss[idx] = out.loss.float().cpu().numpy()
            norm[idx] = out.grad_norm.cpu().numpy()
        np_dtype = np.float16 if self.sketch_cfg.dtype == "float16" else np.float32
        value_type = self.schema.field("sketch").type
        return pa.table(
            {
                "uid": pa.array(uids, pa.string()),
                "sketch": pa.FixedSizeListArray.from_arrays(pa.array(sketch.astype(np_dtype).reshape(-1)), value_type.list_size),
                "loss": pa.array(loss, pa.float32()),
                "grad_norm": pa.array(norm, pa.float32()),
                "n_tokens": pa.array([e.n_tokens for e in encoded], pa.int32()),
                "n_loss_tokens": pa.array([e.n_loss_tokens for e in encoded], pa.int32()),
            },
            schema=self.schema,
        )

    def fidelity(self, batch: pa.Table) -> dict:
        """Sketches against the exact per-sample vectors they project, on ``batch`` (a small sample):
        one forward/backward per sub-batch gives both; see :func:`distortion`."""
        encoded = self._encode(batch)
        names = sorted(self.sketcher.layers)
        n = len(encoded)
        sketches = np.zeros((n, self.sketch_cfg.dim), np.float64)
        flat = [None] * n
        for idx, out in self._sketch(encoded, exact=True):
            assert out.exact is not None
            rows = torch.cat([out.exact[k].reshape(len(idx), -1) for k in names], dim=1).double().cpu().numpy()
            sketches[idx] = out.sketch.double().cpu().numpy()
            for j, i in enumerate(idx):
                flat[i] = rows[j]
        report = distortion(sketches, np.stack(flat))
        report["uids"] = int(n)
        return report
