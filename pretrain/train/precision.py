"""What ``train.precision`` means on each engine.

* ``fp32``: fp32 weights, fp32 compute.
* ``bf16``: bf16 compute over fp32 master weights, on every engine, so no update is lost to
  bf16's resolution: single/DDP run the forward under ``torch.autocast(device, bfloat16)`` (the
  weights and their gradients stay fp32; DDP all-reduces fp32 gradients); FSDP2 shards fp32
  weights and gathers them as bf16 for compute, reducing gradients in fp32
  (``MixedPrecisionPolicy``); DeepSpeed uses its own bf16 mode with fp32 masters.
* ``bf16_pure``: the LOMO papers' memory-minimal mode for lomo/adalomo: the weights themselves
  are bf16 (2 bytes a parameter, no master copy). Updates below bf16's resolution are lost unless
  the optimizer rounds stochastically (``optimizer.hparams={stochastic_rounding: true}``).

``pretrain.config.precision_problem`` (at config load, and again here with the engine that
``engine.kind=auto`` chose) refuses the combinations that do not fit with one line.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from pretrain.config import ConfigError, precision_problem

def check_precision(cfg, engine_kind: str) -> None:
    """The config's precision check again, with the engine ``engine.kind=auto`` resolved to."""
    problem = precision_problem(cfg.train.precision, cfg.optimizer.name, engine_kind, cfg.optimizer.hparams)
    if problem:
        raise ConfigError(f"config key 'train.precision': {problem}")


def prepare_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model the engine wraps: bf16 weights for ``bf16_pure``, fp32 otherwise (masters)."""
    return model.to(torch.bfloat16) if precision == "bf16_pure" else model


def uses_autocast(precision: str, engine_kind: str) -> bool:
    """Whether the engine's forward needs bf16 autocast (the engines that have no bf16 mode)."""
    return precision == "bf16" and engine_kind in ("single", "ddp")


def autocast_loss_fn(loss_fn: Callable, device_type: str) -> Callable:
    """``loss_fn`` with its forward under bf16 autocast (backward follows the recorded casts)."""

    @functools.wraps(loss_fn)
    def under_autocast(model, batch):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return loss_fn(model, batch)

    return under_autocast


def fsdp_mixed_precision(precision: str) -> dict:
    """``fully_shard`` keyword arguments: bf16 compute, fp32 sharded masters, fp32 reductions."""
    if precision != "bf16":
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
