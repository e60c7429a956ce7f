"""What each stage returns (the ``result`` of its manifest), typed: one ``TypedDict`` per stage.

A result is still a plain dict at run time (it goes into ``manifest.json`` as it is, and is read
back from manifests written by earlier versions), so these add no conversion and change no byte of
a manifest. The required keys are the stage's declared outputs (``Stage.outputs``): the pipeline
refuses a stage that returns without one, and every ``needs`` entry must name one. A stage may
return more keys than it declares (the lower-level summaries it passes on).
"""

from typing import Any, NotRequired, TypedDict


class ModelsResult(TypedDict):
    proxy: str  # the URI every worker loads
    target: str
    tokenizer: str
    proxy_tokenizer: str
    proxy_fingerprint: str
    target_fingerprint: str
    tokenizer_fingerprint: str
    proxy_tokenizer_fingerprint: str
    trust_remote_code: bool


class IngestResult(TypedDict):
    records: str  # the pool's records parquet
    quarantine: str
    holdout: str | None  # the held-out splits' directory; None without a holdout
    n_in: int
    n_kept: int
    n_quarantined: int
    reasons: dict[str, int]
    sources: Any
    files: Any
    files_read: int
    files_reused: int
    max_tokens: int  # corpus.max_tokens capped to the model's context
    n_pool: NotRequired[int]  # with a holdout or pool_fraction < 1
    splits: NotRequired[dict[str, int]]
    split_sources: NotRequired[Any]


class SketchResult(TypedDict):
    sketches: str  # the sketch parquet directory, sorted by uid
    n_records: int
    n_sketches: int
    n_cached: int
    n_computed: int
    compute_seconds: float
    records_per_second: float | None
    seconds: float
    executor: str
    num_workers: int
    num_gpus_per_worker: float
    method: str
    gradient: str
    state: str | None
    spec_hash: str
    cache: str
    projection: dict[str, Any]
    warmup: NotRequired[dict[str, Any]]  # sketch.warmup_fraction > 0
    fidelity: NotRequired[dict[str, Any]]  # sketch.fidelity_sample > 0


class SelectResult(TypedDict):
    selection: str  # selection.parquet
    method: str
    n_candidates: int
    k_requested: int
    k_selected: int
    logdet: float
    mean_conflict: float
    stop_reason: str


class TrainResult(TypedDict):
    model: str  # the exported model (Hugging Face format)
    loss: float | None
    steps: int
    tokens: int
    n_selected: int
    n_train_rows: int
    checkpoint: str | None
    metrics: str
    rows: str
    wall_seconds: float


class EvalResult(TypedDict):
    results_file: str  # results.json
    models: dict[str, str]
    device: str
    dtype: str
    max_tokens: int | None
    sets: dict[str, Any]
    seconds: float


class Upstream(TypedDict, total=False):
    """``StageContext.upstream``: the result of every stage a stage ``needs``."""

    models: ModelsResult
    ingest: IngestResult
    sketch: SketchResult
    select: SelectResult
    train: TrainResult
    eval: EvalResult


def outputs_of(result_type: type) -> tuple[str, ...]:
    """A result type's required keys (a stage's declared outputs), in declaration order."""
    required = result_type.__required_keys__  # type: ignore[attr-defined]
    return tuple(name for name in result_type.__annotations__ if name in required)
