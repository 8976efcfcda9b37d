#!/usr/bin/env bash
# GPU check, one command on a machine with an NVIDIA GPU (about 5-8 minutes):
#   1. the CUDA tests (`pytest -m cuda`: --device cuda trains and agrees with the CPU, states
#      move between cuda and cpu, what a GPU run saves loads on a CPU-only machine);
#   2. GPU figures from benchmarks/speed.py --device cuda --quick: SAC updates/s at 2x256 and
#      2x512 hidden (batch 256), ensemble fit time on 20k Hopper-dim transitions, model rollout
#      throughput, and seconds per 1,000 Hopper env steps at the paper preset (and mbrl-lib's).
#
#   scripts/gpu-check.sh
#
# It uses the first GPU that CUDA_VISIBLE_DEVICES leaves visible (all of them by default).
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_OUT (default
# bench_out/gpu: speed.json and the fitted ensemble go there); GPU_CHECK_BENCH_S (default 420:
# the benchmark is stopped after that many seconds, keeping the figures printed so far);
# GPU_CHECK_FULL=1 runs every SAC update of the rounds instead of 1/10 scaled (adds minutes).
# Exit status: 0 all passed; 1 a test or the benchmark failed; 2 no NVIDIA GPU / CUDA here.
# Run nothing else on the GPU meanwhile: the figures would measure both.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${GPU_CHECK_OUT:-bench_out/gpu}"
BENCH_S="${GPU_CHECK_BENCH_S:-420}"

fail() { echo "gpu-check: $*" >&2; exit 2; }

[ $# -eq 0 ] || fail "no arguments (choose the GPU with CUDA_VISIBLE_DEVICES)"
command -v nvidia-smi >/dev/null 2>&1 ||
    fail "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader >/dev/null 2>&1 ||
    fail "nvidia-smi finds no usable NVIDIA GPU (driver not loaded, or no device visible here)"
"$PYTHON" - <<'EOF' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} cannot use CUDA here (torch.version.cuda="
             f"{torch.version.cuda}: a CPU-only wheel, or CUDA_VISIBLE_DEVICES hides every GPU); "
             "install a CUDA build of torch")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
EOF

echo "== GPU"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv

echo "== CUDA tests (pytest -m cuda)"
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# -rs lists skips: on a GPU machine a cuda test that skips is a failure of this check
if ! "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider -rs tests | tee "$log"; then
    echo "gpu-check: the CUDA tests failed" >&2
    exit 1
fi
if grep -q "skipped" "$log"; then
    echo "gpu-check: CUDA tests were skipped on a machine that has a GPU" >&2
    exit 1
fi
echo "(tests: $(( $(date +%s) - start )) s)"

echo "== GPU figures (benchmarks/speed.py --device cuda --quick; stops after ${BENCH_S} s)"
extra=()
[ "${GPU_CHECK_FULL:-0}" = 1 ] && extra+=(--full-rounds)
start=$(date +%s)
set +e
timeout --signal=INT "$BENCH_S" "$PYTHON" benchmarks/speed.py --device cuda --quick \
    --threads "$(nproc)" --out "$OUT" ${extra[@]+"${extra[@]}"}
rc=$?
set -e
if [ "$rc" = 124 ] || [ "$rc" = 130 ]; then
    echo "gpu-check: the benchmark ran past ${BENCH_S} s and was stopped; the figures above are" \
         "what it measured (raise GPU_CHECK_BENCH_S for the rest)" >&2
    exit 1
elif [ "$rc" != 0 ]; then
    echo "gpu-check: the benchmark failed (exit $rc)" >&2
    exit 1
fi
echo "(benchmark: $(( $(date +%s) - start )) s; figures in $OUT/speed.json)"
echo "gpu-check: passed"
