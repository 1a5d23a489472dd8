"""The logged norms of one optimizer step: grad-norm, update-norm and optimizer-state bytes.

Measured only on logging steps (``Engine.train_step(..., measure=True)``); other steps run
exactly as before. Every norm is summed on the device and read once, when the metrics are
built (the logging step reads the loss anyway), so the hot path gains no host sync.

* **grad_norm**: the global L2 norm of the gradients before clipping (the number
  ``torch.nn.utils.clip_grad_norm_`` returns). With a fused-backward optimizer (AdaLomo, LOMO)
  the gradients exist one parameter at a time inside backward: a post-accumulate hook, run
  before memopt's update hook, adds each one's squared norm (memopt's fused path computes the
  same sum only in its two-pass clipping mode, and keeps it internal). DeepSpeed: ZeRO's own
  global norm (``engine.get_global_grad_norm()``).
* **update_norm**: the L2 norm of the parameter change of the step, ``||w_after - w_before||``.
  Ordinary steps: a copy of the (local) parameters taken before the update, on logging steps
  only (one more copy of this rank's weights for the length of the step). Fused backward: a
  copy of one parameter at a time, taken in the same hook and compared at the next parameter's
  hook (the largest parameter's size at most).
* **optimizer_state_bytes**: ``memopt.base.optimizer_state_bytes`` of this rank's optimizer,
  summed over the ranks that hold different parts of it (FSDP2 and DeepSpeed ZeRO >= 1: all
  ranks; single/DDP: the TP group, if any).

Every rank adds the squares of the elements it holds, divided by how many ranks hold the same
elements (replicas, TP-replicated tensors), and one all-reduce over the world sums them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from memopt.base import optimizer_state_bytes


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(this rank's tensor, whether it is a DTensor shard: FSDP2 splits it over the DP ranks)."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        return to_local(), True
    return t, False


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().square().sum()


class SquaredSum:
    """A global squared norm from local tensors. Each local square is divided by ``copies``, the
    number of ranks holding the same elements (a DDP replica: DP, a TP-replicated tensor: TP,
    an FSDP2 / ZeRO-3 shard or a TP slice: 1), so one all-reduce over the world counts every
    element once (the rule of engines/grad_norm.py)."""

    def __init__(self):
        self.parts: dict = {}

    def set(self, key, sq: torch.Tensor, copies: int) -> None:
        # Keyed, so a second backward pass over the same parameter (fused two-pass clipping)
        # replaces the first pass's value instead of adding to it.
        self.parts[key] = sq / copies

    def norm(self) -> torch.Tensor | None:
        if not self.parts:
            return None
        total = torch.stack(list(self.parts.values())).sum()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank measures the same steps and holds the same parameters: all call it.
            dist.all_reduce(total)
        return total.sqrt()


class StepNorms:
    """Grad- and update-norm of one step. ``tensors``: (parameter, its local tensor, copies:
    how many ranks hold the same elements, see ``SquaredSum``)."""

    def __init__(self, tensors: list[tuple[torch.Tensor, torch.Tensor, bool]], fused: bool):
        self.tensors = tensors
        self.fused = fused
        self.grads = SquaredSum()
        self.updates = SquaredSum()
        self.grad_norm = None  # an engine may set it (DeepSpeed: ZeRO's own norm)
        self._before = None if fused else [local.detach().clone() for _, local, _ in tensors]
        self._pending = None

    # -- ordinary steps: gradients in .grad after backward, parameters copied before the step ----
    def gradients_before_update(self) -> None:
        for p, _, copies in self.tensors:
            if p.grad is not None:
                self.grads.set(id(p), _sq(local_part(p.grad)[0]), copies)

    def _updates_after_step(self) -> None:
        for (p, local, copies), before in zip(self.tensors, self._before):
            self.updates.set(id(p), _sq(local.detach() - before), copies)
        self._before = None

    # -- fused backward: one parameter at a time, inside backward -------------------------------
    @contextlib.contextmanager
    def watch_fused_backward(self):
        """Hooks on every parameter, registered before the fused update's own, so they see each
        gradient before the update frees it and each parameter before it changes."""
        local_of = {id(p): (local, copies) for p, local, copies in self.tensors}

        def before_update(p):
            self._finish_pending()
            local, copies = local_of[id(p)]
            self.grads.set(id(p), _sq(local_part(p.grad)[0]), copies)
            self._pending = (id(p), local, copies, local.detach().clone())

        handles = [p.register_post_accumulate_grad_hook(before_update) for p, _, _ in self.tensors]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._finish_pending()

    def _finish_pending(self) -> None:
        if self._pending is not None:
            key, local, copies, before = self._pending
            self.updates.set(key, _sq(local.detach() - before), copies)
            self._pending = None

    def finish(self) -> dict:
        """After the update: {"grad_norm", "update_norm"} as 0-d tensors (or floats), None where unknown."""
        if self._before is not None:
            self._updates_after_step()
        grad_norm = self.grad_norm if self.grad_norm is not None else self.grads.norm()
        return dict(grad_norm=grad_norm, update_norm=self.updates.norm())


def optimizer_state_total(optimizer, group=None) -> int:
    """Optimizer-state bytes of this rank, summed over ``group`` (the ranks that hold different
    parts of the state; None: every rank holds all of it)."""
    local = optimizer_state_bytes(optimizer)
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return local
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    total = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())


def step_scalars(engine) -> dict:
    """The logged scalars of the step just taken: grad_norm and update_norm (when measured and
    known) and optimizer_state_bytes. The norms' one host read happens here."""
    out = {k: float(v) for k, v in (engine.last_norms or {}).items() if v is not None}
    out["optimizer_state_bytes"] = engine.optimizer_state_bytes()
    return out
