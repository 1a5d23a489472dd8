"""Where everything lives inside a checkpoint directory ``step_00000100/``.

Written by every engine:
    trainer.json        step, data position, counters, world size, engine (written by rank 0)
    config.json         the run config that wrote the checkpoint (to tell what changed on resume)
    rng_rank{r}.pt      each rank's RNG states
    manifest.json       size and sha256 of every other file; written last, atomically
Engine specific:
    single / DDP        model.pt, optimizer.pt, scheduler.pt
    FSDP2               dcp/ (torch.distributed.checkpoint), scheduler.pt, optimizer_full.pt for
                        memopt optimizers (their state by parameter name)
    DeepSpeed           deepspeed/ (DeepSpeed's own tag directory), latest, deepspeed_world.json,
                        memopt_full.pt for memopt optimizers under ZeRO >= 1 (resumes anywhere),
                        model_full.pt under tensor parallelism (full TP=1 weights by name: what
                        export reads, as DeepSpeed writes one model file per TP rank)
Under tensor parallelism the torch and DCP formats hold full (TP=1) tensors by name, gathered
from the TP slices on save: the files are those a TP=1 run writes (pretrain/models/tp_state.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from pretrain.errors import CheckpointError

TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
DCP_DIR = "dcp"
OPTIMIZER_FULL_FILE = "optimizer_full.pt"
DEEPSPEED_TAG = "deepspeed"
DEEPSPEED_WORLD_FILE = "deepspeed_world.json"
DEEPSPEED_FULL_FILE = "memopt_full.pt"
DEEPSPEED_MODEL_FULL_FILE = "model_full.pt"

_NAME = re.compile(r"^step_(\d{8})$")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def detect_format(ckpt: Path) -> str:
    """``"torch"`` (single/DDP), ``"dcp"`` (FSDP2) or ``"deepspeed"``."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    if (ckpt / MODEL_FILE).is_file():
        return "torch"
    if (ckpt / DCP_DIR).is_dir():
        return "dcp"
    if (ckpt / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    raise CheckpointError(f"{ckpt}: neither {MODEL_FILE}, {DCP_DIR}/ nor {DEEPSPEED_TAG}/ found: "
                          "not a checkpoint of this framework")
