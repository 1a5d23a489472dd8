"""Triton kernels for the factored second moment (Adafactor, AdaLomo; CAME reuses the first three).

A parameter of >= 2 dims is a stack of B matrices (m, n) over its last two dims, each with its own
row factor r (m) and column factor c (n); the RMS clip and RMS(W) are over the whole parameter.
The math is ``memopt.factored`` (``factored_stats``, ``commit_factors``, ``apply_factored_update``)
element for element, in four launches and without any host sync:

1. ``factored_rows_kernel`` (programs over row blocks): row sums of G^2, the new row factor
   r' = (rowsum + eps1*n) * ((1-b)/n) + b*r into scratch, and partial sums of G^2 (finiteness)
   and of W^2 (RMS(W), when ``scale_parameter``).
2. ``factored_cols_kernel`` (programs over column blocks x row splits): partial column sums of
   G^2 and of t_j = sum_i G_ij^2 / r'_i, per split of ``ROWS_PER_SPLIT`` rows so that a short wide
   matrix still gets enough programs.
3. ``factored_finalize_kernel`` (one program): ok = the G^2 sum is finite; where ok, r' and
   c' = b*c + (1-b)*(colsum/m + eps1) are written into the state (a skipped step leaves the
   state's bits alone); mean(r') per matrix; sum(U^2) = sum_b mean(r'_b) * sum_j t_j / c'_j, so the
   RMS clip needs no materialized U; the divisor, the scale and lr_t into ``sc``.
4. ``_factored_update_kernel`` (programs over 2-D tiles): U = G * rsqrt(r/mean(r)) * sqrt(1/c)
   scaled by -lr_t/div (or (1-beta1)/div into the first moment), decoupled weight decay, the
   write of W, all masked by ok.

Block sizes are constants chosen for coalesced rows of 128-512 floats; they are not tuned on a
GPU (none was available when they were written; docs/benchmarks/gpu.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    FINAL_BLOCK,
    beta_args,
    check_operands,
    empty_result,
    is_finite,
    decayed,
    limit_if,
    load_scalar,
    masked_tile,
    new_step_buffers,
    scalar_arg,
    sum_parts,
    write_step_scalars,
)
from .triton_dense import dense_step_

ROW_BLOCK_M, ROW_BLOCK_N = 8, 256
COL_BLOCK_M, COL_BLOCK_N = 32, 64
ROWS_PER_SPLIT = 256  # a multiple of COL_BLOCK_M: rows of G one column-stats program reads
TILE_M, TILE_N = 16, 128


@triton.jit
def factored_rows_kernel(g_ptr, w_ptr, r_old_ptr, r_new_ptr, g2_parts, w2_parts, m, n, row_blocks, eps1, beta, omb,
                         BETA_PTR: tl.constexpr, SCALE_W: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    mat = pid // row_blocks
    rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < m
    base = mat.to(tl.int64) * m * n
    # Tile-shaped accumulators, reduced once after the loop (one reduction per program).
    g_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_in[:, None] & (cols < n)[None, :]
        offs = base + rows[:, None] * n + cols[None, :]
        x = tl.load(g_ptr + offs, mask=mask, other=0.0)
        g_acc += x * x
        if SCALE_W:
            y = tl.load(w_ptr + offs, mask=mask, other=0.0)
            w_acc += y * y
    row_sq = tl.sum(g_acc, axis=1)
    b = load_scalar(beta, BETA_PTR)
    ob = load_scalar(omb, BETA_PTR)
    r_old = tl.load(r_old_ptr + mat * m + rows, mask=row_in, other=0.0)
    # torch.add(row_sq, eps1 * n).mul_((1 - beta) / n).add_(r_old, alpha=beta)
    r_new = (row_sq + eps1 * n) * (ob / n) + b * r_old
    tl.store(r_new_ptr + mat * m + rows, r_new, mask=row_in)
    tl.store(g2_parts + pid, tl.sum(row_sq, axis=0))
    if SCALE_W:
        tl.store(w2_parts + pid, tl.sum(tl.sum(w_acc, axis=1), axis=0))


@triton.jit
def column_block(pid, m, n, col_blocks, n_splits, BLOCK_N: tl.constexpr):
    """Program ``pid`` of a column-statistics kernel: (matrix, row split, columns, columns mask,
    offset of the matrix); programs run over matrices x row splits x column blocks."""
    per_matrix = col_blocks * n_splits
    mat = pid // per_matrix
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return mat, (pid % per_matrix) // col_blocks, cols, cols < n, mat.to(tl.int64) * m * n


@triton.jit
def factored_cols_kernel(g_ptr, r_new_ptr, col_parts, t_parts, m, n, col_blocks, n_splits, rows_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mat, split, cols, col_in, base = column_block(tl.program_id(0), m, n, col_blocks, n_splits, BLOCK_N)
    c_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, rows_per_split, BLOCK_M):
        rows = split * rows_per_split + start + tl.arange(0, BLOCK_M)
        row_in = rows < m
        x = tl.load(g_ptr + base + rows[:, None] * n + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
        x2 = x * x
        # t = sum_i G_ij^2 * (1 / r_i): the reference's GEMM with the reciprocals of r.
        inv_r = tl.div_rn(1.0, tl.load(r_new_ptr + mat * m + rows, mask=row_in, other=1.0))
        c_acc += x2
        t_acc += x2 * inv_r[:, None]
    slot = (mat * n_splits + split) * n + cols
    tl.store(col_parts + slot, tl.sum(c_acc, axis=0), mask=col_in)
    tl.store(t_parts + slot, tl.sum(t_acc, axis=0), mask=col_in)


@triton.jit
def factored_finalize_kernel(g2_parts, w2_parts, n_parts, r_new_ptr, r_ptr, c_ptr, col_parts, t_parts, n_splits,
                             r_mean_ptr, sc_ptr, ok_ptr, n_matrices, m, n, numel, eps1, eps2, beta, omb, step_size,
                             clip_threshold, BETA_PTR: tl.constexpr, STEP_PTR: tl.constexpr,
                             SCALE_W: tl.constexpr, BLOCK: tl.constexpr):
    ok = is_finite(sum_parts(g2_parts, n_parts, BLOCK))
    if SCALE_W:
        scale = tl.maximum(tl.sqrt_rn(sum_parts(w2_parts, n_parts, BLOCK) / numel), eps2)
    else:
        scale = 1.0
    b = load_scalar(beta, BETA_PTR)
    ob = load_scalar(omb, BETA_PTR)
    m_ok, n_ok = limit_if(m, ok), limit_if(n, ok)
    sum_u2 = 0.0
    for mat in range(0, n_matrices):
        r_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, m, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            inside = idx < m
            r_new = tl.load(r_new_ptr + mat * m + idx, mask=inside, other=0.0)
            tl.store(r_ptr + mat * m + idx, r_new, mask=idx < m_ok)
            r_acc += r_new
        r_mean = tl.sum(r_acc, axis=0) / m
        tl.store(r_mean_ptr + mat, r_mean)
        t_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            inside = idx < n
            col_sq = tl.zeros([BLOCK], dtype=tl.float32)
            t = tl.zeros([BLOCK], dtype=tl.float32)
            for split in range(0, n_splits):
                slot = (mat * n_splits + split) * n + idx
                col_sq += tl.load(col_parts + slot, mask=inside, other=0.0)
                t += tl.load(t_parts + slot, mask=inside, other=0.0)
            # c.mul_(beta).add_(col_sq.div(m).add_(eps1), alpha=1 - beta)
            c_new = tl.load(c_ptr + mat * n + idx, mask=inside, other=1.0) * b + ob * (col_sq / m + eps1)
            tl.store(c_ptr + mat * n + idx, c_new, mask=idx < n_ok)
            t_acc += tl.where(inside, t * tl.div_rn(1.0, c_new), 0.0)
        sum_u2 += r_mean * tl.sum(t_acc, axis=0)
    write_step_scalars(sc_ptr, ok_ptr, ok, scale, sum_u2, numel, clip_threshold, load_scalar(step_size, STEP_PTR))


@triton.jit
def _factored_update_kernel(g_ptr, w_ptr, m_ptr, r_ptr, c_ptr, r_mean_ptr, sc_ptr, ok_ptr, m, n, row_blocks, col_blocks,
                            weight_decay, beta1,
                            HAS_BETA1: tl.constexpr, HAS_DECAY: tl.constexpr, MULT_DECAY: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mat, rows, cols, row_in, col_in, mask, offs = masked_tile(tl.program_id(0), m, n, row_blocks, col_blocks, ok_ptr,
                                                              BLOCK_M, BLOCK_N)
    div = tl.load(sc_ptr + 0)
    lr_t = tl.load(sc_ptr + 2)
    # a = rsqrt(r / mean(r)), s = sqrt(1 / c) (commit_factors), r and c already committed.
    a = tl.rsqrt(tl.load(r_ptr + mat * m + rows, mask=row_in, other=1.0) / tl.load(r_mean_ptr + mat))
    s = tl.sqrt_rn(tl.div_rn(1.0, tl.load(c_ptr + mat * n + cols, mask=col_in, other=1.0)))
    if HAS_BETA1:
        coef = a * ((1.0 - beta1) / div)
    else:
        coef = a * (-lr_t / div)
    u = (tl.load(g_ptr + offs, mask=mask, other=0.0) * coef[:, None]) * s[None, :]
    w = decayed(tl.load(w_ptr + offs, mask=mask, other=0.0), lr_t, weight_decay, HAS_DECAY, MULT_DECAY)
    if HAS_BETA1:
        mo = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + u
        tl.store(m_ptr + offs, mo, mask=mask)
        w = w + (-lr_t) * mo
    else:
        w = w + u
    tl.store(w_ptr + offs, w, mask=mask)


def factored_second_moment(w, g, r, c, *, beta, omb, beta_ptr, eps1, eps2, step_size, step_ptr, clip_threshold,
                           scale_parameter):
    """Passes 1-3 for a non-empty >= 2-D parameter: commits r and c where ok; returns
    (r_mean (B,), sc, ok) for the update kernels (``sc`` as in ``memopt.kernels.triton_common``)."""
    m, n = w.shape[-2], w.shape[-1]
    n_matrices = w.numel() // (m * n)
    dev = w.device
    row_programs = n_matrices * triton.cdiv(m, ROW_BLOCK_M)
    parts = torch.empty(2, row_programs, dtype=torch.float32, device=dev)
    r_new = torch.empty(n_matrices, m, dtype=torch.float32, device=dev)
    factored_rows_kernel[(row_programs,)](g, w, r, r_new, parts[0], parts[1], m, n, triton.cdiv(m, ROW_BLOCK_M),
                                          eps1, beta, omb,
                                          BETA_PTR=beta_ptr, SCALE_W=scale_parameter,
                                          BLOCK_M=ROW_BLOCK_M, BLOCK_N=ROW_BLOCK_N)
    rows_per_split, n_splits = row_splits(m)
    col_blocks = triton.cdiv(n, COL_BLOCK_N)
    col_partials = torch.empty(2, n_matrices * n_splits * n, dtype=torch.float32, device=dev)
    factored_cols_kernel[(n_matrices * n_splits * col_blocks,)](
        g, r_new, col_partials[0], col_partials[1], m, n, col_blocks, n_splits, rows_per_split,
        BLOCK_M=COL_BLOCK_M, BLOCK_N=COL_BLOCK_N)
    r_mean = torch.empty(n_matrices, dtype=torch.float32, device=dev)
    sc, ok = new_step_buffers(dev)
    factored_finalize_kernel[(1,)](parts[0], parts[1], row_programs, r_new, r, c, col_partials[0], col_partials[1],
                                   n_splits, r_mean, sc, ok, n_matrices, m, n, w.numel(), eps1, eps2, beta, omb,
                                   step_size, clip_threshold, BETA_PTR=beta_ptr, STEP_PTR=step_ptr,
                                   SCALE_W=scale_parameter, BLOCK=FINAL_BLOCK)
    return r_mean, sc, ok


def row_splits(m: int) -> tuple[int, int]:
    """(rows per split, splits) of a column-statistics kernel over m rows."""
    rows_per_split = min(ROWS_PER_SPLIT, triton.cdiv(m, COL_BLOCK_M) * COL_BLOCK_M)
    return rows_per_split, triton.cdiv(m, rows_per_split)


def tile_grid(w: torch.Tensor) -> tuple[int, int, int]:
    """(programs, row blocks, column blocks) of a 2-D tile kernel over every matrix of ``w``."""
    m, n = w.shape[-2], w.shape[-1]
    row_blocks, col_blocks = triton.cdiv(m, TILE_M), triton.cdiv(n, TILE_N)
    return (w.numel() // (m * n)) * row_blocks * col_blocks, row_blocks, col_blocks


def factored_step_(w, g, *, sq_row=None, sq_col=None, sq=None, exp_avg=None, beta2, eps1, eps2, step_size,
                   clip_threshold, weight_decay=0.0, multiplicative_decay=False, scale_parameter=True, beta1=None,
                   one_minus_beta2=None):
    """Adafactor / AdaLomo update of one parameter (``memopt.kernels``' contract); returns (ok, scale).

    ``one_minus_beta2`` (optional, this backend only): 1 - beta2 as the caller computed it when
    ``beta2`` is a device tensor, for the reference's rounding (``triton_common.beta_args``)."""
    check_operands(w, g, sq_row=sq_row, sq_col=sq_col, sq=sq, exp_avg=exp_avg)
    if (beta1 is None) != (exp_avg is None):
        raise ValueError("factored_step_: pass exp_avg exactly when beta1 is given")
    if w.numel() == 0:
        return empty_result(w, eps2 if scale_parameter else 1.0)
    beta, omb, beta_ptr = beta_args(beta2, one_minus_beta2, w.device)
    step, step_ptr = scalar_arg(step_size, w.device)
    common = dict(beta=beta, omb=omb, beta_ptr=beta_ptr, eps1=float(eps1), eps2=float(eps2), step_size=step,
                  step_ptr=step_ptr, clip_threshold=float(clip_threshold), scale_parameter=bool(scale_parameter))
    if w.dim() < 2:
        if sq is None:
            raise ValueError("factored_step_: a parameter with fewer than 2 dims needs sq (its dense second moment)")
        return dense_step_(w, g, sq, exp_avg, weight_decay=weight_decay, multiplicative_decay=multiplicative_decay,
                           beta1=beta1, **common)
    if sq_row is None or sq_col is None:
        raise ValueError("factored_step_: a parameter with >= 2 dims needs sq_row and sq_col")
    r_mean, sc, ok = factored_second_moment(w, g, sq_row, sq_col, **common)
    grid, row_blocks, col_blocks = tile_grid(w)
    _factored_update_kernel[(grid,)](
        g, w, exp_avg if exp_avg is not None else w, sq_row, sq_col, r_mean, sc, ok, w.shape[-2], w.shape[-1],
        row_blocks, col_blocks, float(weight_decay), float(beta1 or 0.0), HAS_BETA1=beta1 is not None, HAS_DECAY=bool(weight_decay),
        MULT_DECAY=bool(multiplicative_decay), BLOCK_M=TILE_M, BLOCK_N=TILE_N)
    return ok, sc[1]
