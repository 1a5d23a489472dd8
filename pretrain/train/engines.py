"""Engines: how a model and its optimizer are run on one or many processes.

The model knows nothing of these; an engine wraps it from outside (single process, DDP, FSDP2
or DeepSpeed), owns the optimizer and LR schedule, and knows how to save and load them. The
trainer only calls ``backward``, ``step``, ``skip_step``, ``save`` and ``load``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

import memopt
from memopt.registry import FUSED_BACKWARD

from pretrain.checkpoint.layout import DCP_DIR, MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_FULL_FILE, SCHEDULER_FILE
from pretrain.checkpoint.safe_load import first_error_line, safe_dcp_reader, safe_torch_load
from pretrain.errors import CheckpointError

from .dist import dist_rank
from .schedule import build_scheduler


def optimizer_kwargs(cfg) -> dict:
    """Hyperparameters for memopt.create_optimizer from the run config."""
    kw = dict(cfg.optimizer.hparams)
    kw["lr"] = cfg.optimizer.lr
    if cfg.optimizer.name == "adafactor":
        # The run's schedule drives the lr; Adafactor's own time-dependent relative step is
        # there for those who ask for it (hparams: {relative_step: true}, lr then ignored).
        kw.setdefault("relative_step", False)
        if kw["relative_step"]:
            kw["lr"] = None
    # Fused-backward optimizers clip inside backward (two-pass); the others are clipped by the engine.
    if cfg.optimizer.name in FUSED_BACKWARD and cfg.train.clip_grad_norm is not None:
        kw.setdefault("clip_grad_norm", cfg.train.clip_grad_norm)
    return kw


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
    """Single process; also the base of DDP and FSDP2 (they differ in wrapping and checkpoints)."""

    name = "single"
    # Whether parameters may be updated inside backward under this engine.
    supports_fused_backward = True

    def __init__(self, model: torch.nn.Module, cfg):
        self.cfg = cfg
        self.module = model  # the unwrapped model (for export and evaluation)
        self.fused = use_fused_backward(cfg, self.supports_fused_backward, self.name)
        self.model = self.wrap(model)
        self.optimizer = memopt.create_optimizer(cfg.optimizer.name, self.model.parameters(), **optimizer_kwargs(cfg))
        self.scheduler = build_scheduler(
            self.optimizer, cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio
        )
        self._clip = None if cfg.optimizer.name in FUSED_BACKWARD else cfg.train.clip_grad_norm
        # In fused mode optimizer.step() is never called (updates run inside backward), which
        # LambdaLR mistakes for a wrong call order.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")

    def wrap(self, model):
        return model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor, recompute_loss=None) -> None:
        """``recompute_loss`` re-runs the forward of this micro-batch (fused two-pass clipping)."""
        if self.fused:
            self.optimizer.fused_backward(loss, recompute_loss=recompute_loss)
        else:
            loss.backward()

    def step(self) -> None:
        if not self.fused:
            if self._clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule does not advance."""
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints: full (unsharded) model and optimizer state, written by rank 0 -----------
    def save(self, path: Path) -> None:
        if dist_rank() == 0:
            torch.save(self.module.state_dict(), path / MODEL_FILE)
            torch.save(self.optimizer.state_dict(), path / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)

    def load(self, path: Path) -> None:
        # Read every file before changing anything, so a bad file leaves the run untouched.
        model, optim, sched = (safe_torch_load(path / f) for f in (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE))
        self.module.load_state_dict(model)
        self.optimizer.load_state_dict(optim)
        self.scheduler.load_state_dict(sched)


class DDPEngine(Engine):
    name = "ddp"
    # A fused update must see the averaged gradient, which DDP only has in its bucket buffers
    # after the all-reduce (memopt.integrations.ddp has a comm-hook route, but those buffers
    # exist anyway, so it saves no memory): ordinary steps here.
    supports_fused_backward = False

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)


class FSDP2Engine(Engine):
    name = "fsdp2"

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer layer, then the root (embeddings, final norm, head).
        for layer in _transformer_layers(model):
            fully_shard(layer)
        fully_shard(model)
        # Fused backward works as is under FSDP2: the post-accumulate-grad hooks fire on the
        # sharded parameters after the reduce-scatter (memopt.sharding keeps the update exact).
        return model

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if isinstance(self.optimizer, memopt.MemoptOptimizer):
            # memopt keeps row factors for local rows only (plain tensors DCP would take for
            # replicated): save its state by parameter name at full shapes instead.
            from memopt.sharding import full_state_dict

            full = full_state_dict(self.optimizer, self.model)  # a collective: every rank calls it
            if dist_rank() == 0:
                torch.save(full, path / OPTIMIZER_FULL_FILE)
            dcp.save({"model": model_sd}, checkpoint_id=str(path / DCP_DIR))
        else:
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / DCP_DIR))
        if dist_rank() == 0:
            torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)

    def load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sched = safe_torch_load(path / SCHEDULER_FILE)
        reader = safe_dcp_reader(path / DCP_DIR)  # DCP's own reader unpickles .metadata unchecked
        if isinstance(self.optimizer, memopt.MemoptOptimizer):
            from memopt.sharding import load_full_state_dict

            full = safe_torch_load(path / OPTIMIZER_FULL_FILE)
            state = {"model": model_sd}
            _dcp_load(state, reader, path)
            set_model_state_dict(self.model, state["model"])
            load_full_state_dict(self.optimizer, full, self.model)
        else:
            state = {"model": model_sd, "optimizer": optim_sd}
            _dcp_load(state, reader, path)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(sched)


def _dcp_load(state: dict, reader, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=reader)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        raise CheckpointError(f"cannot read DCP checkpoint {path / DCP_DIR}: {type(e).__name__}: "
                              f"{first_error_line(e)}") from None


def _transformer_layers(model):
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None:
        for m in model.modules():
            if hasattr(m, "layers") and isinstance(m.layers, torch.nn.ModuleList):
                return list(m.layers)
        return []
    return list(layers)


def select_engine_kind(cfg) -> str:
    kind = cfg.engine.kind
    if kind != "auto":
        return kind
    if os.environ.get("MEMOPT_LAUNCHED_BY_DEEPSPEED") == "1":
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def build_engine(model, cfg, kind: str):
    if kind == "single":
        return Engine(model, cfg)
    if kind == "ddp":
        return DDPEngine(model, cfg)
    if kind == "fsdp2":
        return FSDP2Engine(model, cfg)
    if kind == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    raise ValueError(f"unknown engine {kind!r}")
