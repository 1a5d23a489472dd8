"""Shared helpers for the optimizer tests: the tensor shapes every optimizer is checked on (1-D, square, tall, wide, 3-D) and a driver."""
from __future__ import annotations

import torch

# 1-D, square, tall, wide and 3-D tensors.
SHAPES = [(17,), (32, 32), (64, 9), (9, 64), (3, 8, 12)]


def make_params(seed: int = 0, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def make_grads(steps: int, seed: int = 1, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def run_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def max_rel_diff(xs, ys) -> float:
    """max over tensors of max|x - y| / max|y| (relative to the reference ``ys``)."""
    worst = 0.0
    for x, y in zip(xs, ys):
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


class ParamModule(torch.nn.Module):
    """A module whose parameters are given tensors, with loss = sum_i <p_i, C_i> so grad p_i = C_i."""

    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in params])

    def loss(self, coeffs):
        return sum((p * c).sum() for p, c in zip(self.ps, coeffs))
