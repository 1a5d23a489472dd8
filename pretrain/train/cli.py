"""Command line of launch/pretrain_gpt.py and launch/pretrain_bert.py.

    python launch/pretrain_gpt.py --config configs/gpt_demo.yaml train.steps=50
    torchrun --nproc_per_node 2 launch/pretrain_gpt.py --config ... engine.kind=fsdp2
    deepspeed --num_gpus 2 launch/pretrain_gpt.py --config configs/gpt_demo_zero2.yaml
    deepspeed --num_gpus 2 launch/pretrain_gpt.py --config ... --deepspeed --deepspeed_config ds.json

``--deepspeed`` / ``--deepspeed_config`` (Megatron-DeepSpeed's flags) are engine.kind=deepspeed and
engine.deepspeed_config=...; the JSON's "optimizer" section selects the optimizer
(pretrain/deepspeed_json.py).

A usage, launch or config error is one line before any work starts (exit status 2); an expected
failure during the run (bad data, a corrupt checkpoint, a diverging loss) is one line with exit
status 1. ``--debug`` prints the traceback instead. Under a multi-process launcher every rank
reports its own error.
"""
from __future__ import annotations

import argparse
import json
import os

from pretrain.cli_errors import ArgumentParser, add_debug_flag, run_cli


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
    ap = ArgumentParser(prog=f"pretrain_{kind}.py", description=f"Pretrain a Megatron-style {kind.upper()}.")
    ap.add_argument("--config", help="YAML run config (see configs/); required")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed (engine.kind=deepspeed)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", metavar="DS_JSON",
                    help="a DeepSpeed JSON (engine.deepspeed_config); its optimizer section selects the optimizer")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    if not args.config:
        # Without one the defaults would quietly train the demo model into runs/default.
        ap.error(f"--config is required (e.g. --config configs/{kind}_demo.yaml)")
    args.overrides = _megatron_deepspeed_flags(ap, args)

    from pretrain.config import ConfigError
    from pretrain.train.launch_env import LaunchEnvError

    return run_cli(lambda: _run(args, kind), debug=args.debug, usage=(ConfigError, LaunchEnvError),
                   also=(ValueError, FileNotFoundError))


def _megatron_deepspeed_flags(ap, args) -> list:
    """The overrides with the DeepSpeed flags as engine.* keys; the same key given both ways
    with different values is a usage error rather than one silently winning."""
    flags = {}
    if args.deepspeed:
        flags["engine.kind"] = "deepspeed"
    if args.deepspeed_config:
        flags["engine.deepspeed_config"] = args.deepspeed_config
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() in flags and value.strip() != flags[key.strip()]:
            ap.error(f"{item} disagrees with --{'deepspeed' if key.strip() == 'engine.kind' else 'deepspeed_config'}")
    return [f"{k}={v}" for k, v in flags.items()] + list(args.overrides)


def _run(args, kind: str) -> int:
    _setup_cpu_environment()
    from pretrain.train.launch_env import setup_launch_env

    setup_launch_env()  # RANK/WORLD_SIZE/MASTER_ADDR from MPI or srun variables when a launcher did not set them
    if args.local_rank is not None:  # only the deepspeed launcher passes --local_rank
        os.environ["MEMOPT_LAUNCHED_BY_DEEPSPEED"] = "1"
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from pretrain.config import load_run_config

    cfg = load_run_config(args.config, args.overrides, kind=kind)

    from pretrain.train.tasks import TASKS
    from pretrain.train.trainer import train

    summary = train(cfg, TASKS[kind])
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"summary": summary}))
    return 0
