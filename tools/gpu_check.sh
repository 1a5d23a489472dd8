#!/usr/bin/env bash
# The GPU checks of memopt's sync-free path, in one go (< 8 minutes on one H100/H200-class GPU):
#   1. the CUDA test subset: no host sync in step() / fused_backward() under
#      torch.cuda.set_sync_debug_mode("error"), parity with the CPU reference path, kernel
#      launches per step independent of depth (tests/memopt/test_cuda.py), plus the CPU-side foreach tests;
#   2. tools/bench_optimizers.py --device cuda, fp32 and bf16, GPT-2 124M shapes, both memopt paths.
# Writes docs/benchmarks/gpu.md (and the benchmarks' JSON next to it).
#
#   bash tools/gpu_check.sh            # from the repository root; PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=docs/benchmarks
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY; nothing written" >&2
    exit 2
fi
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
START=$(date +%s)

timeout 300 "$PY" -m pytest tests/memopt/test_cuda.py tests/memopt/test_foreach.py -q -rfE -p no:cacheprovider \
    > "$TMP/tests.txt" 2>&1
TESTS_RC=$?

BENCH_RC=0
for DT in float32 bfloat16; do
    timeout 150 "$PY" tools/bench_optimizers.py --device cuda --dtype "$DT" --paths both \
        --warmup 3 --steps 10 --out "$TMP" --name "gpu_$DT" > "$TMP/bench_$DT.log" 2>&1
    rc=$?
    # Exit 1 is the benchmark's verdict "a memopt row is slower than a peer": reported, not fatal.
    [ "$rc" -le 1 ] || BENCH_RC=$rc
    [ -f "$TMP/gpu_$DT.json" ] && cp "$TMP/gpu_$DT.json" "$OUT/gpu_$DT.json"
done

{
    echo "# memopt on a GPU: sync-free path checks and optimizer step times"
    echo
    echo "Written by \`bash tools/gpu_check.sh\` on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo "Device: $DEVICE; torch $TORCH; took $(( $(date +%s) - START )) s."
    echo
    echo "## CUDA tests (tests/memopt/test_cuda.py, tests/memopt/test_foreach.py): exit status $TESTS_RC"
    echo
    echo '```'
    tail -n 40 "$TMP/tests.txt"
    echo '```'
    for DT in float32 bfloat16; do
        echo
        if [ -f "$TMP/gpu_$DT.md" ]; then
            sed 's/^# /## /' "$TMP/gpu_$DT.md"
        else
            echo "## Benchmark $DT: did not finish"
            echo
            echo '```'
            tail -n 20 "$TMP/bench_$DT.log"
            echo '```'
        fi
    done
} > "$OUT/gpu.md"
echo "gpu_check: wrote $OUT/gpu.md (tests exit $TESTS_RC, benchmarks exit $BENCH_RC)"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
