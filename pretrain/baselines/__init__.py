"""Baseline optimizers the studies compare memopt with. They are not memopt's algorithms, so they
live here, not in memopt:

* ``adam_mini``: Adam-mini, our implementation from the paper (adam_mini.py);
* ``apollo_mini``: APOLLO-Mini, our implementation from the paper (apollo_mini.py);
* ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (block-wise 8-bit moments; its CPU path runs here;
  tensors under ``min_8bit_size`` = 4096 entries keep 32-bit moments, as bitsandbytes does).

SGD with momentum needs nothing new: ``sgd`` with ``momentum: 0.9``.

``register(model)`` makes these names valid for ``memopt.create_optimizer``, and so for a run
config's ``optimizer.name``, in this process (memopt itself is unchanged). Adam-mini and
APOLLO-Mini partition a megatron-core GPT by parameter name (Q/K heads, transformer-layer
matrices); ``register`` records the names and head layout of ``model`` for that. Without a model
they partition by shape (see each class).
"""
from __future__ import annotations

from .adam_mini import AdamMini
from .adam_mini import megatron_gpt_groups as adam_mini_groups
from .apollo_mini import ApolloMini
from .apollo_mini import megatron_gpt_groups as apollo_mini_groups

NAMES = ("adam_mini", "apollo_mini", "adamw8bit")

# id(parameter) -> name, and the attention layout, of the model given to register()
_LAYOUT: dict = {"names": {}, "heads": None}


def _named(params) -> list | None:
    """(name, param) pairs when every parameter belongs to the registered model, else None."""
    names = _LAYOUT["names"]
    if not params or not all(id(p) in names for p in params):
        return None
    return [(names[id(p)], p) for p in params]


class ModelAdamMini(AdamMini):
    """AdamMini over the registered model's partition (Q/K per head), else by shape."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        params = list(params)
        named = _named(params)
        if named is not None and _LAYOUT["heads"] is not None:
            params = adam_mini_groups(named, *_LAYOUT["heads"])
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class ModelApolloMini(ApolloMini):
    """ApolloMini on the registered model's transformer-layer matrices, else on every matrix."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 rank: int = 1, scale: float = 128**0.5, update_proj_gap: int = 200, norm_growth_limit: float = 1.01,
                 seed: int = 0):
        params = list(params)
        named = _named(params)
        if named is not None:
            params = apollo_mini_groups(named)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, scale=scale,
                         update_proj_gap=update_proj_gap, norm_growth_limit=norm_growth_limit, seed=seed)


class MissingBitsandbytes:
    """Stands for ``adamw8bit`` where bitsandbytes is not installed: says how to get it."""

    def __init__(self, params, lr: float = 1e-3, **hparams):
        raise ValueError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                         "(the 'study' extra of setup.cfg)")


def adamw8bit_class():
    try:
        import bitsandbytes
    except ImportError:
        return MissingBitsandbytes
    return bitsandbytes.optim.AdamW8bit


def register(model=None) -> None:
    """Add the baselines to memopt's registry in this process; remember ``model``'s layout."""
    from memopt import registry

    if model is not None:
        _LAYOUT["names"] = {id(p): n for n, p in model.named_parameters()}
        cfg = getattr(model, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        _LAYOUT["heads"] = (heads, getattr(cfg, "num_query_groups", None) or heads,
                            getattr(cfg, "kv_channels", None)) if heads and getattr(cfg, "kv_channels", None) else None
    registry.OPTIMIZERS["adam_mini"] = ModelAdamMini
    registry.OPTIMIZERS["apollo_mini"] = ModelApolloMini
    registry.OPTIMIZERS["adamw8bit"] = adamw8bit_class()
