"""The per-worker train loop: DeepSpeed ZeRO on the selection, under Ray Train or in one plain process.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` runs; ``run_loop(config, session)`` is the
loop itself, with ``session`` the only thing that differs between Ray Train (:class:`RaySession`) and
one process without Ray (:class:`LocalSession`, used by ``benchmarks/train_overhead.py`` to measure
what the Ray Train wrapper costs). ``config`` is a plain dict built by
``spice_ray.train.trainer.loop_config``:

    train          TrainConfig.model_dump()
    model          ModelConfig.model_dump()
    model_path     local directory of the target model (Hugging Face layout)
    tokenizer_path directory of its tokenizer (saved beside the exported model)
    export_dir     where rank 0 writes the final model (Hugging Face format)
    use_gpu        bool, resolved on the driver
    pad_id         the tokenizer's pad id (default: the model config's, else 0)
    total_steps    optimizer steps the LR schedule spans (planned on the driver)
    torch_extensions_dir  optional cache for DeepSpeed's JIT-built C++ ops
    torch_threads  optional torch.set_num_threads (benchmarks)

Data: each worker reads its shard in windows of ``micro_batch_size × length_window`` rows. With
``group_by_length`` a window is sorted by length and cut into micro-batches whose order is then
shuffled (seeded by seed, epoch, rank and window), so a micro-batch holds rows of similar length
(little padding) while the order of lengths stays random. Every rank must run the same number of
micro-batches, or a ZeRO collective waits forever for a rank that has run out of data: Ray Train's
default split (``streaming_split(equal=True)``) gives every rank the same number of rows, and the
loop guards on top of that: before each window the ranks all-reduce (MIN) how many micro-batches
they have, run that many, and count the rest as dropped; a rank whose shard has run out offers 0,
which ends the epoch on every rank. Which rows a rank gets is decided at run time (blocks go to
whichever shard asks), so a resumed run skips as many micro-batches of the interrupted epoch as had
been consumed, not exactly the same rows.

Checkpoints: every ``checkpoint_every`` optimizer steps and at the end, every rank calls
``engine.save_checkpoint`` into its own temporary directory (DeepSpeed writes per-rank ZeRO shards;
rank 0 also writes the module states and ``train_state.json``) and then ``ray.train.report`` with
it; Ray Train merges the ranks' files into one checkpoint directory and keeps the latest
``keep_checkpoints``. With LoRA, frozen base weights are left out (``exclude_frozen_parameters``).
On start, the latest checkpoint of the same ``RunConfig(name, storage_path)`` (``get_checkpoint``:
after a worker failure within one ``fit``, or on a rerun) is loaded and training continues from its
step, with the optimizer, LR schedule and metric history it had.

Metric-only reports: Ray Train V2 holds one unconsumed report per worker and its controller takes
one per health check (every 2 s); a worker that reports faster blocks in ``report``. So the loop
reports metrics without a checkpoint at most every ``report_interval_s`` seconds (rank 0 decides; the
decision rides on the per-step all-reduce of the metrics) and keeps every step in its own history,
which is written to ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spice_ray.config import ModelConfig, TrainConfig
from spice_ray.storage import is_uri, replace_atomically, replace_dir, uri_filesystem

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
DEFAULT_TORCH_EXTENSIONS_DIR = "~/.cache/spice-ray/torch_extensions"


def torch_extensions_dir(configured: str | None = None) -> str:
    """Where DeepSpeed's JIT-built ops are cached: $TORCH_EXTENSIONS_DIR, else the configured
    directory, else ``~/.cache/spice-ray/torch_extensions`` (the first build takes ~40 s)."""
    return os.path.expanduser(os.environ.get("TORCH_EXTENSIONS_DIR") or configured or DEFAULT_TORCH_EXTENSIONS_DIR)


STALE_LOCK_S = 30 * 60  # a JIT build takes minutes; a lock this old was left by a killed build


def clear_stale_extension_locks(root: str, stale_after_s: float = STALE_LOCK_S) -> list[str]:
    """torch's JIT build holds ``<extensions dir>/<op>/lock`` while it compiles; a build killed midway
    leaves it, and every later build waits on it forever without a word. Locks older than
    ``stale_after_s`` are removed with a warning naming them; younger ones are named (a build may be
    running). Returns the removed paths."""
    removed = []
    for lock in Path(root).glob("*/lock"):
        age = time.time() - lock.stat().st_mtime
        if age > stale_after_s:
            logger.warning("removing a stale torch-extension build lock %s (%.0f min old: a killed build left it)", lock, age / 60)
            lock.unlink(missing_ok=True)
            removed.append(str(lock))
        else:
            logger.warning("a torch-extension build lock %s is %.0f s old: waiting for that build (remove the file if no build runs)", lock, age)
    return removed


# ------------------------------------------------------------------------------------------- sessions


class RaySession:
    """The loop's view of a Ray Train worker: rank, data shard, latest checkpoint, report."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._shard = ray.train.get_dataset_shard("train")

    def iter_windows(self, rows: int) -> Iterator[dict[str, Any]]:
        return self._shard.iter_batches(batch_size=rows, batch_format="numpy", prefetch_batches=1)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield path

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """One process without Ray Train: rows from an in-memory table, checkpoints under ``ckpt_root``
    (``checkpoint_000000``, ...). The DeepSpeed engine also needs torch.distributed initialized
    (world size 1, gloo: :func:`local_process_group`); the plain-torch engine needs nothing."""

    def __init__(self, table: Any, ckpt_root: str | Path, keep: int = 2) -> None:
        self.rank, self.world_size = 0, 1
        self.columns = {name: table.column(name).to_pylist() for name in ("input_ids", "labels")}
        self.n_rows = table.num_rows
        self.root = Path(ckpt_root)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    def iter_windows(self, rows: int) -> Iterator[dict[str, Any]]:
        for start in range(0, self.n_rows, rows):
            yield {name: col[start : start + rows] for name, col in self.columns.items()}

    def _checkpoints(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*")) if self.root.exists() else []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = self._checkpoints()
        yield str(found[-1]) if found else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is None:
            return
        found = self._checkpoints()
        index = int(found[-1].name.rsplit("_", 1)[1]) + 1 if found else 0
        tmp = self.root / f".tmp-checkpoint_{index:06d}"  # a crash mid-copy leaves no half checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        replace_atomically(tmp, self.root / f"checkpoint_{index:06d}")
        for old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def local_process_group(rendezvous_file: str | Path) -> Iterator[None]:
    """torch.distributed with gloo at world size 1 in this process (what a ``LocalSession`` needs),
    with the environment DeepSpeed reads (RANK, LOCAL_RANK, WORLD_SIZE); undone on exit. Once per
    process: DeepSpeed caches its process groups, so engines of a later group would fail."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"file://{Path(rendezvous_file).resolve()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------- data


def micro_batches(lengths: list[int], micro_batch_size: int, *, group: bool, rng: random.Random) -> list[list[int]]:
    """Row indices of one window's micro-batches.

    Without grouping: consecutive rows. With grouping: rows sorted by length (stable), cut into
    micro-batches, and the micro-batches' order shuffled with ``rng``. Either way every micro-batch
    but the last holds ``micro_batch_size`` rows, so the count is ceil(rows / micro_batch_size).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if group else list(range(len(lengths)))
    chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group:
        rng.shuffle(chunks)
    return chunks


def padding_fraction(lengths: list[int], chunks: list[list[int]]) -> float:
    """Share of padding tokens when ``chunks`` are right-padded to their longest row."""
    real = sum(lengths)
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks if c)
    return 1.0 - real / padded if padded else 0.0


def _collate(window: dict[str, Any], rows: list[int], pad_id: int, max_length: int | None, device: torch.device) -> dict[str, torch.Tensor]:
    from spice_ray.corpus.tokenize import Encoded, pad_batch

    encodeds = []
    for i in rows:
        ids = [int(t) for t in window["input_ids"][i]][:max_length]
        labels = [int(t) for t in window["labels"][i]][:max_length]
        encodeds.append(Encoded(input_ids=ids, labels=labels, n_tokens=len(ids)))
    padded = pad_batch(encodeds, pad_id)
    return {k: v.to(device) for k, v in padded.items()}


# ------------------------------------------------------------------------------------- collectives


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """All-reduce a few scalars (a no-op at world size 1). float64 on CPU, float32 on GPU (NCCL)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in t.cpu()]


# -------------------------------------------------------------------------------------------- model


def _build_model(mcfg: ModelConfig, tcfg: TrainConfig, model_path: str, dtype: str = "float32"):
    from spice_ray.models import add_lora, load_causal_lm

    model = load_causal_lm(model_path, trust_remote_code=mcfg.trust_remote_code, dtype=dtype)
    if tcfg.gradient_checkpointing:
        # non-reentrant checkpointing: no need for inputs that require grad (frozen embeddings + LoRA)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if tcfg.lora:
        model = add_lora(model, **mcfg.target_lora.model_dump(), seed=mcfg.init_seed)
    return model


def _optimizer(tcfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW; DeepSpeedCPUAdam (AdamW mode) under offload, as ZeRO-Offload requires (JIT-built once)."""
    if tcfg.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)


def _set_schedule(scheduler: Any, schedule: Any) -> None:
    """Put ``schedule`` into a (restored) LambdaLR and set each group's LR for its next step."""
    for i, group in enumerate(scheduler.optimizer.param_groups):
        scheduler.lr_lambdas[i] = schedule
        group["lr"] = scheduler.base_lrs[i] * schedule(scheduler.last_epoch)


# ------------------------------------------------------------------------------------------- export


def publish_dir(local: Path, uri: str) -> None:
    """Copy a finished local directory to a pyarrow-fs URI (files of an older copy are overwritten;
    object stores have no atomic rename, so readers should wait for the stage's completion marker)."""
    import pyarrow.fs as pafs

    fs, path = uri_filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _gathered_trainable_state(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The LoRA adapter weights as CPU fp32 tensors on rank 0 (None elsewhere). Collective."""
    import torch.distributed as dist
    from peft import get_peft_model_state_dict

    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero_stage == 3:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = get_peft_model_state_dict(module) if rank == 0 else None
            state = {k: v.detach().float().cpu().clone() for k, v in state.items()} if state else None
        return state
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}


def export_model(
    engine,
    *,
    tcfg: TrainConfig,
    mcfg: ModelConfig,
    model_path: str,
    tokenizer_path: str,
    export_dir: str,
    dtype: str,
    zero_stage: int | None,
) -> dict[str, Any]:
    """Write the trained model to ``export_dir`` in Hugging Face format (rank 0 writes; collective).

    LoRA: the adapter weights are loaded into a fresh copy of the base model, merged
    (``merge_and_unload``) and saved, so the export holds plain weights in ``dtype``. The merged
    model's logits are compared with the trained (unmerged) module's on a short sample and the max
    abs difference is returned (not under ZeRO-3: elsewhere rank 0 holds the full module).
    ``zero_stage``: the DeepSpeed engine's ZeRO stage; None for the plain-torch engine.
    Full fine-tuning: ZeRO-2 ranks hold full weights, so rank 0 saves its module; under ZeRO-3 the
    16-bit weights are gathered from every rank's shard onto rank 0 first
    (``stage3_gather_16bit_weights_on_model_save``).
    The model is written to a temporary directory beside ``export_dir`` and renamed into place.
    """
    import torch.distributed as dist

    from spice_ray.models import load_tokenizer

    stage = zero_stage or 0
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, Any] = {"export_dir": export_dir}
    if tcfg.lora:
        adapter = _gathered_trainable_state(engine, stage)
        full_state = None
    else:
        adapter = None
        full_state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else None
    if rank != 0:
        return out

    from peft import set_peft_model_state_dict

    remote = is_uri(export_dir)
    if remote:  # write locally, then copy to the pyarrow-fs URI (s3://, gs://, ...)
        tmp = Path(tempfile.mkdtemp(prefix="spice-export-"))
    else:
        dst = Path(export_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o755)
    t0 = time.time()
    if tcfg.lora:
        assert adapter is not None
        plain = tcfg.model_copy(update={"gradient_checkpointing": False})
        peft_model = _build_model(mcfg, plain, model_path, dtype="float32")
        result = set_peft_model_state_dict(peft_model, adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"LoRA export: adapter keys not found in the model: {unexpected[:5]}")
        merged = peft_model.merge_and_unload()
        merged.eval()
        if stage != 3:
            out["export_max_abs_diff"] = _merge_check(engine.module, merged)
        if dtype != "float32":
            merged = merged.to(getattr(torch, dtype))
        merged.save_pretrained(tmp, safe_serialization=True)
    else:
        module = engine.module
        if getattr(module.config, "use_cache", None) is False:
            module.config.use_cache = True  # training switched it off for gradient checkpointing
        module.save_pretrained(tmp, state_dict=full_state, safe_serialization=True)
    load_tokenizer(tokenizer_path, trust_remote_code=mcfg.trust_remote_code).save_pretrained(tmp)
    if remote:
        publish_dir(tmp, export_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        replace_dir(tmp, dst)
    out["export_seconds"] = round(time.time() - t0, 3)
    logger.info("exported the trained model to %s in %.1f s", export_dir, out["export_seconds"])
    return out


@torch.no_grad()
def _merge_check(trained, merged) -> float:
    """Max abs logit difference between the trained module and the merged export on one sample."""
    vocab = merged.config.vocab_size
    ids = (torch.arange(12) * 7 + 3) % vocab
    was_training = trained.training
    trained.eval()
    device = next(trained.parameters()).device
    a = trained(input_ids=ids[None].to(device)).logits.float().cpu()
    b = merged(input_ids=ids[None]).logits.float()
    trained.train(was_training)
    return float((a - b).abs().max())


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"  # ru_maxrss: KiB on Linux


# --------------------------------------------------------------------------------------------- loop


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """What ``TorchTrainer`` runs on each worker (torch.distributed already set up by Ray Train)."""
    logging.basicConfig(level=logging.INFO)
    return run_loop(config, RaySession())


def build_engine(config: dict[str, Any], world_size: int) -> tuple[Any, dict[str, Any]]:
    """The model, optimizer and LR schedule wrapped in the configured engine; and facts about it."""
    from spice_ray.train.deepspeed_config import LRSchedule, deepspeed_config
    from spice_ray.train.engine import TorchEngine, resolved_engine

    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    use_gpu = bool(config["use_gpu"])
    kind = resolved_engine(tcfg)
    if kind == "torch" and world_size != 1:
        raise RuntimeError(f"train.engine=torch runs one worker, not {world_size}")
    dtype = "bfloat16" if use_gpu and kind == "deepspeed" else "float32"
    model = _build_model(mcfg, tcfg, config["model_path"], dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(tcfg, trainable)
    total_steps = int(config.get("total_steps") or tcfg.max_steps or 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler))
    facts = {"engine": kind, "dtype": "bfloat16" if use_gpu else "float32", "total_steps": total_steps,
             "trainable_params": sum(p.numel() for p in trainable), "zero_stage": None,
             "pad_id": config.get("pad_id") if config.get("pad_id") is not None else (model.config.pad_token_id or 0)}
    if kind == "torch":
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        return TorchEngine(model, optimizer, scheduler, tcfg=tcfg, device=device), facts
    clear_stale_extension_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(tcfg, world_size=world_size, use_gpu=use_gpu),
        dist_init_required=False,  # Ray Train's TorchConfig (or the caller) already set up torch.distributed
    )
    facts["zero_stage"] = tcfg.resolved_zero_stage
    return engine, facts


def resume(engine: Any, session: Any, tcfg: TrainConfig, total_steps: int, world_size: int) -> tuple[dict[str, Any], int | None]:
    """The loop state of the session's latest checkpoint, loaded into ``engine`` (a fresh state if none)."""
    from spice_ray.train.deepspeed_config import LRSchedule

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "tokens": 0, "history": []}
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is None:
            return state, None
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        if state.get("world_size", world_size) != world_size:
            raise RuntimeError(
                f"the checkpoint was written by {state['world_size']} workers and this run has {world_size}: "
                "DeepSpeed ZeRO shards cannot be loaded at another world size; keep train.num_workers or "
                "start a fresh run (a new out_dir)"
            )
        load_path, _ = engine.load_checkpoint(
            ckpt_dir, tag=state["tag"], load_module_strict=not tcfg.lora, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"could not load the checkpoint {state['tag']} from {ckpt_dir}")
        if engine.global_steps != state["step"]:
            raise RuntimeError(f"checkpoint step mismatch: engine {engine.global_steps} vs state {state['step']}")
    # the schedule of this run's config (a rerun may have changed max_steps or epochs)
    _set_schedule(engine.lr_scheduler, LRSchedule(total_steps, tcfg.warmup_ratio, tcfg.lr_scheduler))
    return state, int(state["step"])


def run_loop(config: dict[str, Any], session: Any) -> dict[str, Any] | None:
    """One worker's loop. Returns (on rank 0) the metric history, throughput, memory and export info."""
    t_enter = time.time()
    timings: dict[str, float] = {}
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir(config.get("torch_extensions_dir"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tcfg = TrainConfig.model_validate(config["train"])
    mcfg = ModelConfig.model_validate(config["model"])
    if config.get("torch_threads"):  # benchmarks and the local executor pin it
        torch.set_num_threads(int(config["torch_threads"]))
    rank, world_size = session.rank, session.world_size
    torch.manual_seed(tcfg.seed + rank)
    engine, facts = build_engine(config, world_size)
    timings["setup"] = round(time.time() - t_enter, 3)
    logger.info("rank %d: %s engine ready in %.1f s (%d trainable params)", rank, facts["engine"], timings["setup"], facts["trainable_params"])
    device, pad_id, dtype, total_steps = engine.device, facts["pad_id"], facts["dtype"], facts["total_steps"]
    n_trainable = facts["trainable_params"]
    state, resumed_from = resume(engine, session, tcfg, total_steps, world_size)
    if resumed_from is not None:
        logger.info("rank %d: resumed from step %d (epoch %d, batch %d)", rank, state["step"], state["epoch"], state["batches_in_epoch"])

    history: list[dict[str, Any]] = list(state.get("history", []))
    step, epoch, tokens = int(state["step"]), int(state["epoch"]), int(state["tokens"])
    # the position in the interrupted epoch, in micro-batches of this run's size
    skip = math.ceil(int(state["batches_in_epoch"]) * int(state.get("micro_batch_size", tcfg.micro_batch_size)) / tcfg.micro_batch_size)
    last_ckpt_step = step if resumed_from is not None else -1
    metrics: dict[str, Any] = history[-1] if history else {"step": step, "epoch": epoch, "loss": float("nan")}
    pid = os.getpid()

    def save(metrics: dict[str, Any], batches_in_epoch: int) -> None:
        nonlocal last_ckpt_step, last_report
        tag = f"step_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="spice-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=tcfg.lora)
            if rank == 0:
                saved = {
                    "tag": tag,
                    "step": step,
                    "epoch": epoch,
                    "batches_in_epoch": batches_in_epoch,
                    "tokens": tokens,
                    "history": history,
                    "world_size": world_size,
                    "micro_batch_size": tcfg.micro_batch_size,
                }
                (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            session.report({**metrics, "worker_pid": pid}, tmp)
        last_ckpt_step = step
        last_report = time.time()

    def done() -> bool:
        return tcfg.max_steps is not None and step >= tcfg.max_steps

    window_rows = tcfg.micro_batch_size * (tcfg.length_window if tcfg.group_by_length else 1)
    engine.train()
    micro_losses: list[float] = []
    micro_tokens = micro_padded = 0
    dropped_rows = 0
    padded_total = real_total = 0
    t_start = last_report = time.time()
    steady: list[tuple[float, int]] = []  # (time, global tokens) after each of this process's steps
    while epoch < tcfg.epochs and not done():
        consumed = 0  # micro-batches of this epoch run (or skipped on resume), equal on every rank
        windows = iter(session.iter_windows(window_rows))
        exhausted = stopped = False
        w_index = 0
        while not stopped:
            window = None if exhausted else next(windows, None)
            exhausted = window is None
            if exhausted:
                chunks: list[list[int]] = []
            else:
                lengths = [len(x) for x in window["input_ids"]]
                rng = random.Random(f"{tcfg.seed}:{epoch}:{rank}:{w_index}")
                chunks = micro_batches(lengths, tcfg.micro_batch_size, group=tcfg.group_by_length, rng=rng)
            (n_common,) = _all_reduce([len(chunks)], device, op="min")
            n_common = int(n_common)
            dropped_rows += sum(len(c) for c in chunks[n_common:])
            if n_common == 0:
                break
            w_index += 1
            for chunk in chunks[:n_common]:
                consumed += 1
                if consumed <= skip:
                    continue
                inputs = _collate(window, chunk, pad_id, tcfg.max_length, device)
                boundary = engine.is_gradient_accumulation_boundary()
                loss = engine(**inputs).loss
                engine.backward(loss)
                lr_used = float(engine.get_lr()[0])  # engine.step() advances the schedule
                engine.step()
                micro_losses.append(float(loss.detach()))
                n_real = int(inputs["attention_mask"].sum())
                micro_tokens += n_real
                micro_padded += int(inputs["attention_mask"].numel())
                if not boundary:
                    continue
                step = engine.global_steps
                due = 1.0 if rank == 0 and time.time() - last_report >= tcfg.report_interval_s else 0.0
                loss_sum, n, tok, padded, report_due = _all_reduce(
                    [sum(micro_losses), len(micro_losses), micro_tokens, micro_padded, due], device
                )
                tokens += int(tok)
                real_total += int(tok)
                padded_total += int(padded)
                micro_losses, micro_tokens, micro_padded = [], 0, 0
                now = time.time()
                steady.append((now, tokens))
                metrics = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_sum / n,
                    "lr": lr_used,
                    "tokens": tokens,
                    "elapsed_s": round(now - t_start, 3),
                }
                history.append(metrics)
                if rank == 0 and (step == 1 or step % 10 == 0):
                    logger.info("step %d epoch %d loss %.4f lr %.3g", step, epoch, metrics["loss"], metrics["lr"])
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step}")
                if step % tcfg.checkpoint_every == 0:
                    save(metrics, consumed)
                elif report_due > 0:
                    session.report({**metrics, "worker_pid": pid})
                    last_report = time.time()
                if done():
                    stopped = True
                    break
        if stopped:  # left the epoch early (max_steps): keep the position within the epoch
            skip = consumed
            break
        if not exhausted:  # another rank ran out first: read the rest so the next epoch starts clean
            for window in windows:
                dropped_rows += len(window["input_ids"])
        if consumed == 0:
            raise RuntimeError(
                f"epoch {epoch}: a train worker's data shard is empty, so no micro-batch could run on every "
                f"worker ({world_size} workers); use fewer workers or select more records"
            )
        epoch += 1
        skip = 0
    if last_ckpt_step != step:
        save(metrics, skip)
    timings["train"] = round(time.time() - t_enter, 3)
    (dropped_total, padded_sum, real_sum) = _all_reduce([dropped_rows, padded_total, real_total], device)
    if dropped_total:
        logger.warning("rank %d: %d rows were left out so that every rank ran the same micro-batches", rank, int(dropped_total))
    peak_gb, peak_kind = _peak_memory_gb(device)
    (peak_max,) = _all_reduce([peak_gb], device, op="max")

    export = export_model(
        engine,
        tcfg=tcfg,
        mcfg=mcfg,
        model_path=config["model_path"],
        tokenizer_path=config.get("tokenizer_path") or config["model_path"],
        export_dir=config["export_dir"],
        dtype=dtype,
        zero_stage=facts["zero_stage"],
    )
    timings["export"] = round(time.time() - t_enter, 3)
    logger.info("rank %d: seconds since the loop started: %s", rank, timings)
    if rank != 0:
        return None
    # steady-state throughput: from the end of this process's first step to its last
    tokens_per_s = None
    step_seconds = None
    if len(steady) >= 2:
        (t_a, tok_a), (t_b, tok_b) = steady[0], steady[-1]
        tokens_per_s = round((tok_b - tok_a) / max(t_b - t_a, 1e-9), 1)
        step_seconds = round((t_b - t_a) / (len(steady) - 1), 4)
    return {
        "timings": timings,
        "history": history,
        "final": metrics,
        "resumed_from_step": resumed_from,
        "trainable_params": n_trainable,
        "world_size": world_size,
        "zero_stage": facts["zero_stage"],
        "engine": facts["engine"],
        "dtype": dtype,
        "total_steps": total_steps,
        "dropped_rows": int(dropped_total),
        "padding_fraction": round(1.0 - real_sum / padded_sum, 4) if padded_sum else None,
        "tokens_per_s": tokens_per_s,
        "step_seconds": step_seconds,
        "steps_this_process": len(steady),
        "peak_memory_gb": round(peak_max, 3),
        "peak_memory_kind": peak_kind,
        **export,
    }
