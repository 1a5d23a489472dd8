"""The torch engines: single process, DDP and FSDP2 (they differ in wrapping and checkpoints)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

import memopt
from memopt.registry import FUSED_BACKWARD
from pretrain.checkpoint.layout import DCP_DIR, MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_FULL_FILE, SCHEDULER_FILE
from pretrain.checkpoint.safe_load import first_error_line, safe_dcp_reader, safe_torch_load
from pretrain.errors import CheckpointError
from pretrain.optim import build_scheduler, optimizer_kwargs

from pretrain.dist import dist_rank
from .base import Engine, use_fused_backward


class SingleEngine(Engine):
    """Single process; also the base of DDP and FSDP2."""

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

    def backward(self, loss, recompute_loss, accum: int) -> None:
        if self.fused:
            self.optimizer.fused_backward(loss / accum, recompute_loss=lambda: recompute_loss() / accum)
        else:
            (loss / accum).backward()

    def apply_update(self) -> None:
        if not self.fused:
            if self._clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
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


class DDPEngine(SingleEngine):
    name = "ddp"
    # A fused update must see the averaged gradient, which DDP only has in its bucket buffers
    # after the all-reduce (memopt.integrations.ddp has a comm-hook route, but those buffers
    # exist anyway, so it saves no memory): ordinary steps here.
    supports_fused_backward = False

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)


class FSDP2Engine(SingleEngine):
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
            from memopt.checkpoint import full_state_dict

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
            from memopt.checkpoint import load_full_state_dict

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
