"""The sync-free per-parameter fused path: ``fused=True`` with a kernel backend that keeps every
scalar on the device (Triton on CUDA; ``memopt.kernels.sync_free``).

The per-parameter path of ``memopt.base`` keeps its step counter as a Python int and reads each
kernel's ``ok`` (and Adafactor's ``scale``) back to the host: on CUDA that is about two host
synchronisations per parameter per step, each draining the stream, and inside fused-backward
hooks they stall backward itself. Here instead, as on the multi-tensor path (``foreach``):

* ``state["step"]`` / ``state["nonfinite_skips"]`` are 0-d device tensors (``device_counters``)
  advanced by the kernel's ``ok`` on the device;
* the step-dependent scalars (beta2(t), the relative step size) are 0-d device tensors computed
  from the device step by the optimizer's ``_fused_update_t`` (the kernels' contract accepts them);
* ``ok`` is never read, except by ``on_nonfinite="raise"``, which has to know;
* fp16 loss-scale overflows in ``fused_backward`` arrive as a device ``gate`` that masks the update
  off without counting a skip (``MemoptOptimizer._step_foreach`` does the same).

The CPU C++ backend keeps the host path: it reads its scalars itself (free on CPU, no stream),
its ints keep the double-precision step scalars of the reference, and the CPU default
(``fused=None``) stays exactly what it was. Sharded parameters split across ranks never come
here: they take the phased, unfused ``_sharded_update`` (docs/sharding.md).
"""
from __future__ import annotations

import torch

from . import kernels
from .base import MemoptOptimizer, NonFiniteGradientError, device_counters
from .paths import resolve_fused
from .stochastic_rounding import write_back_


def sync_free_fused(opt: MemoptOptimizer, p: torch.Tensor, group: dict) -> bool:
    """Whether the per-parameter update of ``p`` (whole, local) runs the fused kernels on this
    path: fused resolved on for it, and a backend that needs no host value (not the C++ one)."""
    return (opt.has_fused_kernels and p.is_contiguous() and resolve_fused(group, p.device)
            and kernels.sync_free(p.device))


class FusedKernelOptimizer(MemoptOptimizer):
    """Base of the optimizers with ``memopt.kernels`` kernels (Adafactor, AdaLomo, CAME, LOMO).

    Besides ``_update`` (whose fused branch is the host path), a subclass implements
    ``_fused_update_t``; ``_apply_local`` sends a parameter on a sync-free backend there."""

    has_fused_kernels = True

    def _fused_update_t(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                        t) -> torch.Tensor:
        """The kernel update of fp32 contiguous ``p`` at 1-based step ``t`` (a 0-d fp32 device
        tensor; an int where a subclass's host path reuses it); returns ``ok`` as a 0-d bool on
        p's device, having changed nothing where it is False. Reads nothing back to the host."""
        raise NotImplementedError

    def _apply_local(self, p, grad, state, group, shape, target=None, key=None):
        if sync_free_fused(self, p, group):
            return self._apply_sync_free(p, grad, state, group, shape, target, key)
        return super()._apply_local(p, grad, state, group, shape, target, key)

    def gated_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, gate: torch.Tensor) -> torch.Tensor:
        """``update_param`` of a whole parameter on this path, turned into a no-op that counts no
        skip where the 0-d device bool ``gate`` is False (an fp16 loss-scale overflow)."""
        state = self.state[p]
        if not state:
            self._new_state(p, p, None, state, group, p.device)
        return self._apply_sync_free(p, grad, state, group, p.shape, gate=gate)

    def _apply_sync_free(self, p, grad, state, group, shape, target=None, key=None,
                         gate: torch.Tensor | None = None) -> torch.Tensor:
        """One update of ``p`` (``MemoptOptimizer._apply_local``'s arguments) without a host sync;
        returns ``ok`` (0-d device bool). ``target``: where a flat fp32 copy is written back to."""
        work = p if p.dtype == torch.float32 else p.detach().float()
        g32 = grad if grad.dtype == torch.float32 else grad.float()
        device_counters(state, work.device)
        step = state["step"]
        if work.numel() == 0:  # nothing to update (factored maths would divide by 0); its step counts
            step.add_(1)
            return torch.ones((), dtype=torch.bool, device=work.device)
        if gate is not None:  # a NaN gradient makes the kernel leave every bit alone
            g32 = g32.masked_fill(~gate, float("nan"))
        t = step + 1
        ok = self._fused_update_t(work, g32.contiguous(), state, group, t)
        step.add_(ok)
        skipped = ~ok if gate is None else ~ok & gate
        state["nonfinite_skips"].add_(skipped)
        if group["on_nonfinite"] == "raise" and bool(skipped):  # the one sync: "raise" has to know
            raise NonFiniteGradientError(
                f"{type(self).__name__}: non-finite gradient for a parameter of shape {tuple(shape)} at step "
                f"{int(t)}; pass on_nonfinite='skip' to skip such steps"
            )
        # A skipped update left ``work`` equal to the weight, which rounds back to itself.
        if work is not p:  # a low-precision weight (stochastic rounding: memopt.stochastic_rounding)
            write_back_(p, work, group, self.logical_index(p), t)
        if target is not None:
            write_back_(target, work.reshape(-1), group, self.logical_index(key), t)
        return ok
