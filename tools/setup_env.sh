#!/usr/bin/env bash
# Create ./.venv and install the project with everything the tests, demo and tools need.
# Idempotent: a second run only checks that the install is complete.
# On a machine without an NVIDIA GPU the CPU build of torch is pinned (tools/constraints-cpu.txt);
# on a GPU machine torch comes from your index (set MEMOPT_CONSTRAINTS to override either way).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ -z "${MEMOPT_CONSTRAINTS+x}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        MEMOPT_CONSTRAINTS=""
    else
        MEMOPT_CONSTRAINTS="tools/constraints-cpu.txt"
    fi
fi
PIP_ARGS=(--disable-pip-version-check -q)
[ -n "$MEMOPT_CONSTRAINTS" ] && PIP_ARGS+=(-c "$MEMOPT_CONSTRAINTS")
stamp=.venv/.memopt-installed
want=$(cat setup.cfg tools/constraints-cpu.txt | sha1sum | cut -c1-12)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install "${PIP_ARGS[@]}" --upgrade pip
    if [ -n "$MEMOPT_CONSTRAINTS" ]; then
        # torch first, from the pinned CPU wheel, so nothing later resolves a CUDA build.
        .venv/bin/python -m pip install "${PIP_ARGS[@]}" torch
    fi
    .venv/bin/python -m pip install "${PIP_ARGS[@]}" -e ".[all]"
    echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
