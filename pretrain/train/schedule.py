"""The learning-rate schedule on resume (the schedule itself is ``pretrain.optim``, shared with
the HF import)."""
from __future__ import annotations


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
