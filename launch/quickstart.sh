#!/usr/bin/env bash
# Quickstart: set up, prepare the bundled corpus, train the demo GPT with AdaLomo under DeepSpeed
# ZeRO-2 on 2 processes (CPU here; GPUs where there are some) for a few minutes, then print a
# summary (loss drop, tokens/s, peak memory) and write a loss-curve PNG.
#
#   bash launch/quickstart.sh                 # everything, output in runs/quickstart/
#   bash launch/quickstart.sh train.steps=40  # any config override is passed on
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
echo "[quickstart] preparing the bundled corpus (once, ~15 s)"
.venv/bin/python tools/prepare_corpus.py
out=runs/quickstart
rm -rf "$out"  # a fresh demo each time (the quickstart is not a resumable run)
echo "[quickstart] training: deepspeed --num_gpus 2 launch/pretrain_gpt.py --config configs/quickstart.yaml $*"
PATH="$PWD/.venv/bin:$PATH" deepspeed --num_gpus 2 launch/pretrain_gpt.py --config configs/quickstart.yaml \
    output_dir="$out" "$@"
echo "[quickstart] summary"
.venv/bin/python tools/summarize_run.py "$out"
