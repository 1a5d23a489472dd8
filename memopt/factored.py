"""The factored second moment (Adafactor, AdaLomo, CAME), computed in row blocks.

For a matrix G (m x n) the update of ALGORITHMS.md is

    r = b*r + (1-b) * (rowmean(G*G) + eps1)        c = b*c + (1-b) * (colmean(G*G) + eps1)
    U = G * a[:, None] * s[None, :]    with a = rsqrt(r / mean(r)),  s = rsqrt(c)
    U = U / max(1, RMS(U) / clip)

Written naively that is ~12 full passes over m*n memory (G*G, two means, the m x n product
a s^T, U, RMS(U), ...). Here it is two passes over G in row blocks small enough to stay in
cache, and no m x n temporary:

* pass 1 (``FactoredStats``) reads each block of G once for its row sums, column sums and
  ``t_j = sum_i G_ij^2 / r_i``. Because the row factor r_i of a block is final as soon as that
  block's row sums are known, sum(U^2) = mean(r) * sum_j t_j / c_j follows without a second read:
  the RMS clip needs no materialized U.
* pass 2 (``apply_factored_update``) reads G again and writes W (or the first moment) once.

The partial sums are plain sums over the elements a caller holds, so a rank that holds a slice
of W can compute them and one all-reduce gives the exact factors (DESIGN.md, "Sharding").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .multitensor import commit

# Elements per row block: large enough that per-block overhead is small (every op is a parallel
# region whose thread synchronisation costs a scheduler quantum when the cores are shared: 512K
# blocks measured 8x slower than 2M blocks on the 2-core CI machine under load), small enough
# that a block of G and its square stay in the (large, shared L3) cache between operations.
BLOCK_ELEMS = 1 << 21


def row_slices(m: int, n: int, block_elems: int | None = None):
    rows = max(1, (block_elems or BLOCK_ELEMS) // max(n, 1))
    for start in range(0, m, rows):
        yield slice(start, min(m, start + rows))


def scratch_buffer(g: torch.Tensor, block_elems: int | None) -> torch.Tensor:
    """One reusable block-sized buffer: fresh large allocations per block cost page faults."""
    m, n = g.shape
    rows = min(m, max(1, (block_elems or BLOCK_ELEMS) // max(n, 1)))
    return torch.empty(rows * n, dtype=torch.float32, device=g.device)


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """View a >=2-D tensor as a batch of (m, n) matrices over its last two dims."""
    return x.view(-1, x.shape[-2], x.shape[-1])


@dataclass
class FactoredStats:
    """Pass-1 statistics of one matrix G, before the EMA: what a sharded run would all-reduce."""

    row_sq: torch.Tensor  # (m,) sum_j G_ij^2
    col_sq: torch.Tensor  # (n,) sum_i G_ij^2
    t: torch.Tensor  # (n,) sum_i G_ij^2 / r_i (r_i the *new* row factor)
    r_new: torch.Tensor  # (m,) the new row factor (committed only if the gradient is finite)
    w_sq: torch.Tensor | None  # () sum W^2, when asked for (relative step size)


def factored_stats(
    g: torch.Tensor,
    r_old: torch.Tensor,
    beta: float,
    eps1: float,
    w: torch.Tensor | None = None,
    block_elems: int | None = None,
) -> FactoredStats:
    """Pass 1 over a 2-D gradient ``g`` (and ``w`` for its sum of squares)."""
    m, n = g.shape
    row_sq = torch.empty(m, dtype=torch.float32, device=g.device)
    r_new = torch.empty_like(row_sq)
    # acc[0] collects column sums, acc[1] collects t: one small GEMM per block does both.
    acc = torch.zeros(2, n, dtype=torch.float32, device=g.device)
    lhs = torch.empty(2, min(m, max(1, (block_elems or BLOCK_ELEMS) // max(n, 1))), dtype=torch.float32, device=g.device)
    lhs[0].fill_(1.0)
    w_sq = torch.zeros((), dtype=torch.float32, device=g.device) if w is not None else None
    scratch = scratch_buffer(g, block_elems)
    for sl in row_slices(m, n, block_elems):
        rows = sl.stop - sl.start
        g2 = torch.square(g[sl], out=scratch[: rows * n].view(rows, n))
        torch.sum(g2, dim=1, out=row_sq[sl])
        # r_new = beta * r_old + (1 - beta) * (row_sq / n + eps1)
        rb = r_new[sl]
        torch.add(row_sq[sl], eps1 * n, out=rb)
        rb.mul_((1.0 - beta) / n).add_(r_old[sl], alpha=beta)
        torch.reciprocal(rb, out=lhs[1, :rows])
        acc.addmm_(lhs[:, :rows], g2)
        if w is not None:
            wb = w[sl].reshape(-1)
            w_sq.add_(torch.dot(wb, wb))
    return FactoredStats(row_sq=row_sq, col_sq=acc[0], t=acc[1], r_new=r_new, w_sq=w_sq)


def commit_factors(
    stats: FactoredStats, r: torch.Tensor, c: torch.Tensor, beta: float, eps1: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the new r and c into the state; return (a, s, sum(U^2)) for pass 2."""
    m, n = r.numel(), c.numel()
    r.copy_(stats.r_new)
    c.mul_(beta).add_(stats.col_sq.div(m).add_(eps1), alpha=1.0 - beta)
    r_mean = r.mean()
    a = torch.rsqrt(r / r_mean)
    inv_c = torch.reciprocal(c)
    s = torch.sqrt(inv_c)
    sum_u2 = r_mean * torch.dot(stats.t, inv_c)
    return a, s, sum_u2


def clip_divisor(sum_u2: torch.Tensor, numel: int, clip_threshold: float) -> float:
    """max(1, RMS(U) / clip_threshold) as a Python float (one host sync)."""
    return max(1.0, math.sqrt(float(sum_u2) / numel) / clip_threshold)


def apply_factored_update(
    w: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    decay: float = 0.0,
    multiplicative_decay: bool = False,
    block_elems: int | None = None,
) -> None:
    """Pass 2: ``w = w - decay * w + scale * (g * a[:, None] * s[None, :])``, block by block.

    ``decay`` (= lr_t * weight_decay) is applied as ``w += -decay * w`` (transformers, CAME) or,
    with ``multiplicative_decay``, as ``w *= 1 - decay`` (lomo_optim): the two differ in fp32
    round-off, and each reference is matched exactly.
    """
    m, n = g.shape
    coef = a * scale
    scratch = scratch_buffer(g, block_elems)
    for sl in row_slices(m, n, block_elems):
        wb = w[sl]
        apply_weight_decay(wb, decay, multiplicative_decay)
        rows = sl.stop - sl.start
        wb.addcmul_(torch.mul(g[sl], coef[sl, None], out=scratch[: rows * n].view(rows, n)), s)


def apply_weight_decay(w: torch.Tensor, decay: float, multiplicative: bool) -> None:
    if not decay:
        return
    if multiplicative:
        w.mul_(1.0 - decay)
    else:
        w.add_(w, alpha=-decay)


def factored_update_into(
    out: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    block_elems: int | None = None,
) -> None:
    """Pass 2 variant that writes ``scale * g * a[:, None] * s[None, :]`` into ``out``."""
    m, n = g.shape
    coef = a * scale
    for sl in row_slices(m, n, block_elems):
        torch.mul(g[sl], coef[sl, None], out=out[sl]).mul_(s)


# -- the same factors for a sharded parameter (the local pieces of a memopt.sharding.Layout) --------
@dataclass
class FactorPartials:
    """Where, in one ``memopt.sharding.Reducer``, the partial sums of one factored EMA are queued."""

    x: torch.Tensor  # the local elements the sums are of (G*G, or CAME's instability (U - M)^2)
    col: int  # column sums per matrix, (B, n)
    row: int | None  # row sums over the window, when local rows can be partial (flat layouts)
    rsum: int | None  # per-matrix sums of the old row factor, when it is stored for local rows only


def add_factor_partials(layout, reducer, x: torch.Tensor, r_old: torch.Tensor) -> FactorPartials:
    """Queue the partial sums of local ``x`` that ``sharded_factors`` needs (``r_old``: the stored
    row factor window, before this step's EMA)."""
    col = reducer.add(layout.col_sums(x))
    row = reducer.add(layout.row_sums(x)) if not layout.rows_complete else None
    rsum = reducer.add(layout.matrix_row_sums(r_old)) if layout.row_sharded else None
    return FactorPartials(x=x, col=col, row=row, rsum=rsum)


def sharded_factors(
    layout, reducer, partials: FactorPartials, r: torch.Tensor, c: torch.Tensor, beta: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """After the reducer ran: the EMA of the row and column means of x into the stored ``r`` (the
    row window) and ``c`` (B*n), and (a, s) = (rsqrt(r / mean(r)) per matrix, rsqrt(c)) for
    ``layout.scale``. Adafactor/AdaLomo (x = G*G) and CAME (also its instability) share it.

    When ``r`` holds local rows only, the per-matrix sum of the new r is rebuilt from the reduced
    column sums and the reduced sum of the old r, without gathering r (docs/sharding.md)."""
    L = layout
    m, n = L.m, L.n
    col = reducer.get(partials.col).view(L.B, n)
    row = reducer.get(partials.row) if not L.rows_complete else L.row_sums(partials.x)
    c = c.view(L.B, n)
    r.mul_(beta).add_(row.div(n).add_(eps), alpha=1.0 - beta)
    c.mul_(beta).add_(col.div(m).add_(eps), alpha=1.0 - beta)
    if L.row_sharded:
        rsum = reducer.get(partials.rsum) * beta + (col.sum(dim=1) / n + m * eps) * (1.0 - beta)
    else:
        rsum = r.view(L.B, m).sum(dim=1)
    return torch.rsqrt(r / (rsum / m)[L.row_matrix(r.device)]), torch.rsqrt(c)


# -- the same statistics for a stack of N same-shaped parameters (the sync-free path) ---------------
def stacked_factored_u(grads: torch.Tensor, states: list[dict], beta, one_minus_beta, eps1: float,
                       row_key: str = "exp_avg_sq_row", col_key: str = "exp_avg_sq_col"):
    """The factored second moment of N parameters at once, without a host sync.

    ``grads`` (N, *lead, m, n) fp32, overwritten with U = G * a[:, None] * s[None, :]; ``beta``
    (N,) the EMA coefficient of each. The new factors are committed to ``states`` only where the
    gradient is finite. Returns (U, ok (N,) bool). ``beta`` and ``1 - beta`` come separately (numbers or
    (N,) tensors): 1 - beta rounded from an fp32 beta near 1 would lose digits (1e-5 at 0.999). Whole-matrix passes instead of the reference
    path's cache-sized row blocks: on an accelerator each op is one kernel over the whole stack.
    """
    n_params = grads.shape[0]
    m, n = grads.shape[-2], grads.shape[-1]
    g = grads.view(n_params, -1, m, n)
    g2 = g.square()
    row_sq = g2.sum(-1)
    col_sq = g2.sum(-2)
    del g2
    ok = torch.isfinite(row_sq.sum((1, 2)))
    b, ob = _per_matrix(beta, 3), _per_matrix(one_minus_beta, 3)
    r_old = torch.stack([st[row_key] for st in states]).view(n_params, -1, m)
    c_old = torch.stack([st[col_key] for st in states]).view(n_params, -1, n)
    # The reference's order of operations (factored_stats / commit_factors), for its round-off.
    r = (row_sq + eps1 * n) * (ob / n) + r_old * b
    c = c_old * b + (col_sq / m + eps1) * ob
    commit(states, row_key, r, r_old, ok)
    commit(states, col_key, c, c_old, ok)
    a = torch.rsqrt(r / r.mean(-1, keepdim=True))
    s = torch.reciprocal(c).sqrt_()
    g.mul_(a.unsqueeze(-1)).mul_(s.unsqueeze(-2))
    return grads, ok


def stacked_dense_u(grads: torch.Tensor, states: list[dict], beta, one_minus_beta, eps1: float,
                    key: str = "exp_avg_sq"):
    """Vectors' dense second moment v = b v + (1-b)(G*G + eps1) for a stack of N, and U = G / sqrt(v)
    written over ``grads``; v committed where the gradient is finite. Returns (U, ok)."""
    n_params = grads.shape[0]
    g2 = grads.square()
    ok = torch.isfinite(g2.reshape(n_params, -1).sum(1))
    b, ob = _per_matrix(beta, grads.dim()), _per_matrix(one_minus_beta, grads.dim())
    v_old = torch.stack([st[key] for st in states])
    v = v_old * b + (g2 + eps1) * ob
    commit(states, key, v, v_old, ok)
    return grads.mul_(v.rsqrt()), ok



def _per_matrix(x, ndim: int):
    return x.view(x.shape[0], *([1] * (ndim - 1))) if torch.is_tensor(x) else x
