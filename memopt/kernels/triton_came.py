"""Triton kernels for CAME: Adafactor's factored second moment (``triton_factored``, passes 1-3
with a constant beta2 and no parameter scale) plus the confidence passes, all without host sync.

For a >= 2-D parameter, after the factors r, c and the clip divisor are on the device:

4. ``_came_rows_kernel`` (programs over row blocks): U = G * (rsqrt(r/mean(r)) / div) * sqrt(1/c),
   M = beta1*M + (1-beta1)*U written where ok, and the row sums of the instability (U - M)^2.
5. ``_came_cols_kernel`` (column blocks x row splits): its column sums, recomputing U and reading
   the M that pass 4 wrote (the same bits as pass 4 saw).
6. ``_came_res_finalize_kernel`` (one program): R = b3*R + (1-b3)*(rowmean + eps2), likewise C,
   written where ok, and mean(R) per matrix.
7. ``_came_update_kernel`` (2-D tiles): W += -lr*wd*W; W += (M * (rsqrt(R/mean(R)) * -lr)) * rsqrt(C).

Element for element the order of ``memopt.came.CAME._update`` (foreach=False). Fewer than 2 dims:
the dense kernels of ``triton_dense`` (first moment, additive decay, step size lr).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import FINAL_BLOCK, check_operands, decayed, empty_result, limit_if, masked_tile
from .triton_dense import dense_step_
from .triton_factored import (
    COL_BLOCK_M,
    COL_BLOCK_N,
    ROW_BLOCK_M,
    ROW_BLOCK_N,
    TILE_M,
    TILE_N,
    column_block,
    factored_second_moment,
    row_splits,
    tile_grid,
)


@triton.jit
def _clipped_u(g, r, r_mean, c, div):
    # coef = a / div with a = rsqrt(r / mean(r)); U = (G * coef) * sqrt(1 / c)
    coef = tl.rsqrt(r / r_mean) / div
    return (g * coef[:, None]) * tl.sqrt_rn(tl.div_rn(1.0, c))[None, :]


@triton.jit
def _came_rows_kernel(g_ptr, m_ptr, r_ptr, c_ptr, r_mean_ptr, sc_ptr, ok_ptr, res_row_ptr, m, n, row_blocks, beta1,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    mat = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < m
    m_ok = limit_if(m, tl.load(ok_ptr))
    base = mat.to(tl.int64) * m * n
    div = tl.load(sc_ptr + 0)
    r = tl.load(r_ptr + mat * m + rows, mask=row_in, other=1.0)
    r_mean = tl.load(r_mean_ptr + mat)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_in = cols < n
        mask = row_in[:, None] & col_in[None, :]
        offs = base + rows[:, None] * n + cols[None, :]
        u = _clipped_u(tl.load(g_ptr + offs, mask=mask, other=0.0), r, r_mean,
                       tl.load(c_ptr + mat * n + cols, mask=col_in, other=1.0), div)
        mo = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * u
        tl.store(m_ptr + offs, mo, mask=(rows < m_ok)[:, None] & col_in[None, :])
        d = u - mo
        acc += tl.where(mask, d * d, 0.0)
    tl.store(res_row_ptr + mat * m + rows, tl.sum(acc, axis=1), mask=row_in)


@triton.jit
def _came_cols_kernel(g_ptr, m_ptr, r_ptr, c_ptr, r_mean_ptr, sc_ptr, res_col_parts, m, n, col_blocks, n_splits,
                      rows_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mat, split, cols, col_in, base = column_block(tl.program_id(0), m, n, col_blocks, n_splits, BLOCK_N)
    div = tl.load(sc_ptr + 0)
    r_mean = tl.load(r_mean_ptr + mat)
    c = tl.load(c_ptr + mat * n + cols, mask=col_in, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rows_per_split, BLOCK_M):
        rows = split * rows_per_split + start + tl.arange(0, BLOCK_M)
        row_in = rows < m
        mask = row_in[:, None] & col_in[None, :]
        offs = base + rows[:, None] * n + cols[None, :]
        u = _clipped_u(tl.load(g_ptr + offs, mask=mask, other=0.0),
                       tl.load(r_ptr + mat * m + rows, mask=row_in, other=1.0), r_mean, c, div)
        d = u - tl.load(m_ptr + offs, mask=mask, other=0.0)
        acc += tl.where(mask, d * d, 0.0)
    tl.store(res_col_parts + (mat * n_splits + split) * n + cols, tl.sum(acc, axis=0), mask=col_in)


@triton.jit
def _came_res_finalize_kernel(res_row_ptr, res_col_parts, n_splits, rr_ptr, rc_ptr, rr_mean_ptr, ok_ptr, n_matrices,
                              m, n, eps2, beta3, BLOCK: tl.constexpr):
    ok = tl.load(ok_ptr)
    m_ok, n_ok = limit_if(m, ok), limit_if(n, ok)
    for mat in range(0, n_matrices):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, m, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            inside = idx < m
            # rr.mul_(beta3).add_(res_row_sum.div_(n).add_(eps2), alpha=1 - beta3)
            rr = (tl.load(rr_ptr + mat * m + idx, mask=inside, other=0.0) * beta3
                  + (1.0 - beta3) * (tl.load(res_row_ptr + mat * m + idx, mask=inside, other=0.0) / n + eps2))
            tl.store(rr_ptr + mat * m + idx, rr, mask=idx < m_ok)
            acc += tl.where(inside, rr, 0.0)
        tl.store(rr_mean_ptr + mat, tl.sum(acc, axis=0) / m)
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            inside = idx < n
            col = tl.zeros([BLOCK], dtype=tl.float32)
            for split in range(0, n_splits):
                col += tl.load(res_col_parts + (mat * n_splits + split) * n + idx, mask=inside, other=0.0)
            rc = tl.load(rc_ptr + mat * n + idx, mask=inside, other=0.0) * beta3 + (1.0 - beta3) * (col / m + eps2)
            tl.store(rc_ptr + mat * n + idx, rc, mask=idx < n_ok)


@triton.jit
def _came_update_kernel(w_ptr, m_ptr, rr_ptr, rc_ptr, rr_mean_ptr, ok_ptr, m, n, row_blocks, col_blocks, lr,
                        weight_decay,
                        HAS_DECAY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mat, rows, cols, row_in, col_in, mask, offs = masked_tile(tl.program_id(0), m, n, row_blocks, col_blocks, ok_ptr,
                                                              BLOCK_M, BLOCK_N)
    ra = tl.rsqrt(tl.load(rr_ptr + mat * m + rows, mask=row_in, other=1.0) / tl.load(rr_mean_ptr + mat)) * (-lr)
    rs = tl.rsqrt(tl.load(rc_ptr + mat * n + cols, mask=col_in, other=1.0))
    w = decayed(tl.load(w_ptr + offs, mask=mask, other=0.0), lr, weight_decay, HAS_DECAY, False)
    w = w + (tl.load(m_ptr + offs, mask=mask, other=0.0) * ra[:, None]) * rs[None, :]
    tl.store(w_ptr + offs, w, mask=mask)


def came_step_(w, g, *, exp_avg, sq_row=None, sq_col=None, res_row=None, res_col=None, sq=None, lr, beta1, beta2,
               beta3, eps1, eps2, clip_threshold, weight_decay=0.0):
    """CAME update of one parameter (``memopt.kernels``' contract); returns ok (0-d bool)."""
    check_operands(w, g, exp_avg=exp_avg, sq_row=sq_row, sq_col=sq_col, res_row=res_row, res_col=res_col, sq=sq)
    if w.numel() == 0:
        return empty_result(w, 1.0)[0]
    lr, beta1, beta3, eps2 = float(lr), float(beta1), float(beta3), float(eps2)
    common = dict(beta=float(beta2), omb=1.0 - float(beta2), beta_ptr=False, eps1=float(eps1), eps2=eps2,
                  step_size=lr, step_ptr=False, clip_threshold=float(clip_threshold), scale_parameter=False)
    if w.dim() < 2:
        if sq is None:
            raise ValueError("came_step_: a parameter with fewer than 2 dims needs sq (its dense second moment)")
        return dense_step_(w, g, sq, exp_avg, weight_decay=weight_decay, multiplicative_decay=False, beta1=beta1,
                           **common)[0]
    if any(x is None for x in (sq_row, sq_col, res_row, res_col)):
        raise ValueError("came_step_: a parameter with >= 2 dims needs sq_row, sq_col, res_row and res_col")
    r_mean, sc, ok = factored_second_moment(w, g, sq_row, sq_col, **common)
    m, n = w.shape[-2], w.shape[-1]
    n_matrices = w.numel() // (m * n)
    dev = w.device
    res_rows = torch.empty(n_matrices, m, dtype=torch.float32, device=dev)
    row_blocks = triton.cdiv(m, ROW_BLOCK_M)
    _came_rows_kernel[(n_matrices * row_blocks,)](g, exp_avg, sq_row, sq_col, r_mean, sc, ok, res_rows, m, n,
                                                  row_blocks, beta1, BLOCK_M=ROW_BLOCK_M, BLOCK_N=ROW_BLOCK_N)
    rows_per_split, n_splits = row_splits(m)
    col_blocks = triton.cdiv(n, COL_BLOCK_N)
    res_cols = torch.empty(n_matrices * n_splits * n, dtype=torch.float32, device=dev)
    _came_cols_kernel[(n_matrices * n_splits * col_blocks,)](g, exp_avg, sq_row, sq_col, r_mean, sc, res_cols, m, n,
                                                            col_blocks, n_splits, rows_per_split,
                                                            BLOCK_M=COL_BLOCK_M, BLOCK_N=COL_BLOCK_N)
    rr_mean = torch.empty(n_matrices, dtype=torch.float32, device=dev)
    _came_res_finalize_kernel[(1,)](res_rows, res_cols, n_splits, res_row, res_col, rr_mean, ok, n_matrices, m, n,
                                    eps2, beta3, BLOCK=FINAL_BLOCK)
    grid, row_tiles, col_tiles = tile_grid(w)
    _came_update_kernel[(grid,)](w, exp_avg, res_row, res_col, rr_mean, ok, m, n, row_tiles, col_tiles, lr,
                                 float(weight_decay), HAS_DECAY=bool(weight_decay), BLOCK_M=TILE_M,
                                 BLOCK_N=TILE_N)
    return ok
