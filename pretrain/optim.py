"""A run config's optimizer and learning-rate schedule, built one way for everyone.

The engines (``pretrain.train.engines``) build them to train; the HF import
(``pretrain.export.hf.import_gpt2``) builds them fresh to write the ``optimizer.pt`` /
``scheduler.pt`` a resumed run loads. The import must not depend on the training package, and a
second recipe would drift from this one (a resumed optimizer takes its hyperparameters from the
saved file, not from the run config), so the recipe lives here, below both.
"""
from __future__ import annotations

import math

import torch

from memopt.registry import FUSED_BACKWARD


def optimizer_kwargs(cfg) -> dict:
    """Hyperparameters for memopt.create_optimizer from the run config."""
    kw = dict(cfg.optimizer.hparams)
    kw["lr"] = cfg.optimizer.lr
    if cfg.optimizer.name == "adafactor":
        # The run's schedule drives the lr; Adafactor's own time-dependent relative step is
        # there for those who ask for it (hparams: {relative_step: true}, lr then ignored).
        kw.setdefault("relative_step", False)
        if kw["relative_step"]:
            kw["lr"] = None
    # Fused-backward optimizers clip inside backward (two-pass); the others are clipped by the engine.
    if cfg.optimizer.name in FUSED_BACKWARD and cfg.train.clip_grad_norm is not None:
        kw.setdefault("clip_grad_norm", cfg.train.clip_grad_norm)
    return kw


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the update made at 0-based ``step``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float):
    """Linear warm-up, then cosine / linear decay to ``min_lr_ratio * lr``, or constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, decay, min_lr_ratio)
    )
