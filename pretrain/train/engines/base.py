"""The engine protocol: how a model and its optimizer are run on one or many processes.

The model knows nothing of engines; an engine wraps it from outside, owns the optimizer and the
LR schedule, runs one optimizer step over a list of micro-batches (gradient accumulation, the
non-finite check, DeepSpeed's own loss scaling all live here), and saves/loads its part of a
checkpoint. The trainer calls only :meth:`Engine.train_step`, ``save``, ``load`` and reads
``model`` (for forward passes), ``module`` (the unwrapped model), ``optimizer``, ``scheduler``
and ``lr``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from memopt.registry import FUSED_BACKWARD

from pretrain.dist import all_ranks_agree
from pretrain.train.step_norms import StepNorms, local_part, optimizer_state_total

LossFn = Callable[[torch.nn.Module, dict], tuple]  # (model, batch) -> (loss, extra)


def use_fused_backward(cfg, engine_supports_it: bool = True, engine_name: str = "single") -> bool:
    """Fused backward is the default for lomo/adalomo where the engine supports it; with gradient
    accumulation it falls back to ordinary steps (documented), unless the user forced it on,
    which is an error (as is forcing it on an engine without it)."""
    if cfg.optimizer.name not in FUSED_BACKWARD or cfg.optimizer.fused_backward == "off":
        return False
    forced = cfg.optimizer.fused_backward == "on"
    if not engine_supports_it:
        if forced:
            raise ValueError(
                f"optimizer.fused_backward=on is not supported with engine.kind={engine_name}; use auto or off "
                "(the optimizer then runs ordinary steps, with the same update)"
            )
        return False
    if cfg.train.grad_accum_steps > 1:
        if forced:
            raise ValueError(
                "optimizer.fused_backward=on cannot be combined with train.grad_accum_steps > 1: the fused "
                "update runs inside every micro-batch's backward; set fused_backward=auto to fall back to "
                "ordinary steps"
            )
        return False
    return True


class Engine:
    """What every engine implements. Subclasses set ``model``, ``module``, ``optimizer`` and
    ``scheduler`` in ``__init__`` and define the four hooks below; :meth:`train_step` is shared."""

    name = "engine"
    model: torch.nn.Module
    module: torch.nn.Module
    fused = False  # updates inside backward (set by engines that support it)
    grads_in_dot_grad = True  # the step's gradients are in p.grad before apply_update
    # The last measured step's norms (``train_step(..., measure=True)``), see step_norms.py.
    last_norms: dict | None = None

    @property
    def lr(self) -> float | None:
        """The lr the next update uses."""
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[dict], loss_fn: LossFn, measure: bool = False) -> list[float] | None:
        """One optimizer step over ``micro_batches`` (gradients accumulated over them). Returns
        this rank's per-micro-batch losses, or None when some rank's loss was not finite: then
        the step is skipped everywhere and the schedule does not advance. ``measure`` (logging
        steps): also measure grad- and update-norm into ``last_norms`` (step_norms.py)."""
        self.model.train()
        norms = StepNorms(self.norm_tensors(), self.fused) if measure else None
        self.last_norms = None
        accum = len(micro_batches)
        losses = []
        for batch in micro_batches:
            rng = torch.get_rng_state()
            loss, _ = loss_fn(self.model, batch)

            def recompute(batch=batch, rng=rng):
                torch.set_rng_state(rng)  # the same dropout masks as the first forward
                return loss_fn(self.model, batch)[0]

            if not all_ranks_agree(bool(torch.isfinite(loss.detach()))):
                self.skip_step()
                return None
            losses.append(float(loss.detach()))
            with norms.watch_fused_backward() if norms is not None and self.fused else contextlib.nullcontext():
                self.backward(loss, recompute, accum)
        if norms is not None and not self.fused and self.grads_in_dot_grad:
            norms.gradients_before_update()
        self.apply_update()
        if norms is not None:
            norms.grad_norm = self.step_grad_norm()
            self.last_norms = norms.finish()
        return losses

    # -- what the logged norms read (step_norms.py) ---------------------------------------------
    def norm_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(parameter, this rank's tensor of it, how many ranks hold the same elements) for every
        trained parameter: DDP replicas over DP, FSDP2 shards once; TP slices once, the rest
        over TP."""
        from pretrain.models.parallel import data_parallel_size, tensor_parallel_size

        tp, dp = tensor_parallel_size(), data_parallel_size()
        split = getattr(self, "tp_dims", {})
        out = []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                local, dp_sharded = local_part(p)
                out.append((p, local, (1 if name in split else tp) * (1 if dp_sharded else dp)))
        return out

    def step_grad_norm(self):
        """The engine's own pre-clipping gradient norm of the step just taken, or None (then
        it is measured from the gradients)."""
        return None

    def optimizer_state_group(self):
        """The ranks holding different parts of the optimizer state (None: each holds all of
        it): here the TP group when TP > 1, as replicas over DP hold the same state."""
        from pretrain.models.parallel import tensor_parallel_group, tensor_parallel_size

        return tensor_parallel_group() if tensor_parallel_size() > 1 else None

    def optimizer_state_bytes(self) -> int:
        """Optimizer-state bytes of the whole run (summed over ranks where sharded)."""
        return optimizer_state_total(self.optimizer, self.optimizer_state_group())

    # -- hooks -------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, recompute_loss: Callable[[], torch.Tensor], accum: int) -> None:
        """Backward of one micro-batch's (unscaled) loss; ``recompute_loss`` re-runs its forward
        (fused two-pass clipping)."""
        raise NotImplementedError

    def apply_update(self) -> None:
        """The optimizer step and schedule step after the last micro-batch."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule does not advance."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError
