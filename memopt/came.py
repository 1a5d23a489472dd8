"""CAME (Luo et al., 2023): Adafactor's factored second moment plus a confidence-guided step.

Numerically the rule of ``came_pytorch.CAME`` (ALGORITHMS.md): constant beta2 for the factored
second moment, RMS clip of U, first moment M, and a second factored EMA (beta3) of the
instability (U - M)^2 + eps2 that scales the step. Computed in three row-block passes with no
m x n temporary besides the first moment the algorithm keeps.
"""
from __future__ import annotations

import torch

from . import kernels
from .base import all_finite, check_beta, check_nonnegative, check_positive, is_finite
from .fused_path import FusedKernelOptimizer
from .paths import resolve_fused
from .factored import (
    add_factor_partials,
    apply_weight_decay,
    as_matrices,
    clip_divisor,
    commit_factors,
    factored_stats,
    row_slices,
    scratch_buffer,
    sharded_factors,
    stacked_dense_u,
    stacked_factored_u,
)
from .multitensor import clip_divisor as stacked_clip_divisor
from .multitensor import apply_update_, commit, expand, stacked
from .sharding import Reducer


class CAME(FusedKernelOptimizer):
    """CAME.

    Args:
        lr: learning rate (required).
        eps: (eps1 added to G*G, eps2 added to the instability (U - M)^2).
        clip_threshold: U is divided by max(1, RMS(U)/clip_threshold).
        betas: (beta1 first moment, beta2 second moment, beta3 instability).
        weight_decay: W -= lr * weight_decay * W.
        on_nonfinite: "skip" (default) or "raise".
        foreach: None (default: True on accelerators, False on CPU), True (the sync-free
            multi-tensor path), False (the per-parameter, cache-blocked reference path).
        fused: None (default: the fused C++ kernel on CPU when it builds and foreach is None),
            True (memopt.kernels: C++ on CPU, Triton on CUDA), False (torch ops).
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if lr is None:
            raise ValueError("CAME: lr is required (e.g. lr=2e-4)")
        check_positive("lr", lr)
        if len(tuple(betas)) != 3:
            raise ValueError(f"CAME: betas must be (beta1, beta2, beta3), got {betas!r}")
        for name, b in zip(("beta1", "beta2", "beta3"), betas):
            check_beta(name, b)
        if len(tuple(eps)) != 2:
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        check_nonnegative("eps[0]", eps[0])
        check_nonnegative("eps[1]", eps[1])
        check_positive("clip_threshold", clip_threshold)
        check_nonnegative("weight_decay", weight_decay)
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, betas=tuple(betas), weight_decay=weight_decay)
        super().__init__(params, defaults, on_nonfinite=on_nonfinite, foreach=foreach, fused=fused)

    def _init_state(self, p, state, group):
        kw = dict(dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros(p.shape, **kw)
        if p.dim() >= 2:
            lead, m, n = p.shape[:-2], p.shape[-2], p.shape[-1]
            state["exp_avg_sq_row"] = torch.zeros(*lead, m, **kw)
            state["exp_avg_sq_col"] = torch.zeros(*lead, n, **kw)
            state["exp_avg_res_row"] = torch.zeros(*lead, m, **kw)
            state["exp_avg_res_col"] = torch.zeros(*lead, n, **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, **kw)

    supports_sharding = True

    def _init_sharded_state(self, layout, state, group, device=None):
        kw = dict(dtype=torch.float32, device=device)
        state["exp_avg"] = torch.zeros(layout.length, **kw)
        if layout.factored:
            held = layout.holds_factors  # a ZeRO rank holding no element of it keeps no factors
            col_shape = layout.full_shape[:-2] + layout.full_shape[-1:] if held else (0,)
            window = layout.window if held else 0
            state["exp_avg_sq_row"] = torch.zeros(window, **kw)
            state["exp_avg_sq_col"] = torch.zeros(col_shape, **kw)
            state["exp_avg_res_row"] = torch.zeros(window, **kw)
            state["exp_avg_res_col"] = torch.zeros(col_shape, **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(layout.length, **kw)

    def _sharded_update(self, units, pg):
        """Phase 1: G^2 partial sums; phase 2: U and sum U^2 (clip); phase 3: M and the
        instability (U - M)^2 partial sums; then the update. One all-reduce per phase."""
        red = Reducer(pg)
        h = {}
        for u in units:
            L, d = u.layout, h.setdefault(id(u), {})
            g2 = u.grad.square()
            if L.factored:
                d["g"] = add_factor_partials(L, red, g2, u.state["exp_avg_sq_row"])
            else:
                d["g2"] = g2
                d["tot"] = red.add(g2.sum())
        red.run()
        ok = all_finite([red.get(h[id(u)]["g"].col if u.layout.factored else h[id(u)]["tot"]) for u in units])
        red2 = Reducer(pg)
        for u, fine in zip(units, ok):
            if not fine:
                continue
            L, d, st, grp = u.layout, h[id(u)], u.state, u.group
            eps1, _ = grp["eps"]
            beta2 = grp["betas"][1]
            if L.factored and not L.holds_factors:
                d["u"] = u.grad.clone()  # empty
            elif L.factored:
                a, s = sharded_factors(L, red, d["g"], st["exp_avg_sq_row"], st["exp_avg_sq_col"], beta2, eps1)
                d["u"] = L.scale(u.grad, a, s)
            else:
                v = st["exp_avg_sq"]
                v.mul_(beta2).add_(d["g2"].add_(eps1), alpha=1.0 - beta2)
                d["u"] = u.grad * v.rsqrt()
            d["u2"] = red2.add(d["u"].square().sum())
        red2.run()
        red3 = Reducer(pg)
        for u, fine in zip(units, ok):
            if not fine:
                continue
            L, d, st, grp, w = u.layout, h[id(u)], u.state, u.group, u.param
            beta1 = grp["betas"][0]
            lr = grp["lr"]
            uu = d["u"].div_(clip_divisor(red2.get(d["u2"]), L.numel, grp["clip_threshold"]))
            mom = st["exp_avg"]
            mom.mul_(beta1).add_(uu, alpha=1.0 - beta1)
            if L.factored:
                res = uu.sub_(mom).square_()
                d["r"] = add_factor_partials(L, red3, res, st["exp_avg_res_row"])
            else:
                apply_weight_decay(w, lr * grp["weight_decay"], multiplicative=False)
                w.add_(mom, alpha=-lr)
        red3.run()
        for u, fine in zip(units, ok):
            if not fine or not u.layout.factored or not u.layout.holds_factors:
                continue
            L, d, st, grp, w = u.layout, h[id(u)], u.state, u.group, u.param
            eps2 = grp["eps"][1]
            lr = grp["lr"]
            ra, rs = sharded_factors(L, red3, d["r"], st["exp_avg_res_row"], st["exp_avg_res_col"], grp["betas"][2], eps2)
            apply_weight_decay(w, lr * grp["weight_decay"], multiplicative=False)
            w.add_(L.scale(st["exp_avg"], ra, rs), alpha=-lr)
        return ok

    def _fused_update_t(self, p, grad, state, group, t, host=False):
        """``memopt.kernels.came_step_`` (``came_step_host`` with ``host``: ok as a bool): no
        scalar of CAME depends on the step ``t``."""
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        return (kernels.came_step_host if host else kernels.came_step_)(
            p, grad.contiguous(), exp_avg=state["exp_avg"], sq_row=state.get("exp_avg_sq_row"),
            sq_col=state.get("exp_avg_sq_col"), res_row=state.get("exp_avg_res_row"),
            res_col=state.get("exp_avg_res_col"), sq=state.get("exp_avg_sq"), lr=group["lr"], beta1=beta1,
            beta2=beta2, beta3=beta3, eps1=eps1, eps2=eps2, clip_threshold=group["clip_threshold"],
            weight_decay=group["weight_decay"],
        )

    def _update(self, p, grad, state, group, step):
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        lr, wd, clip = group["lr"], group["weight_decay"], group["clip_threshold"]
        if p.is_contiguous() and resolve_fused(group, p.device):
            return self._fused_update_t(p, grad, state, group, step, host=True)
        exp_avg = state["exp_avg"]

        if p.dim() < 2:
            g2 = grad.square()
            if not is_finite(g2.sum()):
                return False
            v = state["exp_avg_sq"]
            v.mul_(beta2).add_(g2.add_(eps1), alpha=1.0 - beta2)
            u = grad * v.rsqrt()
            u.div_(clip_divisor(u.square().sum(), u.numel(), clip))
            exp_avg.mul_(beta1).add_(u, alpha=1.0 - beta1)
            apply_weight_decay(p, lr * wd, multiplicative=False)
            p.add_(exp_avg, alpha=-lr)
            return True

        gs, ws, ms = as_matrices(grad), as_matrices(p), as_matrices(exp_avg)
        count = gs.shape[0]
        sq_rows = state["exp_avg_sq_row"].view(count, -1)
        sq_cols = state["exp_avg_sq_col"].view(count, -1)
        res_rows = state["exp_avg_res_row"].view(count, -1)
        res_cols = state["exp_avg_res_col"].view(count, -1)
        stats = [factored_stats(gs[i], sq_rows[i], beta2, eps1) for i in range(count)]
        if not is_finite(torch.stack([s.row_sq.sum() for s in stats])):
            return False
        factors = [commit_factors(st, sq_rows[i], sq_cols[i], beta2, eps1) for i, st in enumerate(stats)]
        div = clip_divisor(sum(f[2] for f in factors), p.numel(), clip)
        for i, (a, s, _) in enumerate(factors):
            g, w, m = gs[i], ws[i], ms[i]
            rows_n, cols_n = g.shape
            scratch = scratch_buffer(g, None)
            res_row_sum = torch.empty(rows_n, dtype=torch.float32, device=g.device)
            res_col_sum = torch.zeros(cols_n, dtype=torch.float32, device=g.device)
            coef = a / div
            # Pass 2: U (clipped), M = beta1*M + (1-beta1)*U, instability sums of (U - M)^2 + eps2.
            for sl in row_slices(rows_n, cols_n):
                k = sl.stop - sl.start
                u = torch.mul(g[sl], coef[sl, None], out=scratch[: k * cols_n].view(k, cols_n)).mul_(s)
                mb = m[sl]
                mb.mul_(beta1).add_(u, alpha=1.0 - beta1)
                res = u.sub_(mb).square_()
                torch.sum(res, dim=1, out=res_row_sum[sl])
                res_col_sum.add_(res.sum(dim=0))
            # Instability EMA (beta3) of the means of (U - M)^2 + eps2, as r and c above.
            rr, rc = res_rows[i], res_cols[i]
            rr.mul_(beta3).add_(res_row_sum.div_(cols_n).add_(eps2), alpha=1.0 - beta3)
            rc.mul_(beta3).add_(res_col_sum.div_(rows_n).add_(eps2), alpha=1.0 - beta3)
            ra = torch.rsqrt(rr / rr.mean()) * (-lr)
            rs = torch.rsqrt(rc)
            # Pass 3: W = W - lr*wd*W - lr * M * ra[:, None] * rs[None, :]
            for sl in row_slices(rows_n, cols_n):
                k = sl.stop - sl.start
                wb = w[sl]
                apply_weight_decay(wb, lr * wd, multiplicative=False)
                wb.addcmul_(torch.mul(m[sl], ra[sl, None], out=scratch[: k * cols_n].view(k, cols_n)), rs)
        return True

    def _foreach_update(self, ws, grads, states, group, t):
        """The reference rule on a stack of N parameters (``MemoptOptimizer._foreach_update``)."""
        beta1, beta2, beta3 = group["betas"]
        eps1, eps2 = group["eps"]
        lr, wd = group["lr"], group["weight_decay"]
        factored = grads.dim() >= 3
        if factored:
            u, ok = stacked_factored_u(grads, states, beta2, 1.0 - beta2, eps1)
        else:
            u, ok = stacked_dense_u(grads, states, beta2, 1.0 - beta2, eps1)
        keep = expand(ok, u.dim())
        # Zeroing U and keeping beta1 at 1 where the gradient is not finite leaves M exact there.
        u.div_(expand(stacked_clip_divisor(u, group["clip_threshold"]), u.dim())).masked_fill_(~keep, 0.0)
        mom = stacked(states, "exp_avg")
        mom.mul_(expand(torch.where(ok, beta1, 1.0), u.dim())).add_(u, alpha=1.0 - beta1)
        commit(states, "exp_avg", mom)
        lr_t = torch.where(ok, lr, 0.0)
        decay = lr_t * wd if wd else None
        if not factored:
            apply_update_(ws, torch.mul(mom, expand(-lr_t, u.dim()), out=u), decay)
            return ok
        # The instability (U - M)^2 + eps2, its factored EMA (beta3), then the confident step.
        n_params = u.shape[0]
        m, n = u.shape[-2], u.shape[-1]
        res = u.sub_(mom).square_().view(n_params, -1, m, n)
        rr_old = stacked(states, "exp_avg_res_row").view(n_params, -1, m)
        rc_old = stacked(states, "exp_avg_res_col").view(n_params, -1, n)
        rr = rr_old * beta3 + (res.sum(-1) / n + eps2) * (1.0 - beta3)
        rc = rc_old * beta3 + (res.sum(-2) / m + eps2) * (1.0 - beta3)
        commit(states, "exp_avg_res_row", rr, rr_old, ok)
        commit(states, "exp_avg_res_col", rc, rc_old, ok)
        ra = torch.rsqrt(rr / rr.mean(-1, keepdim=True)).mul_(expand(-lr_t, 3))
        step = torch.mul(mom.view(n_params, -1, m, n), ra.unsqueeze(-1), out=res).mul_(torch.rsqrt(rc).unsqueeze(-2))
        step.masked_fill_(~expand(ok, 4), 0.0)
        apply_update_(ws, step.view_as(u), decay)
        return ok
