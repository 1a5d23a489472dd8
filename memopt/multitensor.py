"""Helpers of the sync-free, multi-tensor path (``foreach=True``; ``MemoptOptimizer._step_foreach``).

The path steps N same-shaped parameters as one stack: per-parameter scalars are (N,) device
tensors, per-parameter state is stacked for the step and written back with one
``torch._foreach_copy_``, and every decision that depends on the data (skip a non-finite
gradient, the RMS clip, lr_t = lr * RMS(W)) is a mask or a tensor, never a Python value, so the
host never waits for the device.
"""
from __future__ import annotations

import math

import torch


def expand(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) with ``ndim`` dims, to broadcast a per-parameter scalar over a stack."""
    return x.view(x.shape[0], *([1] * (ndim - 1)))


def stacked(states: list[dict], key: str) -> torch.Tensor:
    """The (N, *shape) stack of ``state[key]`` over the parameters of a class (a copy)."""
    return torch.stack([st[key] for st in states])


def commit(states: list[dict], key: str, new: torch.Tensor, old: torch.Tensor | None = None,
           ok: torch.Tensor | None = None) -> None:
    """``state[key] = new`` for every parameter, or ``old`` where ``ok`` is False."""
    if ok is not None:
        new = torch.where(expand(ok, new.dim()), new, old)
    new = new.reshape(len(states), *states[0][key].shape)
    torch._foreach_copy_([st[key] for st in states], new.unbind(0))


def norms(ws: list[torch.Tensor]) -> torch.Tensor:
    """(N,) fp32 Frobenius norms of the tensors ``ws``, in one op."""
    return torch.stack(torch._foreach_norm(ws, 2, dtype=torch.float32))


def rms_of_stack(x: torch.Tensor) -> torch.Tensor:
    """(N,) RMS of each member of the stack ``x`` (N, ...)."""
    n = x.shape[0]
    return torch.linalg.vector_norm(x.reshape(n, -1), dim=1) / math.sqrt(max(x[0].numel(), 1))


def clip_divisor(u: torch.Tensor, clip_threshold: float) -> torch.Tensor:
    """(N,) max(1, RMS(U_i) / clip_threshold) over the stack ``u``."""
    return (rms_of_stack(u) / clip_threshold).clamp_(min=1.0)


def per_param(value, like: torch.Tensor) -> torch.Tensor:
    """A hyperparameter that is a number or already an (N,) tensor, as an (N,) tensor like ``like``."""
    if torch.is_tensor(value):
        return value
    return torch.full_like(like, value)


def apply_update_(ws: list[torch.Tensor], delta: torch.Tensor, decay: torch.Tensor | None = None,
                  multiplicative: bool = False, alpha: float = 1.0) -> None:
    """``w = w - decay_i * w + alpha * delta_i`` for every tensor of ``ws`` (``delta`` the (N, ...) stack).

    ``decay`` (N,) is 0 for a skipped parameter, None without weight decay. It is applied as
    ``w += -decay * w`` (transformers, CAME) or ``w *= 1 - decay`` (lomo_optim), the rounding of
    each reference. Only same-shaped tensor lists reach the foreach ops: a list op with one
    device scalar per tensor falls back to one kernel per tensor on CUDA, so per-parameter
    scalars are applied on the stacks instead.
    """
    if decay is None:
        torch._foreach_add_(ws, delta.unbind(0), alpha=alpha)
        return
    w = torch.stack(ws)
    d = expand(decay, w.dim())
    if multiplicative:
        w.mul_(1.0 - d)
    else:
        w.addcmul_(w, -d)
    w.add_(delta, alpha=alpha)
    torch._foreach_copy_(ws, w.unbind(0))
