"""Sketch throughput: batched sketches (projection folded into the backward) against the LESS-style
reference, and against a plain training step, on the same model, data and d, in one process.

    .venv/bin/python benchmarks/sketch_throughput.py            # defaults below
    .venv/bin/python benchmarks/sketch_throughput.py --n 64 --rounds 1 --dim 4096 --no-bergson
    python benchmarks/sketch_throughput.py --device cuda --no-bergson      # on a GPU

Model: a Llama built from a LlamaConfig (hidden 256, 4 layers, 4 heads / 2 KV heads, MLP 688,
random init, no download), LoRA r=8 on q/k/v/o with B moved off zero (as after a warm-up, so
every LoRA factor has a non-zero gradient and none is skipped). Tokenizer: byte-level BPE trained
on the sample. Data: ``--n`` records drawn (seeded) from ../shared/data/*.jsonl when present, else
the generated demo corpus; truncated to ``--max-tokens``.

Measured (each timed ``--rounds`` times, interleaved; the best round is reported, by wall clock and
by process CPU time — the latter is steadier on a machine shared with other work):

* ``less``: LESS-style reference — batch size 1, ``backward()``, flatten every LoRA gradient,
  multiply by the dense d × D projection matrix (the same structured matrix, materialised).
* ``sketch/<method>``: ``GradientSketcher`` on token-budget sub-batches (``--budget`` tokens),
  right padding, no attention mask; ``+mask`` passes the attention mask; ``fixed8`` uses unsorted
  batches of 8 records (what a plain batch size gives) to show the padding cost.
* ``less b=1 fwd+bwd only``: the reference without its projection (where its time goes).
* ``same-width``: what ``SketchWorker`` does for bit-for-bit determinism — every record padded
  to its own bucket width (``padded_width``), one width per sub-batch.
* ``train``: one plain forward + backward (mean loss, LoRA grads, no hooks doing work) on the same
  sub-batches — the floor a sketch can approach.
* ``bergson``: ``bergson.InMemoryCollector`` with per-module projections whose sizes add up to d
  (when bergson is installed and runs on this machine).

Prints a table, the ratios (sketch vs less, sketch vs train) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spice_ray.corpus.formats import normalize_row  # noqa: E402
from spice_ray.corpus.tokenize import encode_batch, pad_batch  # noqa: E402
from spice_ray.models import add_lora, train_tokenizer  # noqa: E402
from spice_ray.sketch import GradientSketcher, per_sample_loss  # noqa: E402
from spice_ray.sketch.worker import padded_width, padding_fraction, token_budget_batches  # noqa: E402

SHARED_DATA = Path(os.environ.get("SPICE_SHARED", REPO.parent / "shared")) / "data"


def load_chats(n: int, seed: int) -> tuple[list[list[dict]], str]:
    files = sorted(SHARED_DATA.glob("*.jsonl"))
    rng = random.Random(seed)
    if files:
        rows = []
        for f in files:
            with f.open() as fh:
                lines = fh.readlines()
            rows += [json.loads(line) for line in rng.sample(lines, min(len(lines), 4 * n))]
        rng.shuffle(rows)
        chats = []
        for row in rows:
            try:
                chats.append(normalize_row(row))
            except ValueError:
                continue
        return chats, f"{SHARED_DATA} ({len(files)} files)"
    from spice_ray.corpus.demo import generate_demo_corpus

    return [normalize_row(r) for r in generate_demo_corpus(n=4 * n, seed=seed)], "generated demo corpus"


def build(args):
    chats, source = load_chats(args.n, args.seed)
    texts = [m["content"] for chat in chats[: 20 * args.n] for m in chat]
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    enc = encode_batch(tokenizer, chats[: 3 * args.n], max_tokens=args.max_tokens, loss_on="response")
    enc = [e for e in enc if e.n_loss_tokens > 0][: args.n]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = add_lora(LlamaForCausalLM(config), r=args.rank, alpha=2 * args.rank,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=args.seed).eval()
    warm_lora(model)
    return model, tokenizer, enc, source


def warm_lora(model: torch.nn.Module) -> None:
    """Move every LoRA B off zero, as after a warm-up: no lora_A gradient is then zero, so no layer is
    skipped by the sketcher and the LESS reference flattens no all-zero block."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


DEVICE = torch.device("cpu")  # --device; set_device() changes it for the run_* functions below


def set_device(name: str | torch.device) -> torch.device:
    """Where the run_* functions put batches and the reference's gradients (other scripts import them)."""
    global DEVICE
    DEVICE = torch.device(name)
    return DEVICE


def dense_projection(projection, names: list[str], device: torch.device) -> torch.Tensor:
    """LESS's dense d × D matrix: the blocks P_out ⊗ P_in of ``names``, side by side in that order,
    written into one preallocated tensor on ``device`` (no concatenation: it may be tens of GB)."""
    blocks = [projection.shapes[n] for n in names]
    dense = torch.empty(projection.dim, sum(o * i for o, i in blocks), device=device)
    at = 0
    for name in names:
        block = projection.dense(name)
        dense[:, at : at + block.shape[1]] = block
        at += block.shape[1]
    return dense


def run_sketch(sketcher, enc, batches, pad_id, mask: bool, width_of=None):
    d = sketcher.projection.dim
    out = torch.zeros(len(enc), d)
    sync()
    t0 = time.perf_counter()
    for idx in batches:
        t = pad_batch([enc[i] for i in idx], pad_id, **({"width": width_of(idx)} if width_of else {}))
        t = {k: v.to(DEVICE) for k, v in t.items()}
        res = sketcher(t["input_ids"], t["labels"], t["attention_mask"] if mask else None)
        out[idx] = res.sketch.cpu()
    sync()
    return out, time.perf_counter() - t0


def run_train_step(model, enc, batches, pad_id, mask: bool) -> float:
    model.eval()
    sync()
    t0 = time.perf_counter()
    for idx in batches:
        t = {k: v.to(DEVICE) for k, v in pad_batch([enc[i] for i in idx], pad_id).items()}
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"] if mask else None, labels=t["labels"]).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def run_less(model, names, params, dense, enc, project: bool = True):
    """Batch size 1, backward(), flatten, dense projection — the LESS recipe (``project=False``:
    without the projection, to show where its time goes)."""
    out = torch.zeros(len(enc), dense.shape[0])
    sync()
    t0 = time.perf_counter()
    for i, e in enumerate(enc):
        ids = torch.tensor([e.input_ids], device=DEVICE)
        labels = torch.tensor([e.labels], device=DEVICE)
        model.zero_grad(set_to_none=True)
        loss, _ = per_sample_loss(model(input_ids=ids).logits, labels)
        loss.sum().backward()
        flat = torch.cat([params[n].grad.reshape(-1) for n in names])
        if project:
            out[i] = (dense @ flat).cpu()
    model.zero_grad(set_to_none=True)
    sync()
    return out, time.perf_counter() - t0


def make_bergson(model, enc, args, n_modules: int):
    """A callable timing bergson's in-memory collector, or the reason it cannot run here."""
    try:
        import bergson  # noqa: F401
        from bergson import GradientProcessor, IndexConfig, InMemoryCollector
        from bergson.collector.collector import CollectorComputer
        from datasets import Dataset
    except Exception as e:  # not installed, or its imports fail on this machine
        return None, f"not importable: {type(e).__name__}: {e}"
    p = max(1, round(math.sqrt(args.dim / n_modules)))  # per-module p×p, adding up to ≈ d

    def run() -> float:
        import tempfile

        data = Dataset.from_dict({"input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc]})
        lengths = [e.n_tokens for e in enc]
        batches = token_budget_batches(lengths, args.budget)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = IndexConfig(run_path=tmp, projection_dim=p, loss_reduction="mean", token_batch_size=args.budget)
            processor = GradientProcessor(projection_dim=p, projection_type="normal")
            os.makedirs(cfg.partial_run_path, exist_ok=True)
            targets = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
            collector = InMemoryCollector(model=model, data=data, cfg=cfg, processor=processor, target_modules=targets)
            computer = CollectorComputer(model=model, data=data, collector=collector, batches=batches, cfg=cfg)
            sync()
            t0 = time.perf_counter()
            computer.run_with_collector_hooks(desc="bergson")
            sync()
            return time.perf_counter() - t0

    return run, f"per-module {p}x{p} x {n_modules} modules = {p * p * n_modules} dims"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=96, help="records")
    ap.add_argument("--dim", type=int, default=8192, help="sketch dimension d (LESS uses 8192)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--budget", type=int, default=4096, help="tokens per sub-batch (rows × longest)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-bergson", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the model, batches and dense P go there)")
    args = ap.parse_args()
    set_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, enc, source = build(args)
    model.to(DEVICE)
    pad_id = tokenizer.pad_token_id
    lengths = [e.n_tokens for e in enc]
    budget = token_budget_batches(lengths, args.budget)
    fixed8 = [list(range(i, min(i + 8, len(enc)))) for i in range(0, len(enc), 8)]
    # what SketchWorker does (determinism): each record padded to its own bucket width, one width per sub-batch
    widths = [padded_width(n) for n in lengths]
    same_width = token_budget_batches(widths, args.budget, same_length=True)
    sketchers = {m: GradientSketcher(model, dim=args.dim, seed=0, method=m) for m in ("auto", "materialize", "factored")}
    for s in list(sketchers.values())[1:]:
        s.remove_hooks()  # one set of hooks at a time (re-added below around each run)
    names = sorted(sketchers["auto"].layers)
    params = {n: sketchers["auto"].layers[n].weight for n in names}
    D = sum(params[n].numel() for n in names)
    t0 = time.perf_counter()
    dense = dense_projection(sketchers["auto"].projection, names, DEVICE)
    dense_s = time.perf_counter() - t0
    n_tok = sum(lengths)
    print(f"data: {len(enc)} records from {source}; tokens {n_tok} (mean {n_tok / len(enc):.0f}, max {max(lengths)})")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {len(tokenizer)}, LoRA r={args.rank} on q/k/v/o: "
          f"{len(names)} LoRA factors, D = {D} params; d = {args.dim}; dense P {dense.numel() * 4 / 2**30:.2f} GiB "
          f"(built in {dense_s:.1f} s, not timed); torch threads {torch.get_num_threads()}; device {DEVICE}"
          + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""))
    print(f"padding: token budget {args.budget} → {len(budget)} sub-batches, {padding_fraction(lengths, budget):.1%} padding; "
          f"unsorted batches of 8 → {padding_fraction(lengths, fixed8):.1%} padding; one bucket width per sub-batch "
          f"(SketchWorker) → {len(same_width)} sub-batches")

    def with_hooks(method):
        for s in sketchers.values():
            s.remove_hooks()
        s = sketchers[method]
        s._handles = [m.register_forward_hook(s._make_hook(n)) for n, m in s.layers.items()]
        return s

    bergson_run, bergson_note = (None, "skipped (--no-bergson)") if args.no_bergson else make_bergson(model, enc, args, len(names))
    runs = {
        "less (b=1, dense P)": lambda: run_less(model, names, params, dense, enc),
        "less b=1 fwd+bwd only": lambda: (None, run_less(model, names, params, dense, enc, project=False)[1]),
        "sketch/auto": lambda: run_sketch(with_hooks("auto"), enc, budget, pad_id, mask=False),
        "sketch/materialize": lambda: run_sketch(with_hooks("materialize"), enc, budget, pad_id, mask=False),
        "sketch/factored": lambda: run_sketch(with_hooks("factored"), enc, budget, pad_id, mask=False),
        "sketch/auto +mask": lambda: run_sketch(with_hooks("auto"), enc, budget, pad_id, mask=True),
        "sketch/auto same-width": lambda: run_sketch(with_hooks("auto"), enc, same_width, pad_id, mask=False,
                                                     width_of=lambda idx: widths[idx[0]]),
        "sketch/auto fixed8": lambda: run_sketch(with_hooks("auto"), enc, fixed8, pad_id, mask=True),
        "train fwd+bwd": lambda: (None, run_train_step(model, enc, budget, pad_id, mask=False)),
        "train fwd+bwd +mask": lambda: (None, run_train_step(model, enc, budget, pad_id, mask=True)),
    }
    if bergson_run is not None:
        runs["bergson"] = lambda: (None, bergson_run())
    # untimed warm-up: the first calls of a fresh process are slow on CPU (thread pools, allocator)
    sub = enc[:4]
    run_less(model, names, params, dense, sub)
    run_sketch(with_hooks("auto"), sub, [[0, 1, 2, 3]], pad_id, mask=False)
    run_train_step(model, sub, [[0, 1, 2, 3]], pad_id, mask=False)
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    errors: dict[str, str] = {}
    order = list(runs)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:  # rotate: no run always follows the same one
            fn = runs[name]
            if name in errors:
                continue
            c0 = time.process_time()
            try:
                out, secs = fn()
            except Exception as e:  # bergson on an unsupported setup: report, keep going
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - c0)
            best[name] = min(best.get(name, float("inf")), secs)
            if out is not None:
                outputs[name] = out
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.2f}s" for k, v in best.items()), flush=True)

    ref = outputs["less (b=1, dense P)"]
    print(f"\n{'run':<24}{'wall s':>8}{'samples/s':>11}{'vs less':>9}{'vs train':>10}{'cpu s':>8}{'vs less':>9}{'vs train':>10}  max rel. diff to less")
    train, less = best["train fwd+bwd"], best["less (b=1, dense P)"]
    for name, secs in best.items():
        diff = ""
        if name in outputs:
            rel = ((outputs[name] - ref).norm(dim=1) / ref.norm(dim=1)).max()
            diff = f"{float(rel):.1e}"
        c = cpu[name]
        print(f"{name:<24}{secs:>8.2f}{len(enc) / secs:>11.1f}{less / secs:>8.1f}x{secs / train:>9.2f}x"
              f"{c:>8.2f}{cpu['less (b=1, dense P)'] / c:>8.1f}x{c / cpu['train fwd+bwd']:>9.2f}x  {diff}")
    for name, err in errors.items():
        print(f"{name:<24} failed: {err}")
    print(f"bergson: {bergson_note}")
    speedup = best["less (b=1, dense P)"] / best["sketch/auto"]
    overhead = best["sketch/auto"] / train
    print(f"\nsketch/auto vs LESS-style reference: {speedup:.1f}x wall, "
          f"{cpu['less (b=1, dense P)'] / cpu['sketch/auto']:.1f}x cpu (goal ≥ 20x); "
          f"sketch/auto vs plain fwd+bwd: {overhead:.2f}x wall, {cpu['sketch/auto'] / cpu['train fwd+bwd']:.2f}x cpu (goal ≤ 2x)")
    print(json.dumps({"device": str(DEVICE), "hidden": args.hidden, "layers": args.layers, "n": len(enc), "d": args.dim, "D": D, "tokens": n_tok, "threads": torch.get_num_threads(),
                      "seconds": {k: round(v, 3) for k, v in best.items()},
                      "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()}, "speedup_vs_less": round(speedup, 2),
                      "sketch_over_train": round(overhead, 3), "errors": errors}))


if __name__ == "__main__":
    main()
