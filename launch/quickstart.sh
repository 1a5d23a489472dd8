#!/usr/bin/env bash
# Quickstart: set everything up, then run the demo.
# Until the training entry points land, the demo is the optimizer benchmark on GPT-2 124M
# shapes (a few minutes on 2 CPU cores); its table is written to runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python tools/bench_optimizers.py --out runs/quickstart "$@"
