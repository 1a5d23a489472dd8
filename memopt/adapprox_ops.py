"""Adapprox's small pieces, outside the optimizer class: hyperparameter checks, the sketch
seed, Uhat, the RMS clip's scale, and what each rank computes on its local elements in a
sharded step (``memopt.sharding`` layout pieces) before and after an all-reduce. Pure functions
of tensors and a param group.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import check_beta, check_nonnegative, check_positive
from .kernels import KernelUnavailable, cpu_adapprox
from .lowrank import residual_norms_
from .paths import resolve_fused

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


def local_error_and_uhat(L, s, g, q_prev, u_prev, q, u, group, eps, scale, with_error: bool = True):
    """On the local elements: squared norms of V and of V - Q U^T per matrix (partial sums,
    (B,) each; None without ``with_error``: between sketches) and Uhat, written over ``s``
    (G*G), as ``Adapprox._update_matrix`` does in one piece."""
    beta2 = group["betas"][1]
    v2 = torch.zeros(L.B, dtype=torch.float64, device=s.device) if with_error else None
    r2 = torch.zeros(L.B, dtype=torch.float64, device=s.device) if with_error else None
    gflat = g.reshape(-1)
    for pc, blk in L.blocks(s):
        lo = pc.row - pc.mat * L.m
        rows, cols = slice(lo, lo + pc.rows), slice(pc.col, pc.col + pc.cols)
        if with_error:
            vn, rn = residual_norms_(blk[None], q_prev[pc.mat, rows][None], u_prev[pc.mat, cols][None],
                                     q[pc.mat, rows][None], u[pc.mat, cols][None], beta2, scale=scale)
            v2[pc.mat] += vn.double().square().sum()
            r2[pc.mat] += rn.double().square().sum()
        g_blk = gflat[pc.off:pc.off + pc.rows * pc.cols].view(pc.rows, pc.cols)
        uhat_(torch.mm(q[pc.mat, rows], u[pc.mat, cols].T, out=blk), g_blk, group, eps)
    return s, v2, r2


def cpu_kernels_for(group: dict, p: torch.Tensor, g: torch.Tensor):
    """``memopt.kernels.cpu_adapprox`` when the update of matrix ``p`` (gradient ``g``) runs fused
    (``resolve_fused``: fused=True, or None with foreach None on a CPU where the kernels build),
    else None (torch ops, also for a non-contiguous ``p`` or ``g``: the kernels walk flat memory)."""
    if not resolve_fused(group, p.device):
        return None
    if p.device.type == "cpu" and cpu_adapprox.ready():
        return cpu_adapprox if p.is_contiguous() and g.is_contiguous() else None
    if group["fused"]:
        raise KernelUnavailable(
            f"Adapprox: fused=True needs the CPU kernels (memopt.kernels.cpu_adapprox) and a CPU parameter, got a "
            f"{p.device.type} one ({cpu_adapprox.unavailable_reason() or 'no kernels for this device'}); "
            "leave fused=None or pass fused=False"
        )
    return None


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
    check_int("resketch_every", g["resketch_every"], 1)
    for name in ("warm_start", "bias_correction"):
        if not isinstance(g[name], bool):
            raise ValueError(f"{name} must be True or False, got {g[name]!r}")
    if g["vhat_floor"] not in VHAT_FLOORS:
        raise ValueError(f"vhat_floor must be one of {VHAT_FLOORS}, got {g['vhat_floor']!r}")
    if isinstance(g["seed"], bool) or not isinstance(g["seed"], int):
        raise ValueError(f"seed must be an integer, got {g['seed']!r}")


# -- steps 5-7 (shared by the three paths) ----------------------------------------------------
def apply_masked_update(w, uhat, exp_avg, u_scale, group, step_size, ok) -> None:
    """``apply_update`` with a device ``u_scale`` and mask ``ok`` (``uhat`` already 0 where not ok)."""
    beta1 = group["betas"][0]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    u_scale = torch.where(ok, u_scale, 0.0)  # 0 * nan would be nan
    if decay != 1.0:
        w.mul_(torch.where(ok, decay, 1.0))
    if exp_avg is None:
        w.addcmul_(uhat, u_scale * -group["lr"])
    else:
        exp_avg.mul_(torch.where(ok, beta1, 1.0)).addcmul_(uhat, u_scale * (1.0 - beta1))
        w.addcmul_(exp_avg, torch.where(ok, -step_size, 0.0))

def corrections(group: dict, step: int) -> tuple[float, float, float]:
    """(c2, eps', step size) for bias correction.

    G / (sqrt(V / c2^2) + eps) = c2 * G / (sqrt(V) + c2 * eps) with c2 = sqrt(1 - beta2^t):
    the correction becomes a scalar on Uhat and on eps instead of a pass over m x n.
    """
    beta1, beta2 = group["betas"]
    if not group["bias_correction"]:
        return 1.0, group["eps"], group["lr"]
    c2 = math.sqrt(1.0 - beta2**step)
    step_size = group["lr"] / (1.0 - beta1**step) if beta1 > 0 else group["lr"]
    return c2, group["eps"] * c2, step_size

def first_moment(p: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
    if group["betas"][0] == 0:
        return None
    if "exp_avg" not in state:  # beta1 switched on after the state was created
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return state["exp_avg"]

def apply_update(w, uhat, exp_avg, u_scale, group, step_size) -> None:
    """Steps 6-7 on same-shaped w, uhat, exp_avg (None when beta1 = 0).

    The true (clipped, bias-corrected) Uhat is u_scale * uhat: one scalar, no extra pass.
    """
    beta1 = group["betas"][0]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if decay != 1.0:
        w.mul_(decay)  # W - lr*wd*W, with the W from before this step
    if exp_avg is None:
        w.add_(uhat, alpha=-group["lr"] * u_scale)
    else:
        exp_avg.mul_(beta1).add_(uhat, alpha=(1.0 - beta1) * u_scale)
        w.add_(exp_avg, alpha=-step_size)
