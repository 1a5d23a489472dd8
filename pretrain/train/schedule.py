"""Learning-rate schedule: linear warm-up, then cosine / linear decay to min_lr_ratio * lr, or constant."""
from __future__ import annotations

import math

import torch


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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps, decay, min_lr_ratio)
    )


def reapply_schedule(scheduler, base_lr: float) -> None:
    """After a resume: the lr of the next step from *this* run's schedule and base lr.

    ``LambdaLR.load_state_dict`` restores the saved base lrs and step count, and the optimizer's
    groups carry the lr the old schedule computed for the next step; the schedule function
    itself is not saved. So a changed ``optimizer.lr``, ``train.steps`` or ``schedule.*`` would
    otherwise only take effect one step late, or (for the base lr) never.
    """
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [base_lr] * len(groups)
    for group, fn in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
