#!/usr/bin/env bash
# One command for a GPU machine: build the extension, run the tests (GPU ones included),
# the kernel benchmark and the block/model benchmark; logs and JSON into OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [quick|blocks|models|budget|results]
#
# quick (default): build + tests + kernel benchmark + `bench --quick`        (one 10-minute call)
# blocks:          `bench` on every block case, fp32 and bf16                  (one call)
# models:          `bench` on the whole models (torch.compile takes minutes)   (one call)
# budget:          the depth-at-an-8-GB-budget search                          (one call)
# results:         blocks + models + budget in one go, written straight into benchmarks/results/
#                  and the README table regenerated (for a machine without a per-call limit)
# Copy OUTDIR/cuda_*.json of blocks/models/budget into benchmarks/results/ and run
# `python benchmarks/make_table.py` to regenerate the README table.
set -uo pipefail
OUT="${1:?usage: gpu_check.sh OUTDIR [quick|blocks|models|budget|results]}"
WHAT="${2:-quick}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
cat "$OUT/device.txt"

echo "== build"
if ! python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
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
    python -m densenet_fused.tools.cli bench --quick --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30 || rc=1
elif [ "$WHAT" = blocks ]; then
    python -m densenet_fused.tools.cli bench --device cuda --no-budget --cases block --tag blocks --out "$OUT" 2>&1 \
        | tee "$OUT/bench.log" | tail -40 || rc=1
elif [ "$WHAT" = models ]; then
    python -m densenet_fused.tools.cli bench --device cuda --no-budget --cases densenet121_n,densenet201_n,densenet264_n \
        --tag models --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 || rc=1
elif [ "$WHAT" = budget ]; then
    python -m densenet_fused.tools.cli bench --device cuda --budget-only --tag budget --out "$OUT" 2>&1 \
        | tee "$OUT/bench.log" | tail -20 || rc=1
elif [ "$WHAT" = results ]; then
    python -m densenet_fused.tools.cli bench --device cuda --out benchmarks/results 2>&1 | tee "$OUT/bench.log" | tail -40 \
        || rc=1
    python benchmarks/make_table.py || rc=1
    cp benchmarks/results/cuda* "$OUT/" 2>/dev/null
else
    echo "unknown mode $WHAT (quick|blocks|models|budget|results)"; rc=2
fi
exit $rc
