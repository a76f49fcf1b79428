#!/usr/bin/env bash
# One command for a GPU machine: build the extension, run the tests (GPU ones included),
# the kernel benchmark and the block/model benchmark; logs and JSON into OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [quick|full|budget]
#
# quick (default): build + tests + kernel benchmark + `bench --quick`   (fits a 10-minute call)
# full:            `bench` on every case, fp32 and bf16, with the depth-at-budget search
# budget:          only the depth-at-a-memory-budget search
# Results of a full run belong in benchmarks/results/<device>.json (see benchmarks/make_table.py).
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUTDIR [quick|full|budget]}"
WHAT="${2:-quick}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
cat "$OUT/device.txt"

echo "== build"
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
fi
python -c "import densenet_fused; print('extension WITH_CUDA =', densenet_fused.WITH_CUDA)"

rc=0
if [ "$WHAT" = quick ]; then
    echo "== tests"
    python -m pytest tests -q -rs 2>&1 | tee "$OUT/tests.log" | tail -25 || rc=1
    echo "== kernel benchmark"
    python -m pytest benchmarks/ops -q --benchmark-json="$OUT/kernels.json" 2>&1 | tail -5 || rc=1
    python benchmarks/summarize_kernels.py "$OUT/kernels.json" || rc=1
    echo "== bench --quick"
    python -m densenet_fused.cli bench --quick --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30 || rc=1
elif [ "$WHAT" = full ]; then
    python -m densenet_fused.cli bench --device cuda --no-budget --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 || rc=1
elif [ "$WHAT" = budget ]; then
    python -m pytest benchmarks/test_depth_budget.py -q --benchmark-json="$OUT/budget.json" 2>&1 | tail -5 || rc=1
fi
exit $rc
