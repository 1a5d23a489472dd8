"""Machinery shared by every memopt optimizer.

Each optimizer only writes ``_init_state`` and ``_update`` for *one* parameter; this base class
supplies the rest, identically for all of them:

* fp32 math: bf16/fp16 parameters and gradients are upcast for the update and the result is
  written back, so low-precision training keeps fp32 optimizer arithmetic.
* non-finite gradients never reach the state: ``_update`` checks a cheap statistic it computes
  anyway (e.g. the row sums of G*G) before it mutates anything and returns False when that is not
  finite; the step is then skipped for that parameter and counted in its state
  (``state["nonfinite_skips"]``), or ``on_nonfinite="raise"`` raises instead.
* a per-parameter step counter (``state["step"]``) that only advances on applied updates, so it
  counts optimizer steps, never micro-batches or skipped steps.
* ``update_param(p, grad)``: the update of a single parameter with an explicit gradient, which
  ``step()`` loops over and fused-backward hooks call from inside backward.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

NONFINITE_POLICIES = ("skip", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"`` when a gradient holds inf or nan."""


def check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_beta(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the whole tensor (a 0-d tensor)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class MemoptOptimizer(Optimizer):
    """Base class: subclasses implement ``_init_state`` and ``_update`` for one parameter."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], on_nonfinite: str = "skip"):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        defaults = dict(defaults, on_nonfinite=on_nonfinite)
        super().__init__(params, defaults)
        self._group_of: dict[torch.Tensor, dict] | None = None

    # -- hooks for subclasses -------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Create the state tensors of ``p`` (fp32, on p's device)."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, step: int) -> bool:
        """Update fp32 ``p`` in place with fp32 ``grad`` at 1-based ``step``.

        Must return False, having changed nothing, when the gradient is not finite.
        """
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._group_of = None

    def group_of(self, p: torch.Tensor) -> dict:
        """The parameter group that holds ``p``."""
        if self._group_of is None:
            self._group_of = {q: g for g in self.param_groups for q in g["params"]}
        try:
            return self._group_of[p]
        except KeyError:
            raise ValueError("this parameter is not managed by this optimizer") from None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update_param(p, p.grad, group)
        return loss

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict | None = None) -> bool:
        """Apply one update to ``p`` from ``grad``; returns False if it was skipped (non-finite)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if group is None:
            group = self.group_of(p)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["nonfinite_skips"] = 0
            self._init_state(p, state, group)
        work = p if p.dtype == torch.float32 else p.detach().float()
        g32 = grad if grad.dtype == torch.float32 else grad.float()
        step = state["step"] + 1
        if not self._update(work, g32, state, group, step):
            state["nonfinite_skips"] += 1
            if group["on_nonfinite"] == "raise":
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                    f"{tuple(p.shape)} at step {step}; pass on_nonfinite='skip' to skip such steps"
                )
            return False
        state["step"] = step
        if work is not p:
            p.copy_(work)
        return True

    @property
    def nonfinite_skips(self) -> int:
        """Total number of per-parameter updates skipped because the gradient was not finite."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def state_bytes(self) -> int:
        """Bytes of tensor state really held by this optimizer (what a user pays in memory)."""
        return optimizer_state_bytes(self)


def optimizer_state_bytes(opt: Optimizer) -> int:
    """Bytes of the tensor storages in ``opt.state`` (any torch optimizer), each counted once."""
    seen: set[int] = set()
    total = 0
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                storage = v.untyped_storage()
                key = storage.data_ptr()
                if key and key in seen:
                    continue
                seen.add(key)
                total += storage.nbytes()
    return total


def is_finite(x: torch.Tensor) -> bool:
    """True when the (small) statistic ``x`` holds no inf/nan. One host sync."""
    return bool(torch.isfinite(x).all())
