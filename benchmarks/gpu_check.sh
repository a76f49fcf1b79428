#!/usr/bin/env bash
# A GPU machine's whole check in two calls of at most 7 and 6 minutes, everything written under OUT as it
# goes (a call killed at its limit still returns what was done), the most valuable figures first.
#
#   bash benchmarks/gpu_check.sh OUT first  [--dry-run]    about 7 minutes on an H100/H200
#   bash benchmarks/gpu_check.sh OUT second [--dry-run]    about 6 minutes
#
# first:  versions and nvidia-smi; build (all cores); the tests that need CUDA (benchmarks/cuda_tests.py
#         selects them; a crash stops them, its log kept); the three block cases in bf16: fused, fused_graphed,
#         fused_keep_b, torchvision, torchvision_me interleaved; host time per step at N=4 (fused, planned and
#         unplanned, fused_graphed, torchvision); a profiler table of
#         DenseNet-121 block 3; the kernel benchmark; the block cases against torch.compile and
#         torch.compile(mode="reduce-overhead") (with fused and torchvision again, as anchors of the ratios).
# second: build (a no-op on a machine that kept the first call's); densenet121 at N=128 with the eager and
#         graphed providers; the deepest DenseNet-BC under an 8 GB cap (k=12, k=40); densenet121 against
#         torch.compile (default, reduce-overhead, activation_memory_budget 0.3 and 0.05); densenet201 at N=64
#         likewise.
# --dry-run (any machine, no GPU): checks every test id, case, provider and depth the run names, and runs the
#         script end to end with each GPU step replaced by its listing (collected test ids, planned cases).
#
# OUT holds at most 8 files (what a device call returns): summary.txt (one line per step: exit status and
# seconds), build.log, tests.log, log.txt (versions and every benchmark's output), rows.jsonl (one JSON
# record per finished case), plot_steps.png, plot_depth.png, kernels.json (pytest-benchmark) and
# profile_densenet121_block3_n128.txt.  Afterwards:
#   python benchmarks/gpu_run.py merge OUT/rows.jsonl benchmarks/results/<gpu>.json && python benchmarks/make_table.py
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (the call's seconds: 420 first, 360 second),
# GPU_CHECK_BUILD=auto|inplace|staged (auto: inplace when the installed setuptools reads pyproject.toml),
# GPU_CHECK_SKIP=step,step (steps a call already finished, by their summary names: a rerun does the rest).
set -uo pipefail
usage="usage: gpu_check.sh OUT first|second [--dry-run]"
OUT="${1:?$usage}"
MODE="${2:?$usage}"
DRY=0
case "${3:-}" in --dry-run) DRY=1 ;; "") ;; *) echo "$usage"; exit 2 ;; esac
case "$MODE" in first) BUDGET_S="${GPU_CHECK_BUDGET_S:-420}" ;; second) BUDGET_S="${GPU_CHECK_BUDGET_S:-360}" ;;
    *) echo "$usage"; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET  # Triton compiles for the GPU (the CPU tests set it to interpret)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/benchmarks:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
START=$(date +%s)
RESERVE=10  # seconds kept for the last summary lines
MIN_S=20    # a step is not started with less than this
FAILED=0
SUMMARY="$OUT/summary.txt" LOG="$OUT/log.txt" BUILD_LOG="$OUT/build.log" TESTS_LOG="$OUT/tests.log"

note() { echo "$*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_SECONDS LOGFILE COMMAND...: the command under a time limit (the smaller of CAP and what
# is left of the budget), its output appended to LOGFILE as it comes, its last lines printed, one summary line.
# Dry run: the command is a listing, run without a limit; any failure fails the dry run.
run_step() {
    local name=$1 cap=$2 log=$3 t0 left limit rc
    shift 3
    t0=$(date +%s)
    left=$((BUDGET_S - (t0 - START) - RESERVE))
    limit=$((cap < left ? cap : left))
    case ",${GPU_CHECK_SKIP:-}," in *",$name,"*) note "SKIPPED $name: named in GPU_CHECK_SKIP"; return 0 ;; esac
    if [ "$DRY" = 1 ]; then
        limit=3600
    elif [ "$limit" -lt "$MIN_S" ]; then
        note "SKIPPED $name: $((left + RESERVE)) s left of $BUDGET_S"
        return 0
    fi
    export STEP_DEADLINE=$((t0 + limit - 25))  # pytest steps stop starting tests then, and still report
    echo "===== $name ($(date -u +%FT%TZ), limit ${limit}s): $*" >> "$log"
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log" | tail -n 30
    rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || FAILED=1
    note "$name: exit $rc$([ "$rc" = 124 ] && echo " (stopped at its ${limit}s limit)") after $(($(date +%s) - t0)) s," \
        "$((BUDGET_S - ($(date +%s) - START))) s left; output in $(basename "$log")"
    return "$rc"
}

# --------------------------------------------------------------------------------------------------- steps
versions() {
    if [ "$DRY" = 1 ]; then
        echo "would run: nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv"
    else
        nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    "$PY" - <<'EOF'
import platform, setuptools, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, setuptools {setuptools.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF
    (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not on PATH"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|torchvision|pytest|pytest-xdist|pytest-timeout|pytest-benchmark|setuptools|ninja|matplotlib) " || true
}

# the extension, built in place (tests and benchmarks import the source tree); CUDA required.  pyproject.toml
# needs setuptools >= 77 (PEP 639 license fields): with an older one, setup.py builds from a folder without it.
build() {
    local how="${GPU_CHECK_BUILD:-auto}" arch="" stage
    if [ "$how" = auto ]; then
        if "$PY" -c "from setuptools.config.pyprojecttoml import read_configuration as r; r('pyproject.toml')"; then
            how=inplace
        else
            echo "the installed setuptools cannot read pyproject.toml: building from a folder without it"
            how=staged
        fi
    fi
    [ "$DRY" = 1 ] || arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    echo "build: $how, TORCH_CUDA_ARCH_LIST=${arch:-(this GPU)}, MAX_JOBS=$MAX_JOBS"
    case "$how" in
        inplace) set -- "$PY" setup.py build_ext --inplace ;;
        staged) stage=$(mktemp -d) && mkdir -p build && ln -s "$ROOT/setup.py" "$ROOT/csrc" "$ROOT/densenet_fused" \
                    "$ROOT/build" "$stage/" || return 1
                cd "$stage" || return 1
                set -- "$PY" setup.py build_ext --inplace ;;
        *) echo "GPU_CHECK_BUILD=$how: expected auto, inplace or staged"; return 2 ;;
    esac
    if [ "$DRY" = 1 ]; then
        echo "would run in $PWD: DENSENET_FUSED_FORCE_CUDA=1 $*"
    else
        DENSENET_FUSED_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$@" || return 1
    fi
    cd "$ROOT" || return 1
    [ "$DRY" = 1 ] || "$PY" -c "import densenet_fused as d; assert d.WITH_CUDA, 'built without CUDA'; print('extension', d.__file__, 'WITH_CUDA', d.WITH_CUDA)"
}

# the tests that need CUDA, and tests/test_build.py (the CUDA build itself)
gpu_tests() {
    local sel=(-p cuda_tests --cuda-only --cuda-also tests/test_build.py -p no:cacheprovider tests)
    if [ "$DRY" = 1 ]; then
        "$PY" -m pytest "${sel[@]}" --as-if-cuda --collect-only -q
        return
    fi
    local extra=()
    "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
    "$PY" -m pytest "${sel[@]}" -q -rfEs --durations 15 --deadline "$STEP_DEADLINE" "${extra[@]}"
}

kernels() {
    if [ "$DRY" = 1 ]; then
        "$PY" -m pytest -p cuda_tests --as-if-cuda --collect-only -q -p no:cacheprovider benchmarks/ops
        return
    fi
    "$PY" -m pytest -q -p no:cacheprovider -p cuda_tests --deadline "$STEP_DEADLINE" benchmarks/ops \
        --benchmark-json="$OUT/kernels.json" &&
        "$PY" benchmarks/summarize_kernels.py "$OUT/kernels.json"
}

dry() { [ "$DRY" = 1 ] && echo --dry-run; }
export -f versions build gpu_tests kernels
export DRY PY OUT ROOT

BLOCKS=densenet121_block3_n128,densenet121_block1_n128,densenet_bc100_k12_block1_n64
EAGER=fused,fused_graphed,fused_keep_b,torchvision,torchvision_me
COMPILED=fused,torchvision,torchvision_compile,torchvision_graphed
BUDGETS=torchvision_compile_budget0.3,torchvision_compile_budget0.05
K12_DEPTHS=100,250,400,1000,1204,1600,2002,2500,3004
K40_DEPTHS=100,190,400,502,802,1000,1204

note "== gpu_check.sh $MODE$([ "$DRY" = 1 ] && echo " (dry run)"): budget $BUDGET_S s, $(date -u +%FT%TZ)"
run_step versions 30 "$LOG" versions
run_step build 240 "$BUILD_LOG" build || { [ "$DRY" = 1 ] || { note "build failed: see build.log"; exit 1; }; }
if [ "$MODE" = first ]; then
    run_step gpu_tests 110 "$TESTS_LOG" gpu_tests
    run_step blocks 100 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag blocks --cases "$BLOCKS" \
        --providers "$EAGER" $(dry)
    run_step host_n4 40 "$LOG" "$PY" benchmarks/gpu_run.py host "$OUT" --case densenet121_block3_n128 --batch 4 \
        --providers fused,fused_unplanned,fused_graphed,torchvision $(dry)
    run_step profile 40 "$LOG" "$PY" benchmarks/profile_step.py "$OUT" --case densenet121_block3_n128 \
        --providers fused,torchvision $(dry)
    run_step kernels 45 "$LOG" kernels
    run_step blocks_compiled 600 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag blocks_compiled \
        --cases "$BLOCKS" --providers "$COMPILED" $(dry)
else
    run_step densenet121 90 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag models --cases densenet121_n128 \
        --providers "$EAGER" $(dry)
    run_step depth_k12 60 "$LOG" "$PY" benchmarks/gpu_run.py budget "$OUT" --growth 12 --depths "$K12_DEPTHS" \
        --providers fused,torchvision,torchvision_me $(dry)
    run_step depth_k40 45 "$LOG" "$PY" benchmarks/gpu_run.py budget "$OUT" --growth 40 --depths "$K40_DEPTHS" \
        --providers fused,torchvision,torchvision_me $(dry)
    run_step densenet121_compiled 150 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag models_compiled \
        --cases densenet121_n128 --providers "$COMPILED" $(dry)
    run_step densenet121_budgets 150 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag models_budgets \
        --cases densenet121_n128 --providers "fused,torchvision,$BUDGETS" $(dry)
    run_step densenet201 600 "$LOG" "$PY" benchmarks/gpu_run.py bench "$OUT" --tag models --cases densenet201_n64 \
        --providers "$EAGER,torchvision_compile,torchvision_graphed,$BUDGETS" $(dry)
fi
note "== done after $(($(date +%s) - START)) s$([ "$FAILED" = 1 ] && echo ", some step failed (see above)")"
exit "$FAILED"
