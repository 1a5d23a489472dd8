"""The ``step()`` both baselines share: the closure, then one update per parameter with a gradient."""
from __future__ import annotations

import torch


class ParamwiseOptimizer(torch.optim.Optimizer):
    """Subclasses implement ``update(p, grad, state, group)``."""

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, self.state[p], group)
        return loss
