"""AdaLomo (Lv et al., 2023): LOMO's fused backward with Adafactor's factored second moment.

Numerically the non-ZeRO rule of ``lomo_optim.AdaLomo`` (ALGORITHMS.md): no first moment,
b_t = 1 - t**decay_rate, factored second moment, per-tensor RMS clip of the update, step size
lr * max(eps2, RMS(W)), decoupled weight decay. That is Adafactor with scale_parameter=True,
relative_step=False, beta1=None, which is how it is implemented here.

Unlike the reference: the second-moment statistics live in ``state_dict()`` (resume keeps them),
the step counter advances per optimizer step (not per backward), state is created on the
parameter's device, and ``step()`` gives the same update as ``fused_backward()``.
"""
from __future__ import annotations

from .adafactor import FactoredSecondMoment, check_factored_hparams
from .base import check_positive
from .fused import DEFAULT_HEAP_TRIM_EVERY, FusedBackwardOptimizer
from .stochastic_rounding import check_rounding_options


class AdaLomo(FusedBackwardOptimizer, FactoredSecondMoment):
    """AdaLomo. Use ``fused_backward(loss)`` for the memory saving, or ``backward()`` + ``step()``.

    Args:
        lr: base learning rate (scaled each step by max(eps2, RMS(W))).
        eps: (eps1 added to G*G, eps2 lower bound of RMS(W)).
        clip_threshold: the update is divided by max(1, RMS(U)/clip_threshold).
        decay_rate: b_t = 1 - t**decay_rate.
        weight_decay: W *= 1 - lr_t * weight_decay.
        clip_grad_norm: global gradient-norm clipping (two backward passes in fused mode).
        clip_grad_value: element-wise gradient clamp.
        loss_scale: initial dynamic loss scale, used only when the loss or parameters are fp16.
        on_nonfinite: "skip" (default) or "raise".
        foreach: None (default: True on accelerators, False on CPU), True (the sync-free
            multi-tensor path), False (the per-parameter, cache-blocked reference path).
        fused: None (default: the fused C++ kernel on CPU when it builds and foreach is None),
            True (memopt.kernels: C++ on CPU, Triton on CUDA), False (torch ops).
        stochastic_rounding, rounding_seed: unbiased rounding of the update into bf16 weights,
            as in ``memopt.Lomo`` (memopt.stochastic_rounding).
        heap_trim_every: on CPU, fused backward returns the C heap's free pages to the kernel
            before backward and once per this many bytes of gradients consumed (glibc's
            malloc_trim; memopt.heap). None or 0: never.
    """

    multiplicative_decay = True  # lomo_optim's rounding: W *= 1 - lr_t * weight_decay

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float = 2.0**10,
        loss_scale_growth_interval: int = 1000,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        heap_trim_every: int | None = DEFAULT_HEAP_TRIM_EVERY,
    ):
        check_positive("lr", lr)
        check_factored_hparams(eps, clip_threshold, decay_rate, weight_decay)
        check_rounding_options(stochastic_rounding, rounding_seed)
        defaults = dict(
            lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
            weight_decay=weight_decay, scale_parameter=True, stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
        )
        super().__init__(
            params, defaults, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
            loss_scale=loss_scale, loss_scale_growth_interval=loss_scale_growth_interval,
            on_nonfinite=on_nonfinite, foreach=foreach, fused=fused, heap_trim_every=heap_trim_every,
        )
