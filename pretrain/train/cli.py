"""Command line of launch/pretrain_gpt.py and launch/pretrain_bert.py.

    python launch/pretrain_gpt.py --config configs/gpt_demo.yaml train.steps=50
    torchrun --nproc_per_node 2 launch/pretrain_gpt.py --config ... engine.kind=fsdp2
    deepspeed --num_gpus 2 launch/pretrain_gpt.py --config configs/gpt_demo_zero2.yaml

Config errors are reported in one line before any work starts (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _setup_cpu_environment() -> None:
    # Offline by design: never reach for the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass


def main(argv: list[str] | None, kind: str) -> int:
    ap = argparse.ArgumentParser(prog=f"pretrain_{kind}.py", description=f"Pretrain a Megatron-style {kind.upper()}.")
    ap.add_argument("--config", help="YAML run config (see configs/)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    _setup_cpu_environment()
    from pretrain.train.launch_env import configure_from_cli

    configure_from_cli()  # RANK/WORLD_SIZE/MASTER_ADDR from MPI or srun variables when a launcher did not set them
    if args.local_rank is not None:  # only the deepspeed launcher passes --local_rank
        os.environ["MEMOPT_LAUNCHED_BY_DEEPSPEED"] = "1"
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from pretrain.config import ConfigError, load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pretrain.train.tasks import TASKS
    from pretrain.train.trainer import TrainingError, train

    try:
        summary = train(cfg, TASKS[kind])
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": summary}))
    return 0
