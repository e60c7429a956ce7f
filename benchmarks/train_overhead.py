"""What does the Ray Train wrapper cost? The same DeepSpeed loop, launched two ways, in one run.

    direct : ``spice_ray.train.loop.run_loop`` in a freshly spawned process with a ``LocalSession``
             (gloo, world size 1, rows from an in-memory table, checkpoints in a local directory)
    ray    : the same ``run_loop`` under a 1-worker ``TorchTrainer`` (``spice_ray.train.trainer.fit``):
             Ray Data shard, ``ray.train.report`` / checkpoints through Ray Train storage, controller

Both get the same tokenized rows (demo corpus, built-in tokenizer), the same model (a Llama of
``--hidden``/``--layers`` from a config, random init), the same ZeRO preset (LoRA + ZeRO-2 by default),
the same number of optimizer steps, the same torch thread count, and one checkpoint + export at the
end. Reported per mode (median over ``--rounds``, modes alternating):

    steady   seconds per optimizer step from the end of step 1 to the end of the last step
    e2e      wall seconds of the whole launch: the spawned process (direct) or ``fit`` (ray; Ray itself
             already started): process start, imports, model load, DeepSpeed init, steps,
             checkpoint, export

and the ratios ray / direct (goal: steady-state ≤ 1.10).

    .venv/bin/python benchmarks/train_overhead.py                 # ~3 min on 2 CPU cores (20M params)
    .venv/bin/python benchmarks/train_overhead.py --hidden 256 --layers 4 --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def build_inputs(work: Path, args: argparse.Namespace):
    """The model directory (built-in tokenizer, a bigger random Llama) and the tokenized table."""
    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spice_ray.corpus.demo import generate_demo_corpus
    from spice_ray.corpus.formats import RowError, canonical_uid, normalize_row
    from spice_ray.models import load_tokenizer, materialize_builtin
    from spice_ray.train.trainer import tokenize_selection

    tiny = materialize_builtin("builtin:tiny-llama", work / "tiny")
    tok = load_tokenizer(str(tiny))
    model_dir = work / "model"
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rows, seen = [], set()
    for raw in generate_demo_corpus(n=args.rows * 2, seed=3):
        try:
            messages = normalize_row(raw)
        except RowError:
            continue
        uid = canonical_uid(messages)
        if uid not in seen:
            seen.add(uid)
            rows.append({"uid": uid, "messages": messages})
    rows = rows[: args.rows]
    table = pa.Table.from_pylist(rows)
    tokenized = tokenize_selection(table, load_tokenizer(str(model_dir)), max_tokens=1024)
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return model_dir, tokenized, n_params


def make_cfg(args: argparse.Namespace):
    from spice_ray.config import Config, LoraConfig, ModelConfig, TrainConfig

    return Config(
        model=ModelConfig(target_lora=LoraConfig(r=16, alpha=32.0)),
        train=TrainConfig(
            num_workers=1, cpus_per_worker=float(args.threads), use_gpu=False, lora=not args.full, zero_stage=None,
            engine="deepspeed",  # the same DeepSpeed loop in both modes (one worker would default to plain torch)
            epochs=100, max_steps=args.steps, micro_batch_size=args.micro_batch, grad_accum=1, lr=1e-4,
            checkpoint_every=10**6, keep_checkpoints=1, seed=0,
        ),
    )


def loop_cfg(cfg, model_dir: Path, export: Path, args: argparse.Namespace) -> dict:
    from spice_ray.train.trainer import loop_config

    config = loop_config(
        cfg, model_path=str(model_dir), tokenizer_path=str(model_dir), export_dir=str(export),
        use_gpu=False, pad_id=0, total_steps=args.steps,
    )
    config["torch_threads"] = args.threads
    return config


def _direct_child(config: dict, table, out: Path, threads: int) -> dict:
    import torch

    from spice_ray.train.loop import LocalSession, local_process_group, run_loop

    torch.set_num_threads(threads)
    with local_process_group(out / "pg"):
        return run_loop(config, LocalSession(table, out / "ckpt", keep=1))


def run_direct(cfg, model_dir: Path, table, work: Path, args: argparse.Namespace) -> dict:
    """A fresh process (spawned, as a launcher would start it) runs the loop; e2e includes its start."""
    import multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix="direct-", dir=work))
    config = loop_cfg(cfg, model_dir, out / "model", args)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(1) as pool:
        ret = pool.apply(_direct_child, (config, table, out, args.threads))
    e2e = time.perf_counter() - t0
    return {"e2e_s": e2e, "step_s": ret["step_seconds"], "steps": ret["final"]["step"], "loss": ret["final"]["loss"],
            "padding": ret["padding_fraction"]}


def run_ray(cfg, model_dir: Path, table, work: Path, args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from spice_ray.executor import Resources
    from spice_ray.ray_executor import RayExecutor
    from spice_ray.train.loop import run_loop

    out = Path(tempfile.mkdtemp(prefix="ray-", dir=work))
    config = loop_cfg(cfg, model_dir, out / "model", args)
    pq.write_table(table, out / "rows.parquet")
    t0 = time.perf_counter()
    ret, _ = RayExecutor().train(run_loop, config, rows=str(out / "rows.parquet"), storage=str(out / "checkpoints"),
                                 resources=Resources(cpus=float(args.threads), workers=1), max_failures=0, keep=1)
    e2e = time.perf_counter() - t0
    return {"e2e_s": e2e, "step_s": ret["step_seconds"], "steps": ret["final"]["step"], "loss": ret["final"]["loss"],
            "padding": ret["padding_fraction"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per launch")
    parser.add_argument("--rounds", type=int, default=3, help="launches per mode (alternating); medians are reported")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both modes (and the Ray worker's CPUs)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning (ZeRO-3) instead of LoRA (ZeRO-2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        work = Path(tmp)
        model_dir, table, n_params = build_inputs(work, args)
        cfg = make_cfg(args)
        runs: dict[str, list[dict]] = {"direct": [], "ray": []}
        for r in range(args.rounds):
            for mode, fn in (("direct", run_direct), ("ray", run_ray)):
                res = fn(cfg, model_dir, table, work, args)
                runs[mode].append(res)
                print(f"round {r + 1} {mode:>6}: steady {res['step_s']:.4f} s/step, e2e {res['e2e_s']:.1f} s, "
                      f"{res['steps']} steps, loss {res['loss']:.4f}", flush=True)
    ray.shutdown()

    med = {m: {k: statistics.median(x[k] for x in v) for k in ("step_s", "e2e_s")} for m, v in runs.items()}
    steady = med["ray"]["step_s"] / med["direct"]["step_s"]
    e2e = med["ray"]["e2e_s"] / med["direct"]["e2e_s"]
    preset = "full fine-tuning, ZeRO-3" if args.full else "LoRA r16, ZeRO-2"
    print()
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f}M params; {preset}; "
          f"{len(table)} rows, micro-batch {args.micro_batch}, {args.steps} steps, {args.threads} torch thread(s), "
          f"padding {runs['direct'][0]['padding']:.1%}")
    print(f"{'':8}{'steady s/step':>15}{'end-to-end s':>15}")
    for m in ("direct", "ray"):
        print(f"{m:8}{med[m]['step_s']:>15.4f}{med[m]['e2e_s']:>15.1f}")
    print(f"ratio ray/direct: steady-state {steady:.3f}x (goal <= 1.10), end-to-end {e2e:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs, "median": med,
                                         "ratio_steady": steady, "ratio_e2e": e2e}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
