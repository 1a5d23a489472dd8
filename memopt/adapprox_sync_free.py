"""Adapprox's sync-free path (``foreach=True``, the default on accelerators): every decision of
a step on the device, one host sync per step for all the rank decisions and skip flags.

A mixin of ``memopt.adapprox.Adapprox``: it uses the optimizer's ``_new_state``, ``_sketch``,
``_next_rank`` and ``_rank_limits``.
"""
from __future__ import annotations

import torch

from .adapprox_ops import apply_masked_update, clip_scale_t, corrections, first_moment, uhat_
from .base import NonFiniteGradientError, host_int, rms
from .lowrank import answer_requests, relative_error, residual_norms_, second_moment_operator


class AdapproxSyncFree:
    def _step_foreach(self, items, transform=None, gate=None):
        """Every parameter's update with its decisions on the device; then one host sync for all
        the rank decisions (they set Q and U's shapes) and skip flags, which are committed after
        it. The step counters stay Python ints: the step seeds the next sketch on the host."""
        pending = []
        for p, g, group in items:
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._new_state(p, p, None, state, group, p.device)
            g32 = g.float()
            if transform is not None:
                g32 = transform(g32, group)
            if gate is not None:
                g32 = g32.masked_fill(~gate, float("nan"))
            work = p if p.dtype == torch.float32 else p.detach().float()
            step = host_int(state["step"]) + 1
            ok, sketch = self._device_update(work, g32, state, group, step)
            if work is not p:
                p.copy_(work)  # unchanged where skipped: an exact round trip
            pending.append((p, state, group, step, ok, sketch))
        if not pending:
            return []
        oks = torch.stack([x[4] for x in pending])
        errors = [x[5][3].to(torch.float64) for x in pending if x[5] is not None and x[5][3] is not None]
        flags = torch.cat([oks.to(torch.float64)] + [e.reshape(1) for e in errors]).tolist()  # the one sync
        error_of = iter(flags[len(pending):])
        failed = None
        for (p, state, group, step, _ok, sketch), applied in zip(pending, flags):
            error = next(error_of) if sketch is not None and sketch[3] is not None else None
            if applied:
                state["step"] = step
                if sketch is not None:
                    q, u, k, _ = sketch
                    m, n = p.shape[-2], p.shape[-1]
                    state["Q"] = q.view(*p.shape[:-1], k)
                    state["U"] = u.view(*p.shape[:-2], n, k)
                    if error is not None:
                        self._next_rank(state, group, k, error, *self._rank_limits(m, n, group))
            elif gate is None or bool(gate):
                state["nonfinite_skips"] = host_int(state["nonfinite_skips"]) + 1
                if group["on_nonfinite"] == "raise" and failed is None:
                    failed = (p, step)
        if failed is not None:
            raise NonFiniteGradientError(
                f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                f"{tuple(failed[0].shape)} at step {failed[1]}; pass on_nonfinite='skip' to skip such steps"
            )
        return list(oks.unbind(0))

    def _device_update(self, p, grad, state, group, step):
        """The reference update with device-side decisions: returns (ok, sketch), ok a 0-d bool;
        p and the element-wise state are updated where ok (masks), Q and U not at all: sketch is
        (Q, U, k, error) for the caller to commit (error None between sketches), None for a vector."""
        if p.numel() == 0:
            return torch.ones((), dtype=torch.bool, device=p.device), None
        c2, eps, step_size = corrections(group, step)
        if p.dim() < 2:
            beta2 = group["betas"][1]
            g2 = grad * grad
            ok = torch.isfinite(g2.sum())
            v = state["exp_avg_sq"]
            v.copy_(torch.where(ok, v * beta2 + g2 * (1.0 - beta2), v))
            uhat = torch.div(grad, torch.sqrt(v, out=g2).add_(eps), out=g2)
            u_rms = rms(uhat)
            ok = ok & torch.isfinite(u_rms)
            apply_masked_update(p, uhat.masked_fill_(~ok, 0.0), first_moment(p, state, group),
                               clip_scale_t(c2, u_rms, group), group, step_size, ok)
            return ok, None
        m, n = p.shape[-2], p.shape[-1]
        g = grad.reshape(-1, m, n)
        B = g.shape[0]
        beta2 = group["betas"][1]
        buf = torch.mul(g, g)
        g2_sum = buf.sum()
        ok = torch.isfinite(g2_sum)
        g2_mean = g2_sum / buf.numel()
        g2_mean = torch.where(g2_mean == 0, 1.0, g2_mean)
        k_prev = state["Q"].shape[-1]
        q_prev = state["Q"].view(B, m, k_prev)
        u_prev = state["U"].view(B, n, k_prev)
        apply_v, apply_vt = second_moment_operator(q_prev, u_prev, buf, beta2)
        k, sketch, fresh = self._sketch(q_prev, (B, m, n), state, group, step, p.device)
        q, u = answer_requests(sketch, apply_v, apply_vt)
        error = None
        if fresh:
            v_norm, r_norm = residual_norms_(buf, q_prev, u_prev, q, u, beta2, scale=g2_mean)
            error = relative_error(v_norm.unsqueeze(-1), r_norm.unsqueeze(-1)).max()
            ok = ok & torch.isfinite(error)
        uhat = uhat_(torch.bmm(q, u.mT, out=buf), g, group, eps)
        u_sq = torch.linalg.vector_norm(uhat).double().square()
        ok = ok & torch.isfinite(u_sq)
        u_rms = (u_sq / p.numel()).sqrt().float()
        apply_masked_update(p, uhat.view(p.shape).masked_fill_(~ok, 0.0), first_moment(p, state, group),
                           clip_scale_t(c2, u_rms, group), group, step_size, ok)
        return ok, (q, u, k, error)
