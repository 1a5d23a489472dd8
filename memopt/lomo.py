"""LOMO (Lv et al., 2023): SGD whose update runs inside backward (see ``memopt.fused``).

W = W * (1 - lr * weight_decay) - lr * G. No optimizer state beyond a step counter, so with
``fused_backward`` the memory is weights + activations + the gradients still being accumulated.
"""
from __future__ import annotations

from .base import check_nonnegative, check_positive, is_finite
from .fused import FusedBackwardOptimizer


class Lomo(FusedBackwardOptimizer):
    """LOMO. Use ``fused_backward(loss)`` for the memory saving, or ``backward()`` + ``step()``.

    Args:
        lr: learning rate.
        weight_decay: W *= 1 - lr * weight_decay.
        clip_grad_norm: global gradient-norm clipping (two backward passes in fused mode).
        clip_grad_value: element-wise gradient clamp.
        loss_scale: initial dynamic loss scale, used only when the loss or parameters are fp16;
            halved on overflow, doubled after ``loss_scale_growth_interval`` clean steps.
        on_nonfinite: "skip" (default) or "raise".
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
    ):
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value, loss_scale=loss_scale,
            loss_scale_growth_interval=loss_scale_growth_interval, on_nonfinite=on_nonfinite,
        )

    def _init_state(self, p, state, group):
        pass  # stateless beyond the step counter the base class keeps

    def _update(self, p, grad, state, group, step):
        flat = grad.reshape(-1)
        if not is_finite(flat.dot(flat)):
            return False
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            p.mul_(1.0 - lr * wd)
        p.add_(grad, alpha=-lr)
        return True
