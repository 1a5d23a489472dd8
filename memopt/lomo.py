"""LOMO (Lv et al., 2023): SGD whose update runs inside backward (see ``memopt.fused``).

W = W * (1 - lr * weight_decay) - lr * G. No optimizer state beyond a step counter, so with
``fused_backward`` the memory is weights + activations + the gradients still being accumulated.
"""
from __future__ import annotations

import torch

from . import kernels
from .base import all_finite, check_nonnegative, check_positive, is_finite
from .paths import resolve_fused
from .sharding import Reducer
from .stochastic_rounding import check_rounding_options
from .factored import row_slices
from .fused import DEFAULT_HEAP_TRIM_EVERY, FusedBackwardOptimizer
from .fused_path import FusedKernelOptimizer
from .multitensor import apply_update_, expand


# 32 MiB blocks: a block checked by the dot product is still in the (large, shared) L3 cache
# when the update reads it; smaller blocks pay a thread-pool synchronisation per op.
_BLOCK_ELEMS = 1 << 23


class Lomo(FusedKernelOptimizer, FusedBackwardOptimizer):
    """LOMO. Use ``fused_backward(loss)`` for the memory saving, or ``backward()`` + ``step()``.

    Args:
        lr: learning rate.
        weight_decay: W *= 1 - lr * weight_decay.
        clip_grad_norm: global gradient-norm clipping (two backward passes in fused mode).
        clip_grad_value: element-wise gradient clamp.
        loss_scale: initial dynamic loss scale, used only when the loss or parameters are fp16;
            halved on overflow, doubled after ``loss_scale_growth_interval`` clean steps.
        on_nonfinite: "skip" (default) or "raise".
        foreach: None (default: True on accelerators, False on CPU), True (the sync-free
            multi-tensor path), False (the per-parameter reference path).
        fused: None (default: the fused C++ kernel on CPU when it builds and foreach is None),
            True (memopt.kernels: C++ on CPU, Triton on CUDA), False (torch ops).
        stochastic_rounding: write updates into bf16 weights rounded stochastically (unbiased,
            so updates below bf16's resolution survive on average; memopt.stochastic_rounding)
            instead of to nearest. No effect on fp32 weights.
        rounding_seed: the seed of that rounding's counter-based random bits.
        heap_trim_every: on CPU, fused backward returns the C heap's free pages to the kernel
            before backward and once per this many bytes of gradients consumed (glibc's
            malloc_trim; memopt.heap). None or 0: never.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float = 2.0**16,
        loss_scale_growth_interval: int = 1000,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        heap_trim_every: int | None = DEFAULT_HEAP_TRIM_EVERY,
    ):
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        check_rounding_options(stochastic_rounding, rounding_seed)
        defaults = dict(lr=lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding,
                        rounding_seed=rounding_seed)
        super().__init__(
            params, defaults, clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value, loss_scale=loss_scale,
            loss_scale_growth_interval=loss_scale_growth_interval, on_nonfinite=on_nonfinite,
            foreach=foreach, fused=fused, heap_trim_every=heap_trim_every,
        )

    def _init_state(self, p, state, group):
        pass  # stateless beyond the step counter the base class keeps

    supports_sharding = True

    def _init_sharded_state(self, layout, state, group, device=None):
        pass

    def _sharded_update(self, units, pg):
        """One all-reduce of the squared gradient norms: a parameter is skipped on all ranks alike."""
        red = Reducer(pg)
        hs = [red.add(torch.dot(u.grad, u.grad)) for u in units]
        red.run()
        ok = all_finite([red.get(h) for h in hs])
        for u, fine in zip(units, ok):
            if fine:
                _sgd_(u.param, u.grad, u.group["lr"], u.group["weight_decay"])
        return ok

    def _foreach_update(self, ws, grads, states, group, t):
        return _foreach_lomo(ws, grads, group)

    def _fused_update_t(self, p, grad, state, group, t, host=False):
        # One pass to check G, one to update: exact skip, no roll-back (memopt.kernels).
        # ``host``: the host path's call, ok as a bool (memopt.kernels.lomo_step_host).
        return (kernels.lomo_step_host if host else kernels.lomo_step_)(
            p, grad.contiguous(), lr=group["lr"], weight_decay=group["weight_decay"])

    def _update(self, p, grad, state, group, step):
        lr, wd = group["lr"], group["weight_decay"]
        if p.is_contiguous() and resolve_fused(group, p.device):
            return self._fused_update_t(p, grad, state, group, step, host=True)
        w, g = p.view(-1), grad.reshape(-1)
        if w.is_cuda:
            # On a GPU a host sync per block would stall the stream: check once, then update.
            if not is_finite(torch.dot(g, g)):
                return False
            _sgd_(w, g, lr, wd)
            return True
        # On CPU, check and update block by block, so G is read from memory once (the check
        # leaves the block in cache for the update). A non-finite block rolls the blocks already
        # updated back (W = (W + lr*G) / (1 - lr*wd)): W returns to its value up to one rounding
        # per element, and the state cannot be poisoned.
        done = []
        for sl in row_slices(w.numel(), 1, _BLOCK_ELEMS):
            gb = g[sl]
            if not is_finite(torch.dot(gb, gb)):
                for prev in done:
                    w[prev].add_(g[prev], alpha=lr)
                    if wd:
                        w[prev].div_(1.0 - lr * wd)
                return False
            _sgd_(w[sl], gb, lr, wd)
            done.append(sl)
        return True


def _foreach_lomo(ws, grads, group):
    lr, wd = group["lr"], group["weight_decay"]
    n_params = grads.shape[0]
    ok = torch.isfinite(torch.linalg.vector_norm(grads.reshape(n_params, -1), dim=1))
    grads.masked_fill_(~expand(ok, grads.dim()), 0.0)
    apply_update_(ws, grads, torch.where(ok, lr * wd, 0.0) if wd else None, multiplicative=True, alpha=-lr)
    return ok


def _sgd_(w: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> None:
    if wd:
        w.mul_(1.0 - lr * wd)
    w.add_(g, alpha=-lr)
