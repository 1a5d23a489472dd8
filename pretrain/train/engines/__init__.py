"""Engines: single process, DDP, FSDP2 and DeepSpeed behind one protocol (``base.Engine``)."""
from __future__ import annotations

import os

from .base import Engine, use_fused_backward
from .torch_engines import DDPEngine, FSDP2Engine, SingleEngine

__all__ = ["DDPEngine", "Engine", "FSDP2Engine", "SingleEngine", "build_engine", "select_engine_kind",
           "use_fused_backward"]


def select_engine_kind(cfg) -> str:
    kind = cfg.engine.kind
    if kind != "auto":
        return kind
    if os.environ.get("MEMOPT_LAUNCHED_BY_DEEPSPEED") == "1":
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def build_engine(model, cfg, kind: str) -> Engine:
    if kind == "single":
        return SingleEngine(model, cfg)
    if kind == "ddp":
        return DDPEngine(model, cfg)
    if kind == "fsdp2":
        return FSDP2Engine(model, cfg)
    if kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine  # deepspeed is imported only when used

        return DeepSpeedEngine(model, cfg)
    raise ValueError(f"unknown engine {kind!r}")
