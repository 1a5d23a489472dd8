"""The engine protocol: how a model and its optimizer are run on one or many processes.

The model knows nothing of engines; an engine wraps it from outside, owns the optimizer and the
LR schedule, runs one optimizer step over a list of micro-batches (gradient accumulation, the
non-finite check, DeepSpeed's own loss scaling all live here), and saves/loads its part of a
checkpoint. The trainer calls only :meth:`Engine.train_step`, ``save``, ``load`` and reads
``model`` (for forward passes), ``module`` (the unwrapped model), ``optimizer``, ``scheduler``
and ``lr``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from memopt.registry import FUSED_BACKWARD

from pretrain.dist import all_ranks_agree

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

    @property
    def lr(self) -> float | None:
        """The lr the next update uses."""
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[dict], loss_fn: LossFn) -> list[float] | None:
        """One optimizer step over ``micro_batches`` (gradients accumulated over them). Returns
        this rank's per-micro-batch losses, or None when some rank's loss was not finite: then
        the step is skipped everywhere and the schedule does not advance."""
        self.model.train()
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
            self.backward(loss, recompute, accum)
        self.apply_update()
        return losses

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
