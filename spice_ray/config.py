"""Run configuration: pydantic v2 models, YAML loading and ``--set section.key=value`` overrides.

Every model forbids unknown keys, so a typo is an error that names the key instead of a silently
ignored setting. ``load_config`` is the one entry point the CLI, the pipeline and the tests use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message fit to show a user as is (no traceback)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Section):
    """Where the instruction corpus comes from and how rows are validated."""

    paths: list[str] = Field(
        default_factory=list,
        description="JSONL/JSON/Parquet files or directories. Empty: the generated demo corpus.",
    )
    format: Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"] = Field(
        "auto", description="Row format; 'auto' detects it per row from the fields present."
    )
    max_tokens: int = Field(1024, gt=0, description="Rows longer than this (tokenized) are quarantined.")
    demo_size: int = Field(600, gt=0, description="Rows in the generated demo corpus.")
    demo_seed: int = Field(0, description="Seed of the generated demo corpus.")


class ModelConfig(_Section):
    """Proxy (sketched) and target (trained) models: 'builtin:tiny-llama', a local path or a hub id."""

    proxy: str = Field("builtin:tiny-llama", description="Model whose gradients are sketched.")
    target: str = Field("builtin:tiny-llama", description="Model fine-tuned on the selection.")
    tokenizer: str | None = Field(
        None, description="Tokenizer path or hub id; default: the model's own (built-ins share one)."
    )
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained; off unless asked.")
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout in training (sketches run without).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Linear layers that get LoRA adapters (and so gradients).",
    )
    init_seed: int = Field(0, description="Seed of the built-in models' random init and LoRA init.")


class SketchConfig(_Section):
    """Per-sample gradient sketches of the proxy model."""

    dim: int = Field(256, gt=0, description="Sketch dimension d (split as d = d_out * d_in).")
    seed: int = Field(0, description="Projection seed; the projection is a pure function of it.")
    loss: Literal["response", "all"] = Field("response", description="Tokens the loss is averaged over.")
    batch_size: int = Field(8, gt=0, description="Records per forward/backward.")
    num_workers: int = Field(1, gt=0, description="Sketch actors (one GPU each when GPUs exist).")
    num_cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per sketch actor (0.5 leaves room for reads).")
    num_gpus_per_worker: float | None = Field(
        None, ge=0, description="GPUs per sketch actor; None: 1 if the cluster has GPUs, else 0."
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="Stored sketch precision.")


class SelectConfig(_Section):
    """Greedy selection over the sketches."""

    method: Literal["spice", "logdet", "random", "gradnorm"] = Field(
        "spice", description="spice | logdet (λ = 0) | random | gradnorm (top-k ‖g‖)."
    )
    fraction: float | None = Field(0.1, gt=0, le=1, description="Budget as a fraction of the records.")
    k: int | None = Field(None, gt=0, description="Budget as a count; overrides fraction when set.")
    alpha: float = Field(1.0, gt=0, description="α in log det(I + α Σ g gᵀ).")
    lam: float = Field(0.1, ge=0, description="λ, weight of the conflict penalty (0: plain log-det).")
    omega: float | None = Field(
        None, gt=0, lt=1, description="Early stop at the first step whose gain ≤ ω × first gain."
    )
    seed: int = Field(0, description="Seed of the random baseline.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs of the selector actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the selector actor.")

    def budget(self, n: int) -> int:
        """The number of records to select out of ``n``."""
        if self.k is not None:
            return min(self.k, n)
        assert self.fraction is not None
        return min(n, max(1, round(self.fraction * n)))

    @model_validator(mode="after")
    def _one_budget(self) -> SelectConfig:
        if self.k is None and self.fraction is None:
            raise ValueError("set select.fraction or select.k")
        return self


class TrainConfig(_Section):
    """Fine-tuning of the target model on the selection (Ray Train + DeepSpeed)."""

    num_workers: int = Field(2, gt=0, description="Ray Train workers (one GPU each when used).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per train worker.")
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lora: bool = Field(True, description="Train LoRA adapters (merged at export) or all weights.")
    epochs: int = Field(1, gt=0, description="Passes over the selection.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Records per worker per forward/backward.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    checkpoint_every: int = Field(50, gt=0, description="Optimizer steps between checkpoints.")
    seed: int = Field(0, description="Seed of training (init, data order).")


class RunSection(_Section):
    """Where a run lives and which stages it runs."""

    root: str = Field("runs/demo", description="Run root directory (absolute on a multi-node cluster).")
    ray_address: str | None = Field(None, description="Ray address; None: the job's cluster or local.")
    stages: list[Literal["ingest", "sketch", "select", "train"]] = Field(
        default_factory=lambda: ["ingest", "sketch", "select", "train"], description="Stages `run` runs, in order."
    )


class Config(_Section):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sketch: SketchConfig = Field(default_factory=SketchConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunSection = Field(default_factory=RunSection)

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections' resolved values (all when none are named)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def _parse_scalar(text: str) -> Any:
    """A --set value as YAML would read it: numbers, booleans, null, lists, else a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {key} is not a section")
            node = child
        node[keys[-1]] = _parse_scalar(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what the run root keeps as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference_markdown() -> str:
    """The config reference table of the README, generated from the models (a test keeps it in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = Config().model_dump(mode="json")
    for section, field in Config.model_fields.items():
        model = field.annotation
        for key, sub in model.model_fields.items():  # type: ignore[union-attr]
            default = json.dumps(defaults[section][key])
            rows.append(f"| `{section}.{key}` | `{default}` | {sub.description or ''} |")
    return "\n".join(rows)


def _update_readme(readme: Path) -> None:
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + config_reference_markdown() + "\n" + end + tail)


if __name__ == "__main__":  # python -m spice_ray.config: refresh the README's config reference
    _update_readme(Path(__file__).resolve().parents[1] / "README.md")
