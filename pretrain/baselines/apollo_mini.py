"""APOLLO-Mini (Zhu et al., 2024, "APOLLO: SGD-like Memory, AdamW-level Performance"), written
from the paper's description. For a matrix gradient G (m x n, m <= n; transposed otherwise):

    R   = P G                 P: r x m random Gaussian, entries N(0, 1/r), resampled every
                              ``update_proj_gap`` steps (only its seed is kept)
    M, V: Adam's moments of R (r x n each), bias-corrected; R~ = M^ / (sqrt(V^) + eps)
    s   = ||R~|| / ||R||      one scaling factor for the whole tensor (the "Mini" variant, rank 1)
    U   = scale * s * G       scale = sqrt(128) for APOLLO-Mini
    norm-growth limiter: if ||U|| > gamma ||U_prev||, U *= gamma ||U_prev|| / ||U|| (gamma 1.01)
    W  -= lr U                (+ decoupled weight decay)

So the optimizer state of a matrix is 2 r n numbers plus a scalar: SGD-level memory at r = 1.
Parameters in groups with ``apollo=False`` (by default: everything that is not a matrix) get
plain AdamW; ``megatron_gpt_groups`` puts only the transformer layers' matrices under APOLLO
(embeddings, output layer, norms and biases under AdamW), the usual choice for these methods.
The moments are kept when the projection is resampled.
"""
from __future__ import annotations

import math

import torch

from .base import ParamwiseOptimizer


class ApolloMini(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 rank: int = 1, scale: float = math.sqrt(128), update_proj_gap: int = 200,
                 norm_growth_limit: float = 1.01, seed: int = 0, apollo: bool | None = None):
        if lr <= 0:
            raise ValueError(f"ApolloMini: lr must be > 0, got {lr!r}")
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"ApolloMini: rank and update_proj_gap must be >= 1, got {rank!r}, {update_proj_gap!r}")
        if norm_growth_limit is not None and norm_growth_limit <= 1.0:
            raise ValueError(f"ApolloMini: norm_growth_limit must be > 1 (or None), got {norm_growth_limit!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, scale=scale,
                        update_proj_gap=update_proj_gap, norm_growth_limit=norm_growth_limit, apollo=apollo)
        super().__init__(params, defaults)
        self.seed = seed
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def projection(self, p: torch.Tensor, step: int) -> torch.Tensor:
        """The r x min(shape) projection used at 1-based ``step``: N(0, 1/r) entries, drawn from a
        generator seeded by (seed, the parameter's index, which projection period this is)."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        period = (step - 1) // group["update_proj_gap"]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self._index[p]) * 1_000_003 + period)
        m = min(p.shape[0], p[0].numel())
        r = group["rank"]
        return (torch.randn(r, m, generator=gen) / math.sqrt(r)).to(device=p.device, dtype=p.dtype)

    @staticmethod
    def uses_apollo(p: torch.Tensor, group: dict) -> bool:
        return p.ndim >= 2 if group["apollo"] is None else bool(group["apollo"])

    def update(self, p, grad, state, group) -> None:
        state["step"] = state.get("step", 0) + 1
        update = self._apollo_update(p, state, group) if self.uses_apollo(p, group) else \
            self._moments(grad, state, group)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    @staticmethod
    def _moments(x: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Adam's bias-corrected normalized step of ``x`` (the moments live in ``state``)."""
        b1, b2 = group["betas"]
        t = state["step"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(x)
            state["exp_avg_sq"] = torch.zeros_like(x)
        state["exp_avg"].lerp_(x, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(x, x, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - b1**t) / denom

    def _apollo_update(self, p, state, group):
        g = p.grad.reshape(p.shape[0], -1)
        wide = g.shape[0] <= g.shape[1]
        gm = g if wide else g.T  # m x n with m <= n
        r_proj = self.projection(p, state["step"]) @ gm
        normalized = self._moments(r_proj, state, group)
        s = normalized.norm() / r_proj.norm().clamp_min(torch.finfo(r_proj.dtype).tiny)
        update = (group["scale"] * s) * p.grad
        limit = group["norm_growth_limit"]
        norm = update.norm()
        if limit is not None and "prev_norm" in state:
            prev = state["prev_norm"]
            cap = limit * prev
            if prev > 0 and norm > cap:
                update = update * (cap / norm)
                norm = cap
        state["prev_norm"] = norm.clone() if torch.is_tensor(norm) else torch.tensor(norm)
        return update


def megatron_gpt_groups(named_params) -> list[dict]:
    """APOLLO on the transformer layers' matrices; AdamW on embeddings, output layer, norms, biases."""
    low, regular = [], []
    for name, p in named_params:
        (low if p.ndim == 2 and "layers." in name else regular).append(p)
    return [g for g in (dict(params=low, apollo=True), dict(params=regular, apollo=False)) if g["params"]]
