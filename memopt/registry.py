"""``create_optimizer(name, params, **hparams)``: every optimizer this project trains with, by name.

AdamW and SGD come from torch.optim (not rewritten); the rest are memopt's. Names and
hyperparameters are checked here, at the edge, so a typo in a config fails before training
with the valid choices in the message.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch

from .adafactor import Adafactor
from .adalomo import AdaLomo
from .adapprox import Adapprox
from .came import CAME
from .lomo import Lomo

OPTIMIZERS: dict[str, Callable] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adafactor": Adafactor,
    "came": CAME,
    "lomo": Lomo,
    "adalomo": AdaLomo,
    "adapprox": Adapprox,
}

# Optimizers whose memory saving needs ``optimizer.fused_backward(loss)``.
FUSED_BACKWARD = frozenset({"lomo", "adalomo"})


def optimizer_class(name: str):
    key = name.lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; valid choices: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[key]


def optimizer_hparams(name: str) -> list[str]:
    """The hyperparameter names ``name`` accepts (everything after ``params``)."""
    sig = inspect.signature(optimizer_class(name).__init__)
    return [p for p in sig.parameters if p not in ("self", "params")]


def create_optimizer(name: str, params, **hparams) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params`` (tensors or parameter groups)."""
    cls = optimizer_class(name)
    valid = optimizer_hparams(name)
    unknown = [k for k in hparams if k not in valid]
    if unknown:
        bad = unknown[0]
        close = difflib.get_close_matches(bad, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown hyperparameter {bad!r} for optimizer {name!r}{hint}; valid: {', '.join(valid)}"
        )
    return cls(params, **hparams)
