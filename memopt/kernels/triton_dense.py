"""Triton kernels for a parameter with fewer than two dimensions (biases, norms): the dense second
moment v = b*v + (1-b)*(G^2 + eps1), U = G * rsqrt(v), the RMS clip, lr_t = step_size * scale,
decoupled weight decay and an optional first moment. Adafactor/AdaLomo and CAME share it.

Three launches, no host sync:
1. ``_dense_stats_kernel``: per program, the partial sums of G^2 (the finiteness statistic), U^2
   (the clip) and W^2 (RMS(W)); the new v is *not* stored yet, since the step may be skipped.
2. ``_dense_finalize_kernel`` (one program): ok, the scale, the divisor and lr_t into ``sc``.
3. ``_dense_update_kernel``: recomputes v (the same bits as pass 1), and where ok writes v,
   the first moment and W. A skipped step writes nothing.

The order of operations per element is the reference's (``FactoredSecondMoment._update`` and
``CAME._update``, foreach=False); only the sums are accumulated in another order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    ELEMENT_BLOCK,
    FINAL_BLOCK,
    decayed,
    is_finite,
    limit_if,
    load_scalar,
    new_step_buffers,
    programs,
    sum_parts,
    write_step_scalars,
)


@triton.jit
def _new_v(g, v, eps1, beta, omb):
    # v.mul_(beta).add_(g2.add_(eps1), alpha=1 - beta)
    return v * beta + omb * (g * g + eps1)


@triton.jit
def _dense_stats_kernel(g_ptr, v_ptr, w_ptr, g2_parts, u2_parts, w2_parts, numel, eps1, beta, omb,
                        BETA_PTR: tl.constexpr, SCALE_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    b = load_scalar(beta, BETA_PTR)
    ob = load_scalar(omb, BETA_PTR)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    u = g * tl.rsqrt(_new_v(g, v, eps1, b, ob))
    tl.store(g2_parts + pid, tl.sum(g * g, axis=0))
    tl.store(u2_parts + pid, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    if SCALE_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(w2_parts + pid, tl.sum(w * w, axis=0))


@triton.jit
def _dense_finalize_kernel(g2_parts, u2_parts, w2_parts, n_parts, sc_ptr, ok_ptr, numel, eps2, step_size,
                           clip_threshold, STEP_PTR: tl.constexpr, SCALE_W: tl.constexpr, BLOCK: tl.constexpr):
    ok = is_finite(sum_parts(g2_parts, n_parts, BLOCK))
    if SCALE_W:
        scale = tl.maximum(tl.sqrt_rn(sum_parts(w2_parts, n_parts, BLOCK) / numel), eps2)
    else:
        scale = 1.0
    write_step_scalars(sc_ptr, ok_ptr, ok, scale, sum_parts(u2_parts, n_parts, BLOCK), numel, clip_threshold,
                       load_scalar(step_size, STEP_PTR))


@triton.jit
def _dense_update_kernel(g_ptr, v_ptr, w_ptr, m_ptr, sc_ptr, ok_ptr, numel, eps1, beta, omb, weight_decay, beta1,
                         BETA_PTR: tl.constexpr, HAS_BETA1: tl.constexpr, HAS_DECAY: tl.constexpr,
                         MULT_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < limit_if(numel, tl.load(ok_ptr))
    b = load_scalar(beta, BETA_PTR)
    ob = load_scalar(omb, BETA_PTR)
    div = tl.load(sc_ptr + 0)
    lr_t = tl.load(sc_ptr + 2)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    v = _new_v(g, tl.load(v_ptr + offs, mask=mask, other=1.0), eps1, b, ob)
    tl.store(v_ptr + offs, v, mask=mask)
    u = tl.div_rn(g * tl.rsqrt(v), div)
    w = decayed(tl.load(w_ptr + offs, mask=mask, other=0.0), lr_t, weight_decay, HAS_DECAY, MULT_DECAY)
    if HAS_BETA1:
        mo = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * u
        tl.store(m_ptr + offs, mo, mask=mask)
        u = mo
    tl.store(w_ptr + offs, w + (-lr_t) * u, mask=mask)


def dense_step_(w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, exp_avg: torch.Tensor | None, *, beta, omb,
                beta_ptr: bool, eps1: float, eps2: float, step_size, step_ptr: bool, clip_threshold: float,
                weight_decay: float, multiplicative_decay: bool, scale_parameter: bool,
                beta1: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense update of one non-empty parameter; returns (ok, scale) as 0-d device tensors.
    ``beta``/``omb``/``step_size`` are what ``triton_common.beta_args``/``scalar_arg`` give."""
    numel = w.numel()
    grid = programs(numel, ELEMENT_BLOCK)
    parts = torch.empty(3, grid, dtype=torch.float32, device=w.device)
    sc, ok = new_step_buffers(w.device)
    _dense_stats_kernel[(grid,)](g, v, w, parts[0], parts[1], parts[2], numel, eps1, beta, omb,
                                 BETA_PTR=beta_ptr, SCALE_W=scale_parameter, BLOCK=ELEMENT_BLOCK)
    _dense_finalize_kernel[(1,)](parts[0], parts[1], parts[2], grid, sc, ok, numel, eps2, step_size,
                                 clip_threshold, STEP_PTR=step_ptr, SCALE_W=scale_parameter, BLOCK=FINAL_BLOCK)
    _dense_update_kernel[(grid,)](g, v, w, exp_avg if exp_avg is not None else w, sc, ok, numel, eps1, beta, omb,
                                  float(weight_decay), float(beta1 or 0.0), BETA_PTR=beta_ptr,
                                  HAS_BETA1=beta1 is not None, HAS_DECAY=bool(weight_decay),
                                  MULT_DECAY=bool(multiplicative_decay), BLOCK=ELEMENT_BLOCK)
    return ok, sc[1]

