"""Run configuration: pydantic v2 models, YAML loading and ``--set section.key=value`` overrides.

Every model forbids unknown keys, so a typo is an error that names the key instead of a silently
ignored setting. ``load_config`` is the one entry point the CLI, the pipeline and the tests use.

The sections' base model and resources field live in :mod:`spice_ray.config_fields`, YAML reading,
overrides and error messages in :mod:`spice_ray.config_io`, credential masking in
:mod:`spice_ray.config_secrets`; their names are importable from here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from spice_ray.config_fields import (  # noqa: F401 - re-exported
    RAY_BUILTIN_RESOURCES,
    CustomResources,
    _resources_field,
    _Section,
)
from spice_ray.config_io import (  # noqa: F401 - re-exported
    MAX_YAML_NODES,
    ConfigError,
    _format_error,
    apply_overrides,
    read_yaml,
)
from spice_ray.config_secrets import (  # noqa: F401 - re-exported
    _SECRET_QUERY,
    _URI_USERINFO,
    REDACTED,
    _strings,
    redact,
)


class CorpusConfig(_Section):
    """Where the instruction corpus comes from and how rows are validated."""

    paths: list[str] = Field(
        default_factory=list,
        description="JSONL/JSON/Parquet files or directories. Empty: the generated demo corpus.",
    )
    format: Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"] = Field(
        "auto", description="Row format; 'auto' detects it per row from the fields present."
    )
    max_tokens: int = Field(1024, gt=0, description="Rows longer than this (tokenized) are quarantined, or truncated (too_long).")
    too_long: Literal["quarantine", "truncate"] = Field(
        "quarantine",
        description="Rows over max_tokens: quarantine them, or keep them truncated to max_tokens (quarantined only "
        "when no response token is left).",
    )
    holdout_validation: float = Field(
        0.0, ge=0, lt=1, description="Share of the records held out as the validation split (by a hash of the uid; stable)."
    )
    holdout_test: float = Field(0.0, ge=0, lt=1, description="Share of the records held out as the test split (same hash).")
    pool_fraction: float = Field(
        1.0, gt=0, le=1, description="Stable random share of the remaining records that forms the pool (the rest is counted as unused)."
    )
    split_seed: int = Field(0, description="Seed of the holdout hash.")
    demo_size: int = Field(600, gt=0, description="Rows in the generated demo corpus.")
    demo_seed: int = Field(0, description="Seed of the generated demo corpus.")

    @model_validator(mode="after")
    def _splits(self) -> CorpusConfig:
        if self.holdout_validation + self.holdout_test >= 1:
            raise ValueError("corpus.holdout_validation + corpus.holdout_test must leave records for the pool (< 1)")
        return self


class LoraConfig(_Section):
    """LoRA adapters of one model."""

    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout in training (sketches run without).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Linear layers that get LoRA adapters (and so gradients).",
    )


_FLAT_LORA = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_target_modules": "target_modules"}


class ModelConfig(_Section):
    """Proxy (sketched) and target (trained) models: 'builtin:tiny-llama', a local path or a hub id,
    each with its own LoRA settings."""

    proxy: str = Field(
        "builtin:tiny-llama-pretrained",
        description="Model whose gradients are sketched: a built-in (builtin:tiny-llama[-pretrained], "
        "builtin:tiny-qwen2[-pretrained]), a local path, an s3:// URI or a hub id.",
    )
    target: str = Field("builtin:tiny-llama-pretrained", description="Model fine-tuned on the selection (same forms).")
    tokenizer: str | None = Field(
        None, description="Tokenizer path or hub id; default: the model's own (built-ins share one)."
    )
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained; off unless asked.")
    init_seed: int = Field(0, description="Seed of the built-in models' random init and LoRA init.")
    proxy_lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="The proxy's LoRA: the adapters whose gradients are sketched (sketch.parameters=lora; "
        "target_modules also names the layers of sketch.parameters=weights) and that a warm-up trains.",
    )
    target_lora: LoraConfig = Field(default_factory=LoraConfig, description="The target's LoRA in fine-tuning (train.lora).")

    @model_validator(mode="before")
    @classmethod
    def _flat_lora(cls, data: Any) -> Any:
        """Configs written before the split (``model.lora_r`` …) set both models' LoRA, with a warning."""
        if not isinstance(data, dict) or not _FLAT_LORA.keys() & data.keys():
            return data
        data = dict(data)
        flat = {new: data.pop(old) for old, new in _FLAT_LORA.items() if old in data}
        for section in ("proxy_lora", "target_lora"):
            if section in data:
                raise ValueError(f"model.{', model.'.join(k for k in _FLAT_LORA if _FLAT_LORA[k] in flat)} and "
                                 f"model.{section} both given: write model.proxy_lora and model.target_lora only")
            data[section] = dict(flat)
        logging.getLogger(__name__).warning(
            "model.lora_* are now model.proxy_lora.* and model.target_lora.*: applied to both (%s)", flat)
        return data


class SketchConfig(_Section):
    """Per-sample gradient sketches of the proxy model."""

    dim: int = Field(256, gt=0, description="Sketch dimension d (split as d = d_out * d_in).")
    seed: int = Field(0, description="Projection seed; the projection is a pure function of it.")
    loss: Literal["response", "all"] = Field("response", description="Tokens the loss is averaged over.")
    method: Literal["auto", "materialize", "factored"] = Field(
        "auto",
        description="Per-layer projection: materialize (per-sample ∇W, then P_out ∇W P_inᵀ), factored "
        "(project δ and x per token, never form ∇W), auto (the cheaper per layer; LoRA: materialize).",
    )
    parameters: Literal["lora", "weights"] = Field(
        "lora",
        description="Sketched parameters: the LoRA adapters, or the full weights of the "
        "model.proxy_lora.target_modules linear layers (no warm-up / optimizer state then).",
    )
    gradient: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd: the loss gradient; adam: one Adam step's update from the checkpoint's moments (LESS)."
    )
    optimizer_state: str | None = Field(
        None,
        description="Checkpoint (Hugging Face optimizer.pt dir/file or DeepSpeed ZeRO-0/1/2) whose trainable "
        "weights and, for gradient=adam, Adam moments are used; a warm-up sets it.",
    )
    warmup_fraction: float = Field(
        0.0, ge=0, le=1, description="Warm-up: fine-tune the proxy's LoRA on this seeded random share of the records "
        "first (train stage settings) and sketch at that checkpoint; 0: off."
    )
    warmup_steps: int | None = Field(None, gt=0, description="Warm-up optimizer steps (None: one epoch over the slice).")
    batch_size: int = Field(
        256, gt=0, description="Records per Ray Data batch handed to a worker (it length-sorts and packs them)."
    )
    max_tokens_per_batch: int | None = Field(
        4096, gt=0, description="Token budget (rows × longest row) of one forward/backward; None: batch_size rows."
    )
    padding: Literal["record", "batch"] = Field(
        "record",
        description="record: each record padded to its own width (a multiple of 8), so its sketch is bit for bit "
        "the same in any batch (CPU); batch: to its sub-batch's longest record, fewer and fuller sub-batches "
        "(2.8× faster on an H200; sketches agree to ~1e-6). GPU jobs use batch.",
    )
    cache_dir: str | None = Field(
        None,
        description="Sketch cache (parquet parts keyed by model, projection and loss spec); None: <run root>/cache/sketches.",
    )
    fidelity_sample: int = Field(
        32, ge=0, description="Records whose sketch inner products are checked against exact gradients (0: off)."
    )
    num_workers: int = Field(1, gt=0, description="Sketch actors (one GPU each when GPUs exist).")
    num_cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per sketch actor (0.5 leaves room for reads).")
    num_gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per sketch actor; None: 1 if the cluster has GPUs, else 0."
    )
    resources: CustomResources = _resources_field("each sketch actor (and the fidelity check)")
    dtype: Literal["float32", "float16"] = Field("float32", description="Stored sketch precision.")

    @model_validator(mode="after")
    def _consistent(self) -> SketchConfig:
        if self.gradient == "adam" and self.optimizer_state is None and self.warmup_fraction == 0:
            raise ValueError("sketch.gradient=adam needs sketch.optimizer_state or sketch.warmup_fraction > 0")
        if self.gradient == "adam" and self.method == "factored":
            raise ValueError("sketch.gradient=adam is elementwise in the per-sample gradient: use method auto or materialize")
        if self.optimizer_state is not None and self.warmup_fraction > 0:
            raise ValueError("set sketch.optimizer_state or sketch.warmup_fraction, not both")
        if self.parameters == "weights" and (self.optimizer_state is not None or self.warmup_fraction > 0):
            raise ValueError("sketch.parameters=weights supports neither a warm-up nor an optimizer_state")
        return self


class SelectConfig(_Section):
    """Greedy selection over the sketches."""

    method: Literal["spice", "logdet", "random", "gradnorm", "longest", "less", "windowed"] = Field(
        "spice",
        description="spice | logdet (λ = 0) | random | gradnorm (top-k ‖g‖) | longest (top-k by loss tokens: no "
        "gradient, the cheap baseline) | less (top-k cosine to `target`) | windowed (SPICE in pools of `pool_size`, as "
        "the paper's code).",
    )
    fraction: float | None = Field(0.1, gt=0, le=1, description="Budget as a fraction of the records (of their loss tokens with budget: tokens).")
    k: int | None = Field(None, gt=0, description="Budget as a count of records (of loss tokens with budget: tokens); overrides fraction when set.")
    budget: Literal["records", "tokens"] = Field(
        "records",
        description="What fraction / k count: records, or loss tokens (what a GPU hour buys). Under tokens spice/logdet run "
        "the per-token and the unit-cost greedy to the budget and keep the larger objective; numpy, one worker; not with "
        "quotas, windowed or omega.",
    )
    alpha: float | Literal["auto"] = Field(
        "auto", description="α in log det(I + α Σ g gᵀ); auto: 1 / median ‖g‖² of the (scaled) sketches, so a typical "
        "candidate's first gain is log 2 whatever the loss scale. The paper: 1.0."
    )
    scale: Literal["none", "unit", "tokens", "sqrt_tokens"] = Field(
        "tokens",
        description="Sketch scaling before selection: tokens (× the record's loss tokens / their mean: the gradient of "
        "the summed token loss; the measured best, benchmarks/RESULTS.md), none (the per-sequence mean-loss gradient, "
        "as the paper), unit (g/‖g‖, as LESS), sqrt_tokens.",
    )
    quota: Literal["none", "source"] = Field(
        "none", description="source: each source gets its share of the budget (largest remainder), picked by the method within it."
    )
    lam: float = Field(0.1, ge=0, description="λ, weight of the conflict penalty (0: plain log-det).")
    omega: float | None = Field(
        None, gt=0, lt=1, description="Early stop at the first step whose gain ≤ ω × first gain."
    )
    seed: int = Field(0, description="Seed of the random baseline and of the windowed pools.")
    target: str | None = Field(
        None,
        description="The target set (a few examples of the task tuned for): a .txt file of pool uids (one per line; "
        "those rows are then never picked, by any method) or the sketches of a target corpus (a sketch stage's "
        "`sketches` dir or parquet, same sketch config). less ranks by cosine to its mean gradient; spice/logdet "
        "with target_pool < 1 select among that share of the rows closest to it.",
    )
    target_pool: float = Field(
        1.0, gt=0, le=1, description="spice/logdet with a target: the share of the rows, closest in gradient direction to "
        "the target's mean, that the greedy chooses from (at least the budget). 1 (measured best): the direction is ignored.",
    )
    pool_size: int | None = Field(None, gt=0, description="windowed: rows per pool (None: 10,000).")
    lazy: bool | None = Field(
        None, description="Lazy greedy (exact; same picks). None: lazy on numpy, eager on a torch device."
    )
    device: str | None = Field(
        None,
        pattern=r"^(numpy|cpu|auto|cuda(:\d+)?)$",
        description="Greedy engine: numpy | cpu | cuda[:i] | auto. None: cuda when the actor has a GPU.",
    )
    shards: int = Field(1, ge=1, description="Shard actors for sketch sets over one machine's memory.")
    checkpoint_every: int = Field(1000, gt=0, description="Checkpoint the greedy's picks every N steps.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs of the selector actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the selector actor.")
    resources: CustomResources = _resources_field("the selector (each shard actor with shards > 1)")

    def max_tokens(self, total: int) -> int:
        """``budget: tokens``: the loss tokens the picks may hold, of ``total`` in the pool."""
        if self.k is not None:
            return min(self.k, total)
        assert self.fraction is not None
        return min(total, round(self.fraction * total))

    def max_records(self, n: int) -> int:
        """The number of records to select out of ``n`` (``budget: records``)."""
        if self.k is not None:
            return min(self.k, n)
        assert self.fraction is not None
        return min(n, max(1, round(self.fraction * n)))

    @model_validator(mode="after")
    def _check(self) -> SelectConfig:
        if isinstance(self.alpha, float) and self.alpha <= 0:
            raise ValueError(f"select.alpha must be > 0 or 'auto', got {self.alpha}")
        if self.k is None and self.fraction is None:
            raise ValueError("set select.fraction or select.k")
        if self.budget == "tokens":
            refused = [name for name, on in (("quota: source", self.quota != "none"), ("method: windowed", self.method == "windowed"),
                                             ("omega", self.omega is not None), (f"device: {self.device}", self.device not in (None, "numpy")))
                       if on]
            if refused:
                raise ValueError(f"select.budget=tokens does not combine with {', '.join(refused)}")
        if self.method == "less" and not self.target:
            raise ValueError("select.method=less needs select.target (a uid list or target sketches)")
        return self


class TrainConfig(_Section):
    """Fine-tuning of the target model on the selection (Ray Train + DeepSpeed).

    Presets: LoRA trains under ZeRO-2 and full fine-tuning under ZeRO-3 (``zero_stage: null``), in
    bf16 on GPU (fp32 on CPU). The effective batch is micro_batch_size × grad_accum × num_workers.
    """

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one GPU each when used); 1 trains with plain torch (train.engine).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per train worker.")
    resources: CustomResources = _resources_field("each train worker")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them.")
    engine: Literal["auto", "torch", "deepspeed"] = Field(
        "auto",
        description="auto: plain torch at one worker without offload (no DeepSpeed op build), DeepSpeed "
        "ZeRO otherwise; torch needs num_workers 1.",
    )
    zero_stage: Literal[2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage; None: 2 with LoRA, 3 for full fine-tuning."
    )
    offload: bool = Field(
        False,
        description="ZeRO-Offload: optimizer states (ZeRO-3: also parameters) in CPU memory, DeepSpeedCPUAdam.",
    )
    lora: bool = Field(True, description="Train LoRA adapters (merged at export) or all weights.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: far less memory, ~1/3 more compute."
    )
    epochs: int = Field(1, gt=0, description="Passes over the selection.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Records per worker per forward/backward.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_length: int | None = Field(
        None, gt=0, description="Truncate training sequences to this many tokens; None: corpus.max_tokens."
    )
    group_by_length: bool = Field(
        True, description="Sort each window of a worker's shard by length, so micro-batches carry little padding."
    )
    length_window: int = Field(64, gt=0, description="Micro-batches per length-sorting window.")
    lr: float = Field(2e-4, gt=0, description="AdamW peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR after the warm-up: cosine or linear decay towards 0, or constant."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the optimizer steps with a linear LR warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    checkpoint_every: int = Field(50, gt=0, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept (the latest); older ones are deleted.")
    max_failures: int = Field(
        0, ge=-1, description="Worker failures to recover from (restart from the latest checkpoint); -1: no limit."
    )
    report_interval_s: float = Field(
        10.0, ge=0, description="Seconds between metric-only reports to Ray Train (checkpoints are always reported)."
    )
    seed: int = Field(0, description="Seed of training (init, data order).")

    @property
    def resolved_zero_stage(self) -> int:
        """The ZeRO stage in use: ``zero_stage``, else 2 with LoRA and 3 for full fine-tuning."""
        if self.zero_stage is not None:
            return self.zero_stage
        return 2 if self.lora else 3

    @model_validator(mode="after")
    def _engine(self) -> TrainConfig:
        if self.engine == "torch" and self.num_workers != 1:
            raise ValueError("train.engine=torch runs one worker: set train.num_workers=1 or engine deepspeed/auto")
        if self.engine == "torch" and self.offload:
            raise ValueError("train.offload needs DeepSpeed: set train.engine=deepspeed or auto")
        return self


class EvalConfig(_Section):
    """Held-out loss and perplexity of the base and the fine-tuned target model."""

    paths: list[str] = Field(
        default_factory=list,
        description="Eval sets, one per file or directory (any corpus format). Empty: a held-out generated demo set "
        "(or the holdout split, below).",
    )
    holdout: Literal["none", "validation", "test"] = Field(
        "none",
        description="Evaluate on the ingest's held-out split (corpus.holdout_*), one set per source plus the overall "
        "token-weighted loss, instead of eval.paths / the demo set.",
    )
    format: Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"] = Field(
        "auto", description="Row format of the eval files."
    )
    max_tokens: int | None = Field(None, gt=0, description="Longer rows are quarantined; None: corpus.max_tokens.")
    demo_size: int = Field(120, gt=0, description="Rows of the generated held-out set (eval.paths empty).")
    demo_seed: int = Field(1, description="Seed of the generated held-out set (differs from corpus.demo_seed).")
    exclude_train_overlap: bool = Field(True, description="Drop eval rows whose uid is in the selection (trained on).")
    base: bool = Field(True, description="Also evaluate the base target model (before fine-tuning).")
    batch_size: int = Field(8, gt=0, description="Records per forward pass.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs of the eval task.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs of the eval task; None: 1 if the cluster has GPUs, else 0.")
    resources: CustomResources = _resources_field("the eval task")


class RunSection(_Section):
    """Where a run lives and which stages it runs."""

    root: str = Field("runs/demo", description="Run root directory (absolute on a multi-node cluster).")
    ray_address: str | None = Field(None, description="Ray address; None: the job's cluster or local.")
    executor: Literal["ray", "local"] = Field(
        "ray",
        description="ray: Ray Data actors, Ray tasks and Ray Train workers (clusters); local: every stage in this "
        "process, no Ray (small inputs, tests; trains with one worker).",
    )
    lease_ttl_s: float = Field(
        120.0, gt=0, description="Seconds without a heartbeat after which another run may take over the run root's lease."
    )
    stages: list[Literal["ingest", "sketch", "select", "train", "eval"]] = Field(
        default_factory=lambda: ["ingest", "sketch", "select", "train", "eval"], description="Stages `run` runs, in order."
    )


class Config(_Section):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sketch: SketchConfig = Field(default_factory=SketchConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> Config:
        for key, value in _strings(self.model_dump(mode="json")):
            if _URI_USERINFO.search(value) or _SECRET_QUERY.search(value):
                raise ValueError(
                    f"{key} holds credentials in a URI ({redact(value)}): give them in the environment "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS), never in the config"
                )
        return self

    @model_validator(mode="after")
    def _executor_fits(self) -> Config:
        if self.run.executor == "local" and self.train.num_workers != 1:
            raise ValueError(f"run.executor=local trains with one worker: set train.num_workers=1 (got {self.train.num_workers})")
        return self

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections' resolved values (all when none are named)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def dump_config(cfg: Config, *, redacted: bool = False) -> str:
    """The resolved config as YAML (what the run root keeps as config.yaml, redacted)."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(redact(data) if redacted else data, sort_keys=False)


def config_reference_markdown() -> str:
    """The config reference table of the README, generated from the models (a test keeps it in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = Config().model_dump(mode="json")

    def add(prefix: str, model: type[BaseModel], values: dict[str, Any]) -> None:
        for key, sub in model.model_fields.items():
            meaning = (sub.description or "").replace("|", "\\|")  # a bare | would split the cell
            if isinstance(sub.annotation, type) and issubclass(sub.annotation, BaseModel):  # a nested section
                rows.append(f"| `{prefix}.{key}.*` | | {meaning} |")
                add(f"{prefix}.{key}", sub.annotation, values[key])
            else:
                rows.append(f"| `{prefix}.{key}` | `{json.dumps(values[key])}` | {meaning} |")

    for section, field in Config.model_fields.items():
        add(section, field.annotation, defaults[section])  # type: ignore[arg-type]
    return "\n".join(rows)


def _update_readme(readme: Path) -> None:
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + config_reference_markdown() + "\n" + end + tail)


if __name__ == "__main__":  # python -m spice_ray.config: refresh the README's config reference
    _update_readme(Path(__file__).resolve().parents[1] / "README.md")
