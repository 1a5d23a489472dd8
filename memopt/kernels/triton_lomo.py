"""Triton kernels for LOMO: W *= 1 - lr*weight_decay; W -= lr*G, skipped (W untouched) when G holds
inf/nan, decided on the device.

Two passes over G: ``sumsq_parts_kernel`` writes per-program partial sums of G^2, one program
(``_finite_flag_kernel``) turns them into ok, and ``_lomo_update_kernel`` updates W where ok. (The
reference path's CPU branch checks and updates block by block and rolls back on a non-finite
block; on a device the check must come first, as in the reference's CUDA branch.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    ELEMENT_BLOCK,
    FINAL_BLOCK,
    check_operands,
    empty_result,
    is_finite,
    limit_if,
    programs,
    sum_parts,
    sumsq_parts_kernel,
)


@triton.jit
def _finite_flag_kernel(parts_ptr, count, ok_ptr, BLOCK: tl.constexpr):
    tl.store(ok_ptr, is_finite(sum_parts(parts_ptr, count, BLOCK)))


@triton.jit
def _lomo_update_kernel(w_ptr, g_ptr, ok_ptr, numel, lr, keep, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < limit_if(numel, tl.load(ok_ptr))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if HAS_DECAY:
        w = w * keep
    tl.store(w_ptr + offs, w + (-lr) * tl.load(g_ptr + offs, mask=mask, other=0.0), mask=mask)


def lomo_step_(w, g, *, lr, weight_decay=0.0):
    """LOMO update of one parameter (``memopt.kernels``' contract); returns ok (0-d bool)."""
    check_operands(w, g)
    if w.numel() == 0:
        return empty_result(w, 1.0)[0]
    numel = w.numel()
    grid = programs(numel, ELEMENT_BLOCK)
    parts = torch.empty(grid, dtype=torch.float32, device=w.device)
    ok = torch.empty((), dtype=torch.bool, device=w.device)
    sumsq_parts_kernel[(grid,)](g, parts, numel, BLOCK=ELEMENT_BLOCK)
    _finite_flag_kernel[(1,)](parts, grid, ok, BLOCK=FINAL_BLOCK)
    # 1 - lr*wd in double, as the reference's w.mul_(1.0 - lr * wd).
    _lomo_update_kernel[(grid,)](w, g, ok, numel, float(lr), 1.0 - float(lr) * float(weight_decay),
                                 HAS_DECAY=bool(weight_decay), BLOCK=ELEMENT_BLOCK)
    return ok
