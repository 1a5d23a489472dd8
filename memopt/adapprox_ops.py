"""Adapprox's small pieces, outside the optimizer class: hyperparameter checks, the sketch
seed, Uhat, the RMS clip's scale, and what each rank computes on its local elements in a
sharded step (``memopt.sharding`` layout pieces) before and after an all-reduce. Pure functions
of tensors and a param group.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import check_beta, check_nonnegative, check_positive
from .lowrank import residual_norms_

VHAT_FLOORS = ("grad", "zero")

_MASK64 = (1 << 64) - 1

def _mix64(x: int) -> int:
    """splitmix64 finalizer: nearby inputs give unrelated 64-bit outputs."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sketch_seed(seed: int, step: int, index: int) -> int:
    """Seed of the random sketch of parameter ``index`` at ``step``.

    A pure function of its arguments, so every rank of a sharded run (same seed, same
    parameter order, same step) draws the same sketch. Chained mixing keeps e.g. (step 1,
    index 2) and (step 2, index 1) apart. The result fits torch.Generator.manual_seed.
    """
    x = _mix64(seed)
    x = _mix64(x ^ step)
    x = _mix64(x ^ index)
    return x >> 1  # 63 bits: manual_seed rejects values >= 2**63 on some versions


def clip_scale(c2: float, uhat_rms: float, group: dict) -> float:
    """Step 5 as one scalar on the stored uhat: the true Uhat is c2 * uhat (bias correction),
    divided by max(1, RMS(Uhat) / clip_threshold) over the whole tensor."""
    return c2 / max(1.0, c2 * uhat_rms / group["clip_threshold"])


def clip_scale_t(c2: float, uhat_rms: torch.Tensor, group: dict) -> torch.Tensor:
    """``clip_scale`` with the RMS on the device."""
    # nan where the gradient was not finite: the caller's mask turns it into a zero step.
    return c2 / torch.clamp(uhat_rms * (c2 / group["clip_threshold"]), min=1.0)


# -- the local pieces of a sharded step (memopt.sharding.Layout pieces) ------------------------
def partial_product(L, s: torch.Tensor, kind: str, x: torch.Tensor, beta2: float) -> torch.Tensor:
    """This rank's share of (1 - beta2) * S X ("v", X (B, n, r) -> (B, m, r)) or of
    (1 - beta2) * Y^T S ("vt", Y (B, m, r) -> (B, r, n)), S = G*G on the local elements ``s``.
    Summed over ranks it is the S part of ``lowrank.v_matmul`` / ``vt_matmul``."""
    xs = x * (1.0 - beta2)
    r = x.shape[-1]
    if kind == "v":
        out = torch.zeros(L.B, L.m, r, dtype=torch.float32, device=s.device)
        for pc, blk in L.blocks(s):
            lo = pc.row - pc.mat * L.m
            out[pc.mat, lo:lo + pc.rows].addmm_(blk, xs[pc.mat, pc.col:pc.col + pc.cols])
    else:
        out = torch.zeros(L.B, r, L.n, dtype=torch.float32, device=s.device)
        for pc, blk in L.blocks(s):
            lo = pc.row - pc.mat * L.m
            out[pc.mat, :, pc.col:pc.col + pc.cols].addmm_(xs[pc.mat, lo:lo + pc.rows].T, blk)
    return out


def complete_product(L, reduced, kind, x, q_prev, u_prev, beta2) -> torch.Tensor:
    """V X or V^T Y from the all-reduced S part plus the low-rank term beta2 * Q_prev U_prev^T."""
    r = x.shape[-1]
    low_rank = q_prev.shape[-1] > 0 and beta2 != 0.0
    if kind == "v":
        out = reduced.view(L.B, L.m, r)
        if low_rank:
            out.baddbmm_(q_prev, torch.bmm(u_prev.mT, x), alpha=beta2)
        return out
    out = reduced.view(L.B, r, L.n)
    if low_rank:
        out.baddbmm_(torch.bmm(x.mT, q_prev), u_prev.mT, alpha=beta2)
    return out.mT


def local_error_and_uhat(L, s, g, q_prev, u_prev, q, u, group, eps, scale):
    """On the local elements: squared norms of V and of V - Q U^T per matrix (partial sums,
    (B,) each) and Uhat, written over ``s`` (G*G), as ``Adapprox._update_matrix`` does in one piece."""
    beta2 = group["betas"][1]
    v2 = torch.zeros(L.B, dtype=torch.float64, device=s.device)
    r2 = torch.zeros(L.B, dtype=torch.float64, device=s.device)
    gflat = g.reshape(-1)
    for pc, blk in L.blocks(s):
        lo = pc.row - pc.mat * L.m
        rows, cols = slice(lo, lo + pc.rows), slice(pc.col, pc.col + pc.cols)
        vn, rn = residual_norms_(blk[None], q_prev[pc.mat, rows][None], u_prev[pc.mat, cols][None],
                                 q[pc.mat, rows][None], u[pc.mat, cols][None], beta2, scale=scale)
        v2[pc.mat] += vn.double().square().sum()
        r2[pc.mat] += rn.double().square().sum()
        g_blk = gflat[pc.off:pc.off + pc.rows * pc.cols].view(pc.rows, pc.cols)
        uhat_(torch.mm(q[pc.mat, rows], u[pc.mat, cols].T, out=blk), g_blk, group, eps)
    return s, v2, r2


def uhat_(vhat: torch.Tensor, g: torch.Tensor, group: dict, eps: float) -> torch.Tensor:
    """Steps 4 in place: ``vhat`` (holding Q U^T for the elements of ``g``) becomes
    Uhat = G / (sqrt(Vhat) + eps), Vhat floored as ``group["vhat_floor"]`` says."""
    # The clamps use the smallest normal float instead of 0: sqrt of exact zeros runs ~10x
    # slower on this CPU (measured: 100 ms vs 12 ms for 50257 x 768), and sqrt(1.2e-38) =
    # 1.1e-19 vanishes next to eps (eps + 1e-19 == eps in fp32 for eps >= 1e-11).
    tiny = torch.finfo(torch.float32).tiny
    if group["vhat_floor"] == "grad":
        # max(Q U^T, (1-beta2) G*G) as (x - c G*G)^+ + c G*G: no second buffer.
        c = 1.0 - group["betas"][1]
        vhat.addcmul_(g, g, value=-c).clamp_(min=tiny).addcmul_(g, g, value=c)
    else:
        vhat.clamp_(min=tiny)
    return torch.div(g, vhat.sqrt_().add_(eps), out=vhat)


# -- hyperparameters ------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_hparams(g: dict) -> None:
    """One-line ValueErrors for a bad Adapprox param group (all of its keys merged with the defaults)."""
    check_positive("lr", g["lr"])
    betas = g["betas"]
    if len(tuple(betas)) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_beta("beta1", betas[0])
    check_beta("beta2", betas[1])
    check_positive("eps", g["eps"])
    check_nonnegative("weight_decay", g["weight_decay"])
    check_positive("clip_threshold", g["clip_threshold"])
    check_int("k_max", g["k_max"], 1)
    check_int("k_min", g["k_min"], 1)
    if g["k_min"] > g["k_max"]:
        raise ValueError(f"k_min ({g['k_min']}) must be <= k_max ({g['k_max']})")
    if g["k_init"] is not None:
        check_int("k_init", g["k_init"], 1)
        if not g["k_min"] <= g["k_init"] <= g["k_max"]:
            raise ValueError(
                f"k_init must lie in [k_min, k_max] = [{g['k_min']}, {g['k_max']}], got {g['k_init']!r}"
            )
    check_nonnegative("xi", g["xi"])
    if g["dk"] is not None:
        check_int("dk", g["dk"], 1)
    check_int("oversampling", g["oversampling"], 0)
    check_int("power_iters", g["power_iters"], 0)
    check_int("warm_power_iters", g["warm_power_iters"], 0)
    for name in ("warm_start", "bias_correction"):
        if not isinstance(g[name], bool):
            raise ValueError(f"{name} must be True or False, got {g[name]!r}")
    if g["vhat_floor"] not in VHAT_FLOORS:
        raise ValueError(f"vhat_floor must be one of {VHAT_FLOORS}, got {g['vhat_floor']!r}")
    if isinstance(g["seed"], bool) or not isinstance(g["seed"], int):
        raise ValueError(f"seed must be an integer, got {g['seed']!r}")
