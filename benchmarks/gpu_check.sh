#!/usr/bin/env bash
# GPU check for the train stage (issue #5): a few minutes on one CUDA GPU, exits non-zero on failure.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]        (env: PYTHON=python3  VENV=.venv-gpu  OFFLOAD=1)
#
# Dry run of the same steps on a CPU machine with an existing venv (checks the script, not the GPU):
#   CPU_DRY_RUN=1 VENV=.venv HIDDEN=64 LAYERS=2 DEMO_SIZE=300 CPUS=0.5 bash benchmarks/gpu_check.sh /tmp/gpu-check-dry
#
# 1. a venv from this repo: torch==2.13.0 from the default index first (its Linux wheels are CUDA
#    builds), then `pip install -c constraints.txt -e .` (the constraints pin only the version, so
#    the CUDA build stays); checks that torch sees a GPU
# 2. ingest + sketch + select (spice-ray run, GPU sketch actor) on a 2000-row demo corpus
# 3. ZeRO-2 LoRA, bf16: 20 steps with a checkpoint at 10 and 20, then a rerun to 30 that must
#    resume at 20; tokens/s and peak GPU memory
# 4. ZeRO-3 full fine-tuning, bf16, gradient checkpointing: 20 steps (OFFLOAD=1: a second run with
#    ZeRO-Offload, which JIT-builds DeepSpeedCPUAdam and needs a C++ compiler)
# 5. the eval stage (base vs tuned held-out loss) on the GPU
# The model trained is a ~100M-parameter Llama built from a config (random init, the built-in
# tokenizer), so nothing is downloaded besides the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mkdir -p "${1:-/tmp/spice-gpu-check}" && cd "${1:-/tmp/spice-gpu-check}" && pwd)
VENV=${VENV:-.venv-gpu}
PY="$VENV/bin/python"
SR="$VENV/bin/spice-ray"
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spice-ray/torch_extensions}
step() { printf '\n===== %s\n' "$*"; }
T0=$SECONDS

GPU=true; [ "${CPU_DRY_RUN:-0}" = 1 ] && GPU=false

step "1/5 venv $VENV (torch 2.13.0 CUDA build, then spice-ray)"
if [ "$GPU" = true ]; then
  test -x "$PY" || "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -c constraints.txt -e .
fi
"$PY" - "$GPU" <<'EOF'
import sys, torch
if sys.argv[1] == "false":
    sys.exit(print("CPU dry run: no GPU check"))
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
if not (torch.version.cuda and torch.cuda.is_available()):
    sys.exit("torch is a CPU build or sees no GPU: install a CUDA build, e.g. "
             "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

step "2/5 a ~100M-parameter Llama from a config, then ingest + sketch + select"
"$PY" - "$WORK" "${HIDDEN:-1024}" "${LAYERS:-8}" <<'EOF'
import sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from spice_ray.models import load_tokenizer, materialize_builtin
work, hidden, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if not (work / "small-llama" / "config.json").exists():
    tok = load_tokenizer(str(materialize_builtin("builtin:tiny-llama", work / "tiny-llama")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(work / "small-llama")
    tok.save_pretrained(work / "small-llama")
EOF
COMMON=(--root "$WORK/run" --set model.target="$WORK/small-llama" --set corpus.demo_size=${DEMO_SIZE:-2000}
        --set select.fraction=0.5 --set train.num_workers=1 --set train.cpus_per_worker=${CPUS:-4} --set train.use_gpu=$GPU
        --set train.micro_batch_size=16 --set train.epochs=10 --set train.checkpoint_every=10 --set train.lr=1e-4)
"$SR" run "${COMMON[@]}" --set 'run.stages=[ingest,sketch,select]'

step "3/5 ZeRO-2 LoRA bf16: 20 steps, then a rerun to 30 that resumes at 20"
"$SR" train "${COMMON[@]}" --set train.max_steps=20
cp "$WORK/run/train/train_summary.json" "$WORK/zero2_first.json"
"$SR" train "${COMMON[@]}" --set train.max_steps=30
"$PY" - "$WORK" "$GPU" <<'EOF'
import json, sys
first = json.load(open(f"{sys.argv[1]}/zero2_first.json"))
s = json.load(open(f"{sys.argv[1]}/run/train/train_summary.json"))
assert first["steps"] == 20 and first["resumed_from_step"] is None, first
assert s["steps"] == 30 and s["resumed_from_step"] == 20, s
assert s["zero_stage"] == 2 and s["dtype"] == ("bfloat16" if sys.argv[2] == "true" else "float32"), s
print("resume ok: 20 -> 30")
EOF

step "4/5 ZeRO-3 full fine-tuning bf16 + gradient checkpointing: 20 steps${OFFLOAD:+ (and with offload)}"
"$PY" - "$WORK" "${OFFLOAD:-0}" "$GPU" <<'EOF'
import json, sys
from spice_ray.config import load_config
from spice_ray.pipeline import RunRoot, init_ray
from spice_ray.train import run_train_stage
work, offload = sys.argv[1], sys.argv[2] == "1"
root = RunRoot(f"{work}/run")
ingest, select, models = (root.manifest(s)["result"] for s in ("ingest", "select", "models"))
init_ray(None)
for name, extra in [("zero3", []), *([("zero3_offload", ["train.offload=true"])] if offload else [])]:
    cfg = load_config(f"{work}/run/config.yaml", ["train.lora=false", "train.zero_stage=null", "train.max_steps=20",
                                                  "train.gradient_checkpointing=true", *extra])
    s = run_train_stage(cfg, records_path=ingest["records"], selection_path=select["selection"],
                        model_path=models["target"], tokenizer_path=models["tokenizer"], out_dir=f"{work}/{name}",
                        max_tokens=cfg.corpus.max_tokens)
    assert s["steps"] == 20 and s["zero_stage"] == 3 and s["dtype"] == ("bfloat16" if sys.argv[3] == "true" else "float32"), s
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(s["model"])  # the gathered 16-bit export loads
    json.dump(s, open(f"{work}/{name}.json", "w"), indent=2)
EOF

step "5/5 eval stage on the GPU"
"$SR" eval "$WORK/run"

step "summary ($((SECONDS - T0)) s)"
"$PY" - "$WORK" <<'EOF'
import json, os, sys
work = sys.argv[1]
runs = {"zero2_lora (steps 21-30)": f"{work}/run/train/train_summary.json", "zero3_full": f"{work}/zero3.json",
        "zero3_full_offload": f"{work}/zero3_offload.json"}
print(f"{'run':28}{'steps':>6}{'tokens/s':>12}{'s/step':>9}{'peak GiB':>10}{'padding':>9}{'loss':>9}")
for name, path in runs.items():
    if os.path.exists(path):
        s = json.load(open(path))
        print(f"{name:28}{s['steps']:>6}{s['tokens_per_s'] or 0:>12.0f}{s['step_seconds'] or 0:>9.3f}"
              f"{s['peak_memory_gb']:>10.2f}{s['padding_fraction'] or 0:>9.1%}{s['loss']:>9.4f}")
ev = json.load(open(f"{work}/run/eval/results.json"))
for name, e in ev["sets"].items():
    print(f"eval {name}: n={e['n']} tokens={e['tokens']} base loss {e['base']['loss']:.4f} -> tuned {e['tuned']['loss']:.4f} ({ev['device']}, {ev['dtype']})")
print("GPU CHECK OK")
EOF
