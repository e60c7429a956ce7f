#!/usr/bin/env bash
# GPU measurements for the sketch (issue #3) and the selection (issue #4) on one CUDA GPU, in a few
# minutes. Needs torch with CUDA, transformers, peft, tokenizers, pyarrow, numpy, pydantic and
# pytest; not Ray or DeepSpeed (the train stage on a GPU is in benchmarks/gpu_suite.sh).
#
#   bash benchmarks/gpu_bench.sh [LOGDIR]          (env: PYTHON=python3)
#
# 1. the CUDA selection tests (eager engine on cuda == numpy picks)
# 2. sketch vs the LESS-style reference and vs a plain training step, on the GPU: the benchmark's
#    default model (hidden 256, 4 layers) and a larger one (hidden 1024, 8 layers), d = 8192
# 3. SPICE (λ = 0.1, 10% budget, d = 256) with the eager engine on cuda at N = 100k (picks checked
#    against the numpy lazy engine) and N = 1M
# Each step has its own time limit, so one slow step does not hide the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=$(mkdir -p "${1:-/tmp/spice-gpu-bench}" && cd "${1:-/tmp/spice-gpu-bench}" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() { printf '\n===== %s (%ds)\n' "$*" "$SECONDS"; }

step "0 environment"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "1 CUDA selection tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/unit/test_select_engines.py -k "cuda or torch or every_method" \
  2>&1 | tee "$LOG/select_tests.log"

step "2a sketch vs LESS reference, hidden 256 x 4 layers, d=8192"
timeout 120 $PY benchmarks/sketch_throughput.py --device cuda --no-bergson --rounds 3 2>&1 | tee "$LOG/sketch_small.log"

step "3 SPICE eager on cuda, N=100k (vs numpy lazy) and 1M, d=256"
timeout 300 $PY benchmarks/select_scaling.py --parts device --device cuda --sizes 100000,1000000 \
  2>&1 | tee "$LOG/select_cuda.log"

step "2b sketch vs LESS reference, hidden 1024 x 8 layers, d=8192"
timeout 200 $PY benchmarks/sketch_throughput.py --device cuda --no-bergson --rounds 2 --hidden 1024 --mlp 2816 \
  --layers 8 --n 128 2>&1 | tee "$LOG/sketch_large.log"

step "done"
