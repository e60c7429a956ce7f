#!/usr/bin/env bash
# The prepared GPU suite (benchmarks/gpu_suite.py): ZeRO-2 LoRA on a Qwen2-7B shape, ZeRO-3 full
# fine-tuning on a Qwen2-1.5B shape, the sketch worker on a Qwen2-0.5B shape, the selection at N = 1M;
# one markdown table, in ≤ 8 minutes on one H200. Exits non-zero if a row could not be measured.
#
#   bash benchmarks/gpu_suite.sh [gpu_suite.py args...]    e.g. --rows sketch,select,picks | --dry-run
#
# env: PYTHON (default .venv/bin/python if present, else python3)  OUT (output folder; default
#   build/gpu_suite)  SUITE_TIMEOUT=530 (seconds; on expiry the driver is sent SIGTERM, writes what it
#   measured and prints the table)
# On a lent GPU machine (no network), with the device kit (benchmarks/README.md):
#   bash benchmarks/device_kit.sh install build/device_kit /tmp/kit &&
#   PYTHONPATH=/tmp/kit PATH=/tmp/kit/bin:$PATH bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
OUTDIR=${OUT:-build/gpu_suite}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spice-ray/torch_extensions}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout --signal=TERM --kill-after=30 "${SUITE_TIMEOUT:-530}" "$PY" benchmarks/gpu_suite.py --out "$OUTDIR" "$@" 2>&1 \
  | tee "$OUTDIR/gpu_suite.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ge 124 ] && [ -f "$OUTDIR/gpu_suite.json" ]; then  # killed: the table of what was written
  echo "gpu_suite.py ended with $rc (timeout ${SUITE_TIMEOUT:-530} s?); the rows measured so far:"
  "$PY" benchmarks/gpu_suite.py --out "$OUTDIR" --report-only
fi
exit "$rc"
