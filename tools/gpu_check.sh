#!/usr/bin/env bash
# memopt's GPU checks in one go, in under 8 minutes on one H100/H200-class GPU (every piece has a
# time cap, and the pieces share one 460 s budget, so the whole run stays under 8 minutes):
#   1. the CUDA test subset (cap 200 s):
#      tests/memopt/test_cuda.py: no host sync in step() and fused_backward() under
#        torch.cuda.set_sync_debug_mode("error"), the sync-free path vs the CPU reference path,
#        kernel launches per step independent of depth;
#      tests/memopt/test_triton_kernels.py: the Triton kernels, compiled for this GPU, vs the torch
#        reference path (<= 1e-6 relative, non-finite gradients skipped), fused=True end to end,
#        no host sync inside the kernels' wrappers;
#      tests/memopt/test_fused_sync_free.py: fused=True (Triton) with no host sync in step() and
#        fused backward under set_sync_debug_mode("error"), vs the reference path;
#   2. tools/bench_optimizers.py --device cuda, fp32 and bf16: GPT-2 124M shapes with every memopt
#      path (foreach=False, foreach=True, fused=True) and the peers (torch AdamW fused and foreach,
#      torch Adafactor, transformers Adafactor, came_pytorch, lomo_optim); then the 1.3B shapes
#      (24 layers, hidden 2048; ~75 GB in fp32) for AdamW, Adafactor and AdaLomo, default paths:
#      the targets "Adafactor/AdaLomo step <= 1.0x AdamW(fused)";
#   3. tools/bench_fused_backward.py --device cuda (bf16, GPT-2 124M shapes, batch 8 x 512): a
#      fused-backward training step vs backward + step (target: no slower).
# Writes docs/benchmarks/gpu.md (and each benchmark's JSON as docs/benchmarks/gpu_*.json).
#
#   bash tools/gpu_check.sh            # from the repository root; PYTHON=... to pick the interpreter
#   GPU_CHECK_BUDGET=900 bash tools/gpu_check.sh   # a slower GPU: a larger total budget (seconds)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=docs/benchmarks
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# The compiled Triton kernels, never the interpreter (tests/conftest.py sets it only without CUDA).
export TRITON_INTERPRET=0
BUDGET=${GPU_CHECK_BUDGET:-460}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY; nothing written" >&2
    exit 2
fi
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
TRITON=$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo "not installed")
START=$(date +%s)

# cap_for CAP: the piece's cap, or what is left of the budget if that is less (0: no time left).
cap_for() {
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$left" -lt "$1" ] && echo $(( left > 0 ? left : 0 )) || echo "$1"
}

CAP=$(cap_for 200)
timeout "$CAP" "$PY" -m pytest tests/memopt/test_cuda.py tests/memopt/test_triton_kernels.py \
    tests/memopt/test_fused_sync_free.py \
    tests/memopt/test_stochastic_rounding.py::test_cuda_rounds_the_same_bits_as_cpu_without_a_host_sync \
    -q -rfEs -p no:cacheprovider > "$TMP/tests.txt" 2>&1
TESTS_RC=$?
[ "$TESTS_RC" -eq 124 ] && echo "(stopped by its ${CAP} s cap)" >> "$TMP/tests.txt"

BENCH_RC=0
# bench NAME CAP ARGS...: one benchmark run; exit 1 is its verdict (a target missed), reported, not fatal.
bench() {
    local name=$1 cap tool=tools/bench_optimizers.py
    cap=$(cap_for "$2")
    shift 2
    [ "$name" = gpu_fused_backward ] && tool=tools/bench_fused_backward.py
    if [ "$cap" -lt 15 ]; then
        echo "skipped: the ${BUDGET} s budget was spent" > "$TMP/$name.log"
        return
    fi
    timeout "$cap" "$PY" "$tool" --device cuda --out "$TMP" --name "$name" "$@" > "$TMP/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] && echo "(stopped by its ${cap} s cap)" >> "$TMP/$name.log"
    [ "$rc" -le 1 ] || BENCH_RC=$rc
    [ -f "$TMP/$name.json" ] && cp "$TMP/$name.json" "$OUT/$name.json"
}
# In order of importance: what the budget cannot fit any more is reported as skipped. The first
# run's cap includes compiling the Triton kernels and, with DeepSpeed installed, its CPU Adam op
# (the --paths all row, left out on CUDA tensors but built first).
RUNS=(gpu_float32 gpu_bfloat16 gpu_fused_backward gpu_1p3b_float32 gpu_1p3b_bfloat16)
# --paths all (+ fused=True rows) where this checkout's benchmark has it, else both memopt paths.
PATHS=both
"$PY" tools/bench_optimizers.py --help 2>/dev/null | grep -q "{default,both,all}" && PATHS=all
bench gpu_float32 100 --dtype float32 --paths "$PATHS" --warmup 3 --steps 10
bench gpu_bfloat16 60 --dtype bfloat16 --paths "$PATHS" --warmup 3 --steps 10
bench gpu_fused_backward 60 --dtype bfloat16 --warmup 3 --steps 10
bench gpu_1p3b_float32 80 --dtype float32 --layers 24 --hidden 2048 --only adamw adafactor adalomo --warmup 2 --steps 7
bench gpu_1p3b_bfloat16 60 --dtype bfloat16 --layers 24 --hidden 2048 --only adamw adafactor adalomo --warmup 2 --steps 7

{
    echo "# memopt on a GPU: CUDA tests and optimizer step times"
    echo
    echo "Written by \`bash tools/gpu_check.sh\` on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo "Device: $DEVICE; torch $TORCH; triton $TRITON; took $(( $(date +%s) - START )) s (budget $BUDGET s)."
    echo
    echo "## CUDA tests (tests/memopt/test_cuda.py, test_triton_kernels.py, test_fused_sync_free.py): exit status $TESTS_RC"
    echo
    echo '```'
    tail -n 40 "$TMP/tests.txt"
    echo '```'
    for name in "${RUNS[@]}"; do
        echo
        if [ -f "$TMP/$name.md" ]; then
            sed 's/^# /## /' "$TMP/$name.md"
        else
            echo "## $name: did not finish"
            echo
            echo '```'
            tail -n 20 "$TMP/$name.log"
            echo '```'
        fi
    done
} > "$OUT/gpu.md"
echo "gpu_check: wrote $OUT/gpu.md in $(( $(date +%s) - START )) s (tests exit $TESTS_RC, benchmarks exit $BENCH_RC)"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
