"""Adafactor (Shazeer & Stern 2018), numerically the rule of ``transformers.optimization.Adafactor``.

Differences from transformers, on purpose:
* with ``beta1`` the first moment averages the clipped update U *before* the step size is applied
  (the paper's rule); transformers averages the already lr-scaled update, which makes the moment
  depend on the step-size schedule (transformers#34506, fairseq#5561). With ``beta1=None`` (the
  default) both agree to fp32 round-off.
* the update runs in cache-sized row blocks with no m x n temporary (see ``memopt.factored``).
"""
from __future__ import annotations

import math

import torch

from . import kernels
from .base import all_finite, check_beta, check_nonnegative, check_positive, is_finite
from .fused_path import FusedKernelOptimizer
from .paths import resolve_fused
from .factored import (
    add_factor_partials,
    apply_factored_update,
    apply_weight_decay,
    as_matrices,
    clip_divisor,
    commit_factors,
    factored_stats,
    factored_update_into,
    sharded_factors,
    stacked_dense_u,
    stacked_factored_u,
)
from .multitensor import clip_divisor as stacked_clip_divisor
from .multitensor import apply_update_, commit, expand, norms, per_param, stacked
from .sharding import Reducer


def decay_beta(step: int, decay_rate: float) -> float:
    """b_t = 1 - t**decay_rate (b_1 = 0: the first step's factors are just G*G + eps1)."""
    return 1.0 - math.pow(step, decay_rate)


class FactoredSecondMoment(FusedKernelOptimizer):
    """Shared body of Adafactor and AdaLomo: factored second moment, RMS clip, relative step."""

    supports_sharding = True

    # How weight decay is rounded: as transformers (w += -d*w) or as lomo_optim (w *= 1-d).
    multiplicative_decay = False

    def _init_state(self, p, state, group):
        shape = p.shape
        kw = dict(dtype=torch.float32, device=p.device)
        if p.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **kw)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **kw)
        if group.get("beta1") is not None:
            state["exp_avg"] = torch.zeros(shape, **kw)

    def _init_sharded_state(self, layout, state, group, device=None):
        kw = dict(dtype=torch.float32, device=device)
        if layout.factored:
            held = layout.holds_factors
            state["exp_avg_sq_row"] = torch.zeros(layout.window if held else 0, **kw)
            state["exp_avg_sq_col"] = torch.zeros(layout.full_shape[:-2] + layout.full_shape[-1:] if held else (0,), **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(layout.length, **kw)
        if group.get("beta1") is not None:
            state["exp_avg"] = torch.zeros(layout.length, **kw)

    def _sharded_update(self, units, pg):
        """Phase 1: partial sums (G^2 by row/column, W^2, sum of r) -> one all-reduce.
        Phase 2: new factors, local U and its partial sum of U^2 -> one all-reduce. Phase 3: update."""
        red = Reducer(pg)
        h = {}
        for u in units:
            L, g = u.layout, u.grad
            g2 = g.square()
            d = h[id(u)] = {"g2": g2}
            if L.factored:
                d["fac"] = add_factor_partials(L, red, g2, u.state["exp_avg_sq_row"])
            else:
                d["tot"] = red.add(g2.sum())
            if u.group["scale_parameter"]:
                d["w2"] = red.add(u.param.square().sum())
        red.run()
        ok = all_finite([red.get(h[id(u)]["fac"].col if u.layout.factored else h[id(u)]["tot"]) for u in units])
        red2 = Reducer(pg)
        for u, fine in zip(units, ok):
            if not fine:
                continue
            L, g, d, st, grp = u.layout, u.grad, h[id(u)], u.state, u.group
            eps1, _ = grp["eps"]
            beta = self._beta2(grp, u.step)
            if L.factored and not L.holds_factors:
                d["u"] = u.grad  # empty
            elif L.factored:
                a, s = sharded_factors(L, red, d["fac"], st["exp_avg_sq_row"], st["exp_avg_sq_col"], beta, eps1)
                d["u"] = L.scale(g, a, s)
            else:
                v = st["exp_avg_sq"]
                v.mul_(beta).add_(d["g2"].add_(eps1), alpha=1.0 - beta)
                d["u"] = g * v.rsqrt()
            d["u2"] = red2.add(d["u"].square().sum())
        red2.run()
        for u, fine in zip(units, ok):
            if not fine:
                continue
            L, d, grp, w = u.layout, h[id(u)], u.group, u.param
            _, eps2 = grp["eps"]
            rho = self._step_size(grp, u.step)
            if grp["scale_parameter"]:
                scale = max(eps2, math.sqrt(float(red.get(d["w2"])) / max(L.numel, 1)))
                self._note_scale(u.state, scale)
                lr_t = rho * scale
            else:
                lr_t = rho
            div = clip_divisor(red2.get(d["u2"]), L.numel, grp["clip_threshold"])
            apply_weight_decay(w, lr_t * grp["weight_decay"], self.multiplicative_decay)
            beta1 = grp.get("beta1")
            if beta1 is not None:
                mom = u.state["exp_avg"]
                mom.mul_(beta1).add_(d["u"], alpha=(1.0 - beta1) / div)
                w.add_(mom, alpha=-lr_t)
            else:
                w.add_(d["u"], alpha=-lr_t / div)
        return ok

    def _step_size(self, group: dict, step: int) -> float:
        """rho_t: the learning rate before parameter scaling."""
        return group["lr"]

    def _note_scale(self, state: dict, scale) -> None:
        """Hook: the parameter scale max(eps2, RMS(W)) of the update being applied with ``state``
        (a float, or a 0-d device tensor on the sync-free path)."""

    def _beta2(self, group: dict, step: int) -> float:
        return decay_beta(step, group["decay_rate"])

    def _step_size_t(self, group: dict, t: torch.Tensor):
        """rho_t of the sync-free path: a number, or (N,) from the device steps ``t``."""
        return group["lr"]

    def _foreach_update(self, ws, grads, states, group, t):
        """The reference rule on a stack of N parameters (``MemoptOptimizer._foreach_update``)."""
        eps1, eps2 = group["eps"]
        one_minus_beta = t.pow(group["decay_rate"])
        beta = 1.0 - one_minus_beta
        if grads.dim() >= 3:
            u, ok = stacked_factored_u(grads, states, beta, one_minus_beta, eps1)
        else:
            u, ok = stacked_dense_u(grads, states, beta, one_minus_beta, eps1)
        div = stacked_clip_divisor(u, group["clip_threshold"])
        lr_t = per_param(self._step_size_t(group, t), t)
        if group["scale_parameter"]:
            scale = (norms(ws) / math.sqrt(max(u[0].numel(), 1))).clamp_(min=eps2)
            for st, s in zip(states, scale.unbind(0)):
                self._note_scale(st, s)
            lr_t = lr_t * scale
        # A skipped parameter gets step size 0 and a zero update: W, M and the decay stay exact.
        lr_t = torch.where(ok, lr_t, 0.0)
        keep = expand(ok, u.dim())
        beta1 = group.get("beta1")
        wd = group["weight_decay"]
        decay = lr_t * wd if wd else None
        if beta1 is None:
            u.mul_(expand(-lr_t / div, u.dim())).masked_fill_(~keep, 0.0)
            apply_update_(ws, u, decay, self.multiplicative_decay)
            return ok
        # M = beta1*M + (1-beta1)*U, then W = W*decay - lr_t*M; beta1 -> 1 and U -> 0 where skipped.
        u.mul_(expand((1.0 - beta1) / div, u.dim())).masked_fill_(~keep, 0.0)
        mom = stacked(states, "exp_avg")
        mom.mul_(expand(torch.where(ok, beta1, 1.0), u.dim())).add_(u)
        commit(states, "exp_avg", mom)
        apply_update_(ws, torch.mul(mom, expand(-lr_t, u.dim()), out=u), decay, self.multiplicative_decay)
        return ok

    def _factored_kernel(self, p, grad, state, group, host=False, **scalars):
        """``memopt.kernels.factored_step_`` on ``p`` and its state (one call, two passes over
        memory) with the step's ``beta2`` / ``step_size`` (and ``one_minus_beta2``); (ok, scale),
        as Python values with ``host`` (``factored_step_host``)."""
        eps1, eps2 = group["eps"]
        return (kernels.factored_step_host if host else kernels.factored_step_)(
            p, grad.contiguous(), sq_row=state.get("exp_avg_sq_row"), sq_col=state.get("exp_avg_sq_col"),
            sq=state.get("exp_avg_sq"), exp_avg=state.get("exp_avg"), eps1=eps1, eps2=eps2,
            clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
            multiplicative_decay=self.multiplicative_decay, scale_parameter=group["scale_parameter"],
            beta1=group.get("beta1"), **scalars,
        )

    def _weight_row_sq(self, p, state, group):
        """[state, row sums of W^2, valid] kept for the C++ kernel's speculation (cpu_kernels.cpp,
        factored_step: lr_t from the sums of the W it last wrote, checked on every row and repaired
        if W changed in between), or None where it does not apply. Outside the state dict: it is
        a cache, rebuilt by the first step after a load."""
        # Only for a W that persists between steps: a bf16 parameter is stepped through a fresh
        # fp32 copy (never the bits the kernel wrote), so every speculation would be repaired.
        if not (group["scale_parameter"] and p.dim() >= 2 and p.device.type == "cpu" and self.state.get(p) is state):
            return None
        from .kernels import cpu  # loaded already: the C++ backend is what asks

        if not cpu.SPECULATE_WEIGHT_NORM:
            return None
        cache = self.__dict__.setdefault("_row_sq_cache", {})
        rows = p.numel() // p.shape[-1]
        entry = cache.get(id(state))
        if entry is None or entry[0] is not state or entry[1].numel() != rows:
            # The state rides along so that its id cannot be reused while the entry exists.
            entry = cache[id(state)] = [state, torch.empty(rows, dtype=torch.float32), False]
        return entry

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.__dict__.pop("_row_sq_cache", None)

    def _fused_update(self, p, grad, state, group, step) -> bool:
        """``_update`` by the kernel at host ``step`` (the C++ backend's path)."""
        cached = self._weight_row_sq(p, state, group)
        ok, scale = self._factored_kernel(p, grad, state, group, host=True, beta2=self._beta2(group, step),
                                          step_size=self._step_size(group, step),
                                          **({} if cached is None else
                                             {"weight_row_sq": cached[1], "weight_row_sq_valid": cached[2]}))
        if not ok:
            return False
        if cached is not None:
            cached[2] = True
        if group["scale_parameter"]:
            self._note_scale(state, scale)
        return True

    def _fused_update_t(self, p, grad, state, group, t):
        """The kernel at the device step ``t`` (``memopt.fused_path``): b_t and rho_t as 0-d tensors,
        1 - b_t = t**decay_rate passed as computed (1 - an fp32 b_t near 1 would lose digits)."""
        one_minus_beta = t.pow(group["decay_rate"])
        ok, scale = self._factored_kernel(p, grad, state, group, beta2=1.0 - one_minus_beta,
                                          one_minus_beta2=one_minus_beta, step_size=self._step_size_t(group, t))
        if group["scale_parameter"]:
            # Noted on a skipped step too (RMS of the unchanged W), as on the foreach path.
            self._note_scale(state, scale)
        return ok

    def _update(self, p, grad, state, group, step):
        if p.is_contiguous() and resolve_fused(group, p.device):
            return self._fused_update(p, grad, state, group, step)
        eps1, eps2 = group["eps"]
        beta = self._beta2(group, step)
        rho = self._step_size(group, step)
        clip = group["clip_threshold"]
        wd = group["weight_decay"]
        beta1 = group.get("beta1")
        numel_all = p.numel()

        if p.dim() < 2:
            g2 = grad.square()
            if not is_finite(g2.sum()):
                return False
            v = state["exp_avg_sq"]
            v.mul_(beta).add_(g2.add_(eps1), alpha=1.0 - beta)
            u = grad * v.rsqrt()
            u.div_(clip_divisor(u.square().sum(), u.numel(), clip))
            lr_t = rho
            if group["scale_parameter"]:
                scale = max(eps2, float(torch.linalg.vector_norm(p)) / math.sqrt(max(numel_all, 1)))
                self._note_scale(state, scale)
                lr_t = rho * scale
            apply_weight_decay(p, lr_t * wd, self.multiplicative_decay)
            if beta1 is not None:
                m = state["exp_avg"]
                m.mul_(beta1).add_(u, alpha=1.0 - beta1)
                u = m
            p.add_(u, alpha=-lr_t)
            return True

        # >= 2-D: every leading index is its own (m, n) matrix with its own factors.
        gs, ws = as_matrices(grad), as_matrices(p)
        rows = state["exp_avg_sq_row"].view(gs.shape[0], -1)
        cols = state["exp_avg_sq_col"].view(gs.shape[0], -1)
        stats = [
            factored_stats(gs[i], rows[i], beta, eps1, w=ws[i] if group["scale_parameter"] else None)
            for i in range(gs.shape[0])
        ]
        if not is_finite(torch.stack([s.row_sq.sum() for s in stats])):
            return False
        if group["scale_parameter"]:
            w_sq = sum(float(s.w_sq) for s in stats)
            scale = max(eps2, math.sqrt(w_sq / numel_all))
            self._note_scale(state, scale)
            lr_t = rho * scale
        else:
            lr_t = rho
        decay = lr_t * wd
        exp_avg = as_matrices(state["exp_avg"]) if beta1 is not None else None
        factors = [commit_factors(st, rows[i], cols[i], beta, eps1) for i, st in enumerate(stats)]
        # The clip is per parameter tensor: one RMS over all of its matrices.
        div = clip_divisor(sum(f[2] for f in factors), numel_all, clip)
        for i, (a, s, _) in enumerate(factors):
            if exp_avg is None:
                apply_factored_update(
                    ws[i], gs[i], a, s, scale=-lr_t / div, decay=decay, multiplicative_decay=self.multiplicative_decay
                )
            else:
                # M = beta1*M + (1-beta1)*U, then W = W*decay - lr_t*M
                m = exp_avg[i]
                m.mul_(beta1)
                u = torch.empty_like(m)
                factored_update_into(u, gs[i], a, s, scale=(1.0 - beta1) / div)
                m.add_(u)
                apply_weight_decay(ws[i], decay, self.multiplicative_decay)
                ws[i].add_(m, alpha=-lr_t)
        return True


RELATIVE_STEP_NO_SCHEDULER = (
    "Adafactor: relative_step=True computes its own step size, there is no lr for an LR scheduler to "
    "scale; pass relative_step=False, lr=... to schedule it (transformers' AdafactorSchedule only reports "
    "the relative step and works as is)"
)


class _SchedulerCheckedGroup(dict):
    """A param group that refuses a torch LR scheduler's base lr of None (a relative step).

    torch's LRScheduler takes each group's base lr with ``group.setdefault("initial_lr", lr)``,
    on the group dicts themselves, whatever object wraps the optimizer. (``load_state_dict``
    is given these too; ``Adafactor.__setattr__`` covers a scheduler attached to the optimizer itself.)"""

    def setdefault(self, key, default=None):
        if key == "initial_lr" and default is None and key not in self and self.get("relative_step"):
            raise ValueError(RELATIVE_STEP_NO_SCHEDULER)
        return super().setdefault(key, default)


class Adafactor(FactoredSecondMoment):
    """Adafactor with transformers' options and defaults.

    Args:
        lr: external learning rate; must be None when ``relative_step`` (the step size is then
            min(1e-2, 1/sqrt(t)), or min(1e-6*t, 1/sqrt(t)) with ``warmup_init``).
        eps: (eps1 added to G*G, eps2 lower bound of RMS(W) for the parameter scale).
        clip_threshold: the update is divided by max(1, RMS(U)/clip_threshold).
        decay_rate: b_t = 1 - t**decay_rate for the second-moment EMA.
        beta1: first-moment coefficient, None (default) keeps no first moment.
        weight_decay: W -= weight_decay * alpha_t * W (alpha_t the scaled step size).
        scale_parameter: scale the step by max(eps2, RMS(W)).
        relative_step: time-dependent step size instead of ``lr``.
        warmup_init: linear warm-up of the relative step.
        on_nonfinite: "skip" (default) or "raise" for gradients holding inf/nan.
        foreach: None (default: True on accelerators, False on CPU), True (the sync-free
            multi-tensor path), False (the per-parameter, cache-blocked reference path).
        fused: None (default: the fused C++ kernel on CPU when it builds and foreach is None),
            True (memopt.kernels: C++ on CPU, Triton on CUDA), False (torch ops).
    """

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        if lr is not None and relative_step:
            raise ValueError("Adafactor: lr must be None when relative_step=True (pass relative_step=False to use lr)")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs an lr")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True requires relative_step=True")
        check_positive("lr", lr, allow_none=True)
        check_factored_hparams(eps, clip_threshold, decay_rate, weight_decay)
        if beta1 is not None:
            check_beta("beta1", beta1)
        defaults = dict(
            lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init,
        )
        # id(state) -> (state, scale of its last update): the state rides along so that its id
        # cannot be reused by another dict while the entry exists.
        self._scales: dict[int, tuple[dict, float | torch.Tensor]] = {}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite, foreach=foreach, fused=fused)

    def __setattr__(self, name, value):
        # A torch LRScheduler wraps ``optimizer.step`` in its constructor after setting each
        # group's "initial_lr" and before its first get_lr(): the one moment memopt sees it attach.
        # A relative step has no lr to scale and torch would fail there with "None * float".
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):
            for group in self.param_groups:
                if group["relative_step"] and group.get("initial_lr") is None:
                    raise ValueError(RELATIVE_STEP_NO_SCHEDULER)
        super().__setattr__(name, value)

    def add_param_group(self, param_group: dict) -> None:
        # A scheduler built on a wrapper of this optimizer (accelerate's AcceleratedOptimizer, as
        # transformers 5's Trainer does) patches the wrapper's step: the group sees it instead.
        super().add_param_group(_SchedulerCheckedGroup(param_group))

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader makes the groups from (deep copies of) the saved ones; accelerate reloads
        # the state when it wraps the optimizer, before any scheduler is attached.
        groups = [_SchedulerCheckedGroup(g) for g in state_dict["param_groups"]]
        super().load_state_dict(dict(state_dict, param_groups=groups))
        self._scales.clear()

    def _note_scale(self, state, scale):
        self._scales[id(state)] = (state, scale)

    def _get_lr(self, group: dict, state: dict):
        """transformers' ``Adafactor._get_lr``, which ``AdafactorSchedule`` calls after each step:
        the step size of the last update made with ``state`` (rho_t times max(eps2, RMS(W)), W
        before that update). A 0-d device tensor where the step count is one (the sync-free path),
        so asking costs no host sync; whoever logs it reads it."""
        step = state.get("step", 0)
        if torch.is_tensor(step):
            rho = self._step_size_t(group, step.clamp(min=1))
        else:
            rho = self._step_size(group, max(step, 1))
        if not group["scale_parameter"]:
            return rho
        # Before any update transformers' state["RMS"] is 0, so its scale is eps2.
        noted = self._scales.get(id(state))
        return rho * (noted[1] if noted is not None else group["eps"][1])

    def _step_size(self, group, step):
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            return min(min_step, 1.0 / math.sqrt(step))
        return group["lr"]

    def _step_size_t(self, group, t):
        if group["relative_step"]:
            min_step = t * 1e-6 if group["warmup_init"] else 1e-2
            return torch.clamp(t.rsqrt(), max=min_step)
        return group["lr"]


def check_factored_hparams(eps, clip_threshold, decay_rate, weight_decay) -> None:
    """The checks Adafactor and AdaLomo share; raises ValueError naming the bad value."""
    if len(tuple(eps)) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
    check_nonnegative("eps[0]", eps[0])
    check_nonnegative("eps[1]", eps[1])
    check_positive("clip_threshold", clip_threshold)
    if not decay_rate < 0:
        raise ValueError(f"decay_rate must be negative (b_t = 1 - t**decay_rate), got {decay_rate!r}")
    check_nonnegative("weight_decay", weight_decay)
