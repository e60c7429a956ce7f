"""One prepared GPU suite: the train stage (Ray Train + DeepSpeed) at Qwen2 shapes, the sketch stage's
worker at its production batch and the selection at N = 1M, on one GPU in one run; one table.

    bash benchmarks/gpu_suite.sh                      # on the GPU machine (benchmarks/README.md)
    python benchmarks/gpu_suite.py --dry-run          # the same code paths on CPU, tiny shapes
    python benchmarks/gpu_suite.py --rows sketch,select,picks --out /tmp/suite
    python benchmarks/gpu_suite.py --report-only      # print the table of the last run's JSON again

Rows (``--rows``, in this order; every model is random-init from a ``Qwen2Config``, no download):

``lora7b``    the train stage (``run_train_stage`` on the Ray executor: Ray Train, DeepSpeed ZeRO-2,
              ``train.engine: deepspeed``, one worker, ``use_gpu``) on a Qwen2-7B shape, LoRA r16 on
              q/k/v/o, bf16, sequence 2048, micro-batch 4, gradient checkpointing, 20 steps. After the
              checkpoint at step 10 the product's fault drill (``KillWorkerAfterCheckpoint``) SIGKILLs
              the worker and Ray Train restarts it from that checkpoint: one resume, one export.
              Tokens/s, MFU, peak GPU memory. Goal: MFU ≥ 45%.
``full1p5b``  ZeRO-3 full fine-tuning of a Qwen2-1.5B shape, otherwise the same (no kill).
``sketch``    ``SketchWorker`` (the sketch stage's Ray Data worker, called here in-process) on a
              Qwen2-0.5B shape: LoRA r16, d = 8192, ``padding: batch``, 1,024 records in one call, an
              8,192-token budget (``jobs/qwen2_7b.yaml``); samples/s of the whole call (tokenizing
              included) against a plain forward + backward on the same sub-batches and the LESS-style
              loop (batch 1, dense P) on every 8th record — the measuring code of
              ``sketch_throughput.py``. Goals: ≥ 30× the LESS-style loop, ≤ 1.3× a training step.
``select``    ``select(N = 1M, d = 256, k = 100k, λ = 0.1, device="cuda", lazy=False)`` (the block
              engine) on ``select_scaling.sketch_like`` rows: wall time. Goal: ≤ 30 s.
``picks``     the same on the first 100k rows (k = 10k) against the numpy engine: identical picks.

MFU = tokens/s × c × N / (peak × GPUs): N the model's parameters, c = 4 for LoRA (forward 2N, backward
2N for the activation gradients; the frozen weights get no weight gradient) and 6 for full
fine-tuning; the recompute of gradient checkpointing and the attention's T² FLOPs are not counted;
peak = 989 TFLOP/s (H200 dense bf16, ``--peak-tflops``). Tokens/s: real tokens per second over the
longest run of steps in one worker process, from the end of its first step to the end of its last.

Train inputs: records of random five-letter words, each at least the sequence length in tokens, so
every row is truncated to exactly the sequence length (no padding). Sketch records: ../shared/data
(``SPICE_SHARED``) when present, else the generated demo corpus (short records, ~36 tokens: carry a
sample of the real one, benchmarks/README.md); the tokenizer is a byte-level BPE trained on them
(4,096 tokens), so the token counts are not Qwen's.

Outputs under ``--out`` (default ``$OUT``, else ``build/gpu_suite/``): ``gpu_suite.md`` (the table)
and ``gpu_suite.json`` (every figure), rewritten after each row. Models, records and checkpoints go
to ``--work`` (default ``<tmp>/spice-gpu-suite``; each row's part is deleted after it; a train row
first checks the disk it will need: ~31 GB for the 7B row, ~49 GB for the ZeRO-3 row). ``--dry-run``: tiny shapes (hidden 64, 2 layers, vocab 1024, sequence 64, 8 steps,
N = 2,000, d = 32), ``use_gpu: false``, DeepSpeed on CPU (its first use JIT-builds a C++ op into
``TORCH_EXTENSIONS_DIR``), the CPU torch block engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Before Ray is imported: a local Ray, quiet, on loopback; its workers import this working tree.
for _key, _value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                     "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/spice-ray/torch_extensions"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import select_scaling as sl  # noqa: E402
import sketch_throughput as st  # noqa: E402
import torch  # noqa: E402

from spice_ray.select import select  # noqa: E402

ROWS = ("lora7b", "full1p5b", "sketch", "select", "picks")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": LORA_TARGETS}
MODEL_SECTION = {"proxy_lora": LORA, "target_lora": LORA}


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool

    def describe(self) -> str:
        return f"{self.name} shape (hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads, vocab {self.vocab})"


QWEN2_7B = Shape("Qwen2-7B", 3584, 28, 28, 4, 18944, 152064, False)
QWEN2_1_5B = Shape("Qwen2-1.5B", 1536, 28, 12, 2, 8960, 151936, True)
QWEN2_0_5B = Shape("Qwen2-0.5B", 896, 24, 14, 2, 4864, 151936, True)
TINY = Shape("tiny", 64, 2, 4, 2, 128, 1024, False)


@dataclass(frozen=True)
class Plan:
    """Every size of a run: the GPU suite's, or the dry run's (``DRY``)."""

    dry_run: bool = False
    lora_shape: Shape = QWEN2_7B
    full_shape: Shape = QWEN2_1_5B
    proxy_shape: Shape = QWEN2_0_5B
    seq: int = 2048
    micro_batch: int = 4
    steps: int = 20
    checkpoint_at: int = 10
    cpus_per_worker: float = 8.0
    sketch_records: int = 1024
    sketch_budget: int = 8192
    sketch_dim: int = 8192
    less_records: int = 128
    rounds: int = 2
    tokenizer_vocab: int = 4096
    select_n: int = 1_000_000
    select_d: int = 256
    select_k: int = 100_000
    check_n: int = 100_000
    check_k: int = 10_000
    lam: float = 0.1
    peak_tflops: float = 989.0
    gpus: int = 1

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


DRY = Plan(dry_run=True, lora_shape=replace(TINY, name="tiny (dry run)"), full_shape=replace(TINY, name="tiny (dry run)"),
           proxy_shape=replace(TINY, name="tiny (dry run)"), seq=64, micro_batch=2, steps=8, checkpoint_at=4,
           cpus_per_worker=1.0, sketch_records=64, sketch_budget=1024, sketch_dim=256, less_records=8, rounds=2,
           tokenizer_vocab=1024, select_n=2_000, select_d=32, select_k=200, check_n=1_000, check_k=100)


def formula(plan: Plan) -> str:
    return (f"MFU = tokens/s × c × N / ({plan.peak_tflops:g} TFLOP/s × {plan.gpus} GPU): N = the model's parameters, "
            "c = 4 for LoRA (forward 2N + backward 2N for the activation gradients; the frozen weights get no weight "
            "gradient), 6 for full fine-tuning; gradient checkpointing's recompute and attention's T² FLOPs not counted. "
            "Tokens/s: real tokens over the longest run of steps in one worker process (end of its first step to end of its last).")


# ------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str
    label: str = ""
    setup: str = ""
    measured: str = "not run"
    goal: str = "—"
    verdict: str = "—"
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    plan: Plan
    work: Path
    tok_dir: Path
    verbose: bool
    cache: dict[str, Any] = field(default_factory=dict)

    def executor(self) -> Any:
        if "executor" not in self.cache:
            self.cache["executor"] = start_ray(self.plan, self.verbose)
        return self.cache["executor"]


def start_ray(plan: Plan, verbose: bool) -> Any:
    """A local Ray of its own (never a running cluster) on 127.0.0.1, every CPU and GPU of the machine."""
    import ray

    from spice_ray.ray_executor import RayExecutor

    gpus = 0 if plan.dry_run else torch.cuda.device_count()
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=gpus, include_dashboard=False,
             object_store_memory=(512 if plan.dry_run else 4096) * 2**20, _node_ip_address="127.0.0.1",
             logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return RayExecutor(verbose=verbose)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    st.sync()
    t0 = time.perf_counter()
    out = fn()
    st.sync()
    return time.perf_counter() - t0, out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------------------ models and inputs


def make_tokenizer(suite: Suite) -> None:
    """A byte-level BPE trained on the sketch records' texts, saved to ``suite.tok_dir``; the chats are kept."""
    from spice_ray.models import train_tokenizer

    n = suite.plan.sketch_records
    chats, source = st.load_chats(n, seed=0)
    texts = [m["content"] for chat in chats[: 20 * n] for m in chat]
    tokenizer = train_tokenizer(texts, vocab_size=suite.plan.tokenizer_vocab)
    tokenizer.save_pretrained(suite.tok_dir)
    suite.cache.update(tokenizer=tokenizer, chats=chats, source=source)


def qwen2_config(suite: Suite, shape: Shape) -> Any:
    from transformers import Qwen2Config

    tok = suite.cache["tokenizer"]
    return Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       max_position_embeddings=max(4096, suite.plan.seq), tie_word_embeddings=shape.tie,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)


def check_disk(suite: Suite, shape: Shape, lora: bool) -> float:
    """Fail fast when ``--work`` lacks the disk a train row holds at its peak: the bf16 model and its
    export, and for full fine-tuning a ZeRO checkpoint of 14 bytes per parameter (bf16 weights, fp32
    master and two Adam moments) twice, the worker's temporary copy and Ray Train's copy in storage.
    Returns the free GB."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in Qwen2ForCausalLM(qwen2_config(suite, shape)).parameters())
    need = n_params * (4 if lora else 4 + 2 * 14) / 1e9
    suite.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(suite.work).free / 1e9
    if free < need:
        raise RuntimeError(f"needs ~{need:.0f} GB of disk under {suite.work} (and the temp dir), {free:.0f} GB free: "
                           "point --work (and TMPDIR) at a larger disk")
    return free


def write_model(suite: Suite, shape: Shape, out_dir: Path, dtype: torch.dtype) -> int:
    """A random-init Qwen2 of ``shape`` (built on the GPU when there is one), saved in ``dtype``; its parameter count."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(suite.plan.device):
        model = Qwen2ForCausalLM(qwen2_config(suite, shape))
    model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    free_memory()
    return n_params


def write_train_inputs(work: Path, plan: Plan) -> tuple[str, str]:
    """Records (``uid``, ``messages``) whose responses are ``plan.seq`` random five-letter words (≥ seq
    tokens, so every row is truncated to exactly ``seq``), and a selection of all of them."""
    rng = np.random.default_rng(0)
    n = (plan.steps + 1) * plan.micro_batch
    chars = rng.integers(ord("a"), ord("z") + 1, size=(n, 6 * plan.seq), dtype=np.uint8)
    chars[:, 5::6] = ord(" ")
    uids = [f"suite-{i:05d}" for i in range(n)]
    rows = [{"uid": uid, "messages": [{"role": "user", "content": "Repeat these words."},
                                      {"role": "assistant", "content": chars[i].tobytes().decode().strip()}]}
            for i, uid in enumerate(uids)]
    (work / "records").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), work / "records" / "part-0.parquet")
    pq.write_table(pa.table({"uid": uids}), work / "selection.parquet")
    return str(work / "records"), str(work / "selection.parquet")


def train_config(plan: Plan, lora: bool) -> Any:
    from spice_ray.config import Config

    return Config.model_validate({
        "model": MODEL_SECTION,
        "train": {"num_workers": 1, "cpus_per_worker": plan.cpus_per_worker, "use_gpu": not plan.dry_run,
                  "engine": "deepspeed", "zero_stage": 2 if lora else 3, "lora": lora, "gradient_checkpointing": True,
                  "epochs": 1, "max_steps": plan.steps, "micro_batch_size": plan.micro_batch, "grad_accum": 1,
                  "max_length": plan.seq, "lr": 5e-5, "checkpoint_every": plan.checkpoint_at if lora else plan.steps,
                  "keep_checkpoints": 2, "max_failures": 1 if lora else 0},
    })


# ------------------------------------------------------------------------------------ train rows


def steady_tokens_per_s(history: list[dict[str, Any]]) -> tuple[float, int]:
    """Tokens/s over the longest run of steps of one process (``elapsed_s`` restarts in a resumed
    one; the later run on a tie), end of its first step to end of its last; and that run's steps."""
    runs: list[list[dict[str, Any]]] = []
    for m in history:
        if not runs or m["elapsed_s"] < runs[-1][-1]["elapsed_s"]:
            runs.append([])
        runs[-1].append(m)
    run = max(reversed(runs), key=len)
    if len(run) < 2:
        raise RuntimeError(f"no run of 2+ steps in one process: {[len(r) for r in runs]}")
    return (run[-1]["tokens"] - run[0]["tokens"]) / (run[-1]["elapsed_s"] - run[0]["elapsed_s"]), len(run)


def train_row(suite: Suite, row: Row, shape: Shape, lora: bool) -> None:
    from spice_ray.train import run_train_stage

    plan = suite.plan
    work = suite.work / row.key
    kind = "LoRA r16 q/k/v/o, ZeRO-2" if lora else "full fine-tuning, ZeRO-3"
    resume = f", checkpoint at {plan.checkpoint_at} then SIGKILL + resume" if lora else ""
    row.setup = (f"{shape.describe()}; {kind}; {'fp32 (CPU)' if plan.dry_run else 'bf16'}, seq {plan.seq} × micro-batch "
                 f"{plan.micro_batch}, gradient checkpointing, {plan.steps} steps{resume}; Ray Train, 1 worker")
    row.goal = "MFU ≥ 45%; resumes" if lora else "— (figures only)"
    free_gb = check_disk(suite, shape, lora)
    n_params = write_model(suite, shape, work / "model", torch.float32 if plan.dry_run else torch.bfloat16)
    records, selection = write_train_inputs(work, plan)
    callbacks = None
    if lora:
        from spice_ray.train.faults import KillWorkerAfterCheckpoint

        callbacks = [KillWorkerAfterCheckpoint(rank=0, after=1)]
    summary = run_train_stage(train_config(plan, lora), suite.executor(), records_path=records, selection_path=selection,
                              model_path=str(work / "model"), out_dir=str(work / "train"), max_tokens=plan.seq,
                              tokenizer_path=str(suite.tok_dir), callbacks=callbacks)
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    tokens_per_s, run_steps = steady_tokens_per_s(history)
    flops_per_token = (4 if lora else 6) * n_params
    mfu = tokens_per_s * flops_per_token / (plan.peak_tflops * 1e12 * plan.gpus)
    resumed = summary["resumed_from_step"]
    row.figures = {"n_params": n_params, "tokens_per_s": tokens_per_s, "steady_steps": run_steps, "mfu": mfu,
                   "flops_per_token": flops_per_token, "disk_free_gb": free_gb, "summary": summary}
    row.measured = (f"{tokens_per_s:,.0f} tokens/s; MFU {100 * mfu:.3g}%; peak {summary['peak_memory_gb']:.2f} GiB "
                    f"({summary['peak_memory_kind']}); N = {n_params / 1e9:.3g}B; {summary['steps']} steps"
                    + (f", resumed from step {resumed}" if lora else "") + f"; padding {summary['padding_fraction'] or 0.0:.1%}")
    ok_steps = summary["steps"] == plan.steps and summary["dtype"] == ("float32" if plan.dry_run else "bfloat16")
    if lora:
        row.verdict = f"MFU {verdict(mfu >= 0.45)}; resume {verdict(ok_steps and resumed is not None)}"
    else:
        row.verdict = "ran" if ok_steps else f"FAIL: {summary['steps']} steps, {summary['dtype']}"


# ----------------------------------------------------------------------------------- sketch row


def sketch_records(suite: Suite) -> pa.Table:
    """``plan.sketch_records`` chats with at least one response token after truncation, as the stage reads them."""
    from spice_ray.corpus.tokenize import encode_batch

    n, chats = suite.plan.sketch_records, suite.cache["chats"]
    enc = encode_batch(suite.cache["tokenizer"], chats[: 3 * n], max_tokens=suite.plan.seq, loss_on="response")
    keep = [chat for chat, e in zip(chats, enc) if e.n_loss_tokens > 0][:n]
    return pa.table({"uid": [f"r{i:05d}" for i in range(len(keep))], "messages": keep})


def make_worker(suite: Suite, model_dir: Path) -> Any:
    from spice_ray.sketch.worker import SketchWorker

    plan = suite.plan
    sketch_cfg = {"dim": plan.sketch_dim, "padding": "batch", "batch_size": plan.sketch_records,
                  "max_tokens_per_batch": plan.sketch_budget, "dtype": "float16"}
    worker = SketchWorker(str(model_dir), str(suite.tok_dir), MODEL_SECTION, sketch_cfg, max_tokens=plan.seq)
    torch.manual_seed(0)
    st.warm_lora(worker.sketcher.model)
    st.set_device(worker.device)
    return worker


def time_less(worker: Any, enc: list[Any], plan: Plan) -> dict[str, Any]:
    """The LESS-style loop (``sketch_throughput.run_less``) on every k-th record, dense P on the device."""
    sketcher = worker.sketcher
    names = sorted(sketcher.layers)
    params = {n: sketcher.layers[n].weight for n in names}
    sub = enc[:: max(1, len(enc) // plan.less_records)][: plan.less_records]
    free_memory()
    dense = st.dense_projection(sketcher.projection, names, st.DEVICE)
    st.run_less(sketcher.model, names, params, dense, sub[:2])  # warm-up
    seconds = st.run_less(sketcher.model, names, params, dense, sub)[1]
    figures = {"less_records": len(sub), "less_s": seconds, "less_samples_per_s": len(sub) / seconds,
               "D": int(dense.shape[1]), "dense_gib": dense.numel() * dense.element_size() / 2**30}
    del dense
    free_memory()
    return figures


def sketch_row(suite: Suite, row: Row) -> None:
    from spice_ray.sketch.worker import padding_fraction, token_budget_batches

    plan = suite.plan
    row.setup = (f"SketchWorker, {plan.proxy_shape.describe()}, fp32; LoRA r16 (B ≠ 0, as after a warm-up); d = {plan.sketch_dim}, "
                 f"padding batch, {plan.sketch_records:,} records in one call, budget {plan.sketch_budget:,} tokens; "
                 f"LESS-style loop on every {max(1, plan.sketch_records // plan.less_records)}th record")
    row.goal = "≥ 30× LESS-style; ≤ 1.3× a training step"
    table = sketch_records(suite)
    model_dir = suite.work / row.key / "proxy"
    n_params = write_model(suite, plan.proxy_shape, model_dir, torch.float32)
    worker = make_worker(suite, model_dir)
    worker(table.slice(0, 8))  # warm-up: kernels, allocator
    sketch_s = min(timed(lambda: worker(table))[0] for _ in range(plan.rounds))
    enc = worker._encode(table)
    lengths = [e.n_tokens for e in enc]
    batches = token_budget_batches(lengths, plan.sketch_budget)
    pad_id = worker.tokenizer.pad_token_id
    model = worker.sketcher.model
    train_s = min(st.run_train_step(model, enc, batches, pad_id, mask=False) for _ in range(plan.rounds))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None  # before LESS's dense P
    less = time_less(worker, enc, plan)
    n = table.num_rows
    speedup = (n / sketch_s) / less["less_samples_per_s"]
    over_train = sketch_s / train_s
    row.figures = {"n_params": n_params, "records": n, "tokens": sum(lengths), "sub_batches": len(batches),
                   "padding": padding_fraction(lengths, batches), "sketch_s": sketch_s, "samples_per_s": n / sketch_s,
                   "train_s": train_s, "sketch_over_train": over_train, "speedup_vs_less": speedup,
                   "data": suite.cache["source"], "peak_gpu_gib": peak, **less}
    row.measured = (f"{n / sketch_s:,.1f} samples/s ({sum(lengths) / n:.0f} tokens/record, {len(batches)} sub-batches); "
                    f"{over_train:.2f}× a training step; {speedup:.1f}× the LESS-style loop "
                    f"({less['less_samples_per_s']:,.1f} samples/s, dense P {less['dense_gib']:.2f} GiB)")
    row.verdict = f"{verdict(speedup >= 30)} / {verdict(over_train <= 1.3)}"


# -------------------------------------------------------------------------------- selection rows


def sketches(suite: Suite) -> np.ndarray:
    if "G" not in suite.cache:
        suite.cache["G"] = sl.sketch_like(suite.plan.select_n, suite.plan.select_d, seed=3)
    return suite.cache["G"]


def select_row(suite: Suite, row: Row) -> None:
    plan = suite.plan
    row.setup = (f"select(N = {plan.select_n:,}, d = {plan.select_d}, k = {plan.select_k:,}, λ = {plan.lam}, "
                 f"device = {plan.device!r}, lazy = False): the block engine; sketch_like rows, float32")
    row.goal = "≤ 30 s"
    G = sketches(suite)
    select(G[:1000], 10, lam=plan.lam, lazy=False, device=plan.device, diagnostics=False)  # warm-up: context, kernels
    wall, sel = timed(lambda: select(G, plan.select_k, lam=plan.lam, lazy=False, device=plan.device, diagnostics=False))
    stats = {k: sel.stats.get(k) for k in ("blocks", "rollbacks", "cuda_graph", "block")}
    row.figures = {"wall_s": wall, "ms_per_step": 1e3 * wall / plan.select_k, "logdet": float(sel.logdet), **stats}
    row.measured = (f"{wall:.2f} s ({1e3 * wall / plan.select_k:.3f} ms/step; {stats['blocks']} blocks, "
                    f"{stats['rollbacks']} rollbacks, CUDA graph {stats['cuda_graph']}); log det {sel.logdet:.1f}")
    row.verdict = verdict(wall <= 30)


def picks_row(suite: Suite, row: Row) -> None:
    plan = suite.plan
    row.setup = (f"the block engine on {plan.device!r} vs the numpy engine (lazy), first {plan.check_n:,} rows, "
                 f"k = {plan.check_k:,}, λ = {plan.lam}")
    row.goal = "identical picks"
    G = sketches(suite)[: plan.check_n]
    dev_s, dev = timed(lambda: select(G, plan.check_k, lam=plan.lam, lazy=False, device=plan.device, diagnostics=False))
    np_s, ref = timed(lambda: select(G, plan.check_k, lam=plan.lam, device="numpy", diagnostics=False))
    same = dev.indices.tolist() == ref.indices.tolist()
    row.figures = {"device_s": dev_s, "numpy_s": np_s, "identical": same, "logdet_device": float(dev.logdet),
                   "logdet_numpy": float(ref.logdet)}
    row.measured = (f"identical picks: {same}; {plan.device} {dev_s:.2f} s, numpy {np_s:.2f} s; "
                    f"log det {dev.logdet:.2f} vs {ref.logdet:.2f}")
    row.verdict = verdict(same)


# ---------------------------------------------------------------------------------------- driver


def row_runner(key: str, plan: Plan) -> tuple[str, Callable[[Suite, Row], None]]:
    table: dict[str, tuple[str, Callable[[Suite, Row], None]]] = {
        "lora7b": (f"ZeRO-2 LoRA, {plan.lora_shape.name}", lambda s, r: train_row(s, r, plan.lora_shape, lora=True)),
        "full1p5b": (f"ZeRO-3 full FT, {plan.full_shape.name}", lambda s, r: train_row(s, r, plan.full_shape, lora=False)),
        "sketch": (f"Sketch worker, {plan.proxy_shape.name} proxy", sketch_row),
        "select": (f"Selection {plan.select_k:,} of {plan.select_n:,}", select_row),
        "picks": (f"Selection picks vs numpy, {plan.check_n:,} rows", picks_row),
    }
    return table[key]


def run_row(suite: Suite, row: Row, fn: Callable[[Suite, Row], None]) -> None:
    log(f"{row.key}: {row.label}")
    t0 = time.perf_counter()
    try:
        fn(suite, row)
    except Exception as e:  # noqa: BLE001  a failed row is reported in the table; the others still run
        first = (str(e).strip().splitlines() or [""])[0][:300]
        row.measured = f"error: {type(e).__name__}: {first}"
        row.verdict = "FAIL"
        row.figures["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
    finally:
        row.seconds = time.perf_counter() - t0
        shutil.rmtree(suite.work / row.key, ignore_errors=True)
        free_memory()
    log(f"{row.key}: {row.seconds:.0f} s — {row.measured}")


def environment(plan: Plan) -> dict[str, Any]:
    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    env: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "load": [round(x, 2) for x in os.getloadavg()],
                           **{name: ver(name) for name in ("torch", "transformers", "peft", "deepspeed", "ray")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    env["mode"] = "dry run: CPU, tiny shapes" if plan.dry_run else "GPU"
    return env


def cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    title = (f"# GPU suite ({env['mode']}): {env.get('gpu', 'no GPU')}, torch {env['torch']}, transformers "
             f"{env['transformers']}, deepspeed {env['deepspeed']}, ray {env['ray']}, {env['cpus']} CPUs, load {env['load']}")
    lines = [title, "", "| row | setup | measured | goal | verdict | wall s |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {cell(r['label'])} | {cell(r['setup'])} | {cell(r['measured'])} | {cell(r['goal'])} | "
                     f"{cell(r['verdict'])} | {r['seconds']:.0f} |")
    lines += ["", report["formula"], f"Total {report['total_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def save(out: Path, report: dict[str, Any]) -> str:
    text = render(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_suite.md").write_text(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (use_gpu false, DeepSpeed on CPU)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else build/gpu_suite)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spice-gpu-suite",
                    help="models, records, checkpoints (each row's part deleted after it)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak for the MFU")
    ap.add_argument("--verbose", action="store_true", help="Ray's and the workers' logs on the terminal")
    ap.add_argument("--report-only", action="store_true", help="print the table of the JSON under --out and exit")
    args = ap.parse_args(argv)
    args.out = args.out or Path(os.environ.get("OUT") or REPO / "build" / "gpu_suite")
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that the finally blocks write what was measured


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        print(render(json.loads((args.out / "gpu_suite.json").read_text())), end="")
        return 0
    plan = replace(DRY if args.dry_run else Plan(), peak_tflops=args.peak_tflops)
    if not plan.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a CPU machine")
    signal.signal(signal.SIGTERM, _terminate)
    if plan.dry_run:  # two OpenMP threads on a busy CPU stall each other (benchmarks/RESULTS.md, Sketch)
        torch.set_num_threads(1)
    shutil.rmtree(args.work, ignore_errors=True)
    suite = Suite(plan=plan, work=args.work, tok_dir=args.work / "tokenizer", verbose=args.verbose)
    keys = [k for k in ROWS if k in args.rows.split(",")]
    rows = [Row(key=k, label=row_runner(k, plan)[0]) for k in keys]
    report: dict[str, Any] = {"environment": environment(plan), "plan": asdict(plan), "formula": formula(plan),
                              "rows": [], "total_seconds": 0.0}
    t0 = time.perf_counter()
    try:
        make_tokenizer(suite)
        for row in rows:
            run_row(suite, row, row_runner(row.key, plan)[1])
            report.update(rows=[asdict(r) for r in rows], total_seconds=time.perf_counter() - t0)
            save(args.out, report)
    finally:
        report.update(rows=[asdict(r) for r in rows], total_seconds=time.perf_counter() - t0)
        print("\n" + save(args.out, report), flush=True)
        shutil.rmtree(args.work, ignore_errors=True)
        if "executor" in suite.cache:
            import ray

            ray.shutdown()
    failed = [r.key for r in rows if r.measured.startswith(("error", "not run"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
