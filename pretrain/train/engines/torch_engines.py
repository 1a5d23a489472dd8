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
from pretrain.models.parallel import data_parallel_group, data_parallel_size, tensor_parallel_size
from pretrain.models.tp_state import (gather_full, gather_optimizer_state, mark_for_optimizer, optimizer_param_names,
                                      slice_local, slice_optimizer_state, split_dims)
from pretrain.train.precision import fsdp_mixed_precision
from .base import Engine, use_fused_backward
from .fsdp2_tp import load_tp, save_tp
from .grad_norm import clip_grad_norm_tensor_parallel


class SingleEngine(Engine):
    """Single process; also the base of DDP and FSDP2."""

    name = "single"
    # Whether parameters may be updated inside backward under this engine.
    supports_fused_backward = True

    def __init__(self, model: torch.nn.Module, cfg):
        self.cfg = cfg
        self.module = model  # the unwrapped model (for export and evaluation)
        self.tp_dims = split_dims(model)  # by name, before wrapping: FSDP2 replaces the parameters
        self.fused = use_fused_backward(cfg, self.supports_fused_backward, self.name)
        self.model = self.wrap(model)
        mark_for_optimizer(list(self.module.named_parameters()), self.tp_dims)
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
            if self._clip is not None and tensor_parallel_size() > 1:
                clip_grad_norm_tensor_parallel(self.module.named_parameters(), self._clip, self.tp_dims)
            elif self._clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints: full (unsharded, TP=1) model and optimizer state, written by rank 0 -----
    # TP slices are gathered on save and cut again on load, so a checkpoint resumes at any TP
    # size and export reads it as a TP=1 one. memopt optimizers also write their name-keyed full
    # state (memopt.checkpoint), the one that resumes at another TP size; torch optimizers'
    # state_dict() is already name-order keyed and only needs its moments gathered.
    def _optimizer_names(self) -> list:
        return optimizer_param_names(self.optimizer, self.module.named_parameters())

    def save(self, path: Path) -> None:
        model = gather_full(self.module.state_dict(), self.tp_dims)  # collectives over TP
        full = optim = None
        if isinstance(self.optimizer, memopt.MemoptOptimizer):
            from memopt.checkpoint import full_state_dict

            full = full_state_dict(self.optimizer, self.module)  # a collective: every rank calls it
            if tensor_parallel_size() == 1:
                optim = self.optimizer.state_dict()
        else:
            optim = gather_optimizer_state(self.optimizer.state_dict(), self._optimizer_names(), self.tp_dims)
        if dist_rank() == 0:
            torch.save(model, path / MODEL_FILE)
            for name, state in ((OPTIMIZER_FILE, optim), (OPTIMIZER_FULL_FILE, full)):
                if state is not None:
                    torch.save(state, path / name)
            torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)

    def load(self, path: Path) -> None:
        # Read every file before changing anything, so a bad file leaves the run untouched.
        memopt_full = isinstance(self.optimizer, memopt.MemoptOptimizer) and (
            tensor_parallel_size() > 1 or not (path / OPTIMIZER_FILE).is_file())
        optim_file = OPTIMIZER_FULL_FILE if memopt_full else OPTIMIZER_FILE
        if not (path / optim_file).is_file():
            raise CheckpointError(f"{path} has no {optim_file}: written before tensor-parallel checkpoints; resume "
                                  "it with parallel.tensor_parallel_size=1")
        model, optim, sched = (safe_torch_load(path / f) for f in (MODEL_FILE, optim_file, SCHEDULER_FILE))
        self.module.load_state_dict(slice_local(model, self.tp_dims))
        if memopt_full:
            from memopt.checkpoint import load_full_state_dict

            load_full_state_dict(self.optimizer, optim, self.module)
        else:
            self.optimizer.load_state_dict(slice_optimizer_state(optim, self._optimizer_names(), self.tp_dims))
        self.scheduler.load_state_dict(sched)


class DDPEngine(SingleEngine):
    name = "ddp"
    # A fused update must see the averaged gradient, which DDP only has in its bucket buffers
    # after the all-reduce (memopt.integrations.ddp has a comm-hook route, but those buffers
    # exist anyway, so it saves no memory): ordinary steps here.
    supports_fused_backward = False

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        # Gradients are averaged over the data-parallel group only (TP ranks hold different slices).
        return DistributedDataParallel(model, process_group=data_parallel_group())


class FSDP2Engine(SingleEngine):
    name = "fsdp2"

    def optimizer_state_group(self):
        import torch.distributed as dist

        return dist.group.WORLD  # every rank holds the state of its own shards

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard

        # Shard over the data-parallel dimension of a (dp, tp) mesh whose rows are megatron's TP
        # groups (consecutive ranks); the TP slices themselves stay megatron's plain tensors.
        mesh = _dp_mesh()
        # bf16: fp32 sharded masters gathered as bf16 for compute, gradients reduced in fp32.
        precision = fsdp_mixed_precision(self.cfg.train.precision)
        # Shard each transformer layer, then the root (embeddings, final norm, head).
        for layer in _transformer_layers(model):
            fully_shard(layer, mesh=mesh, **precision)
        fully_shard(model, mesh=mesh, **precision)
        # Fused backward works as is under FSDP2: the post-accumulate-grad hooks fire on the
        # sharded parameters after the reduce-scatter (memopt.sharding keeps the update exact).
        return model

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # A forward without a backward (validation) leaves the root module unsharded: its
        # registered parameters are then full plain tensors, not the DTensors the optimizer
        # holds (memopt's names would not match, DCP would save the wrong thing).
        self.model.reshard()
        is_memopt = isinstance(self.optimizer, memopt.MemoptOptimizer)
        if is_memopt:
            # memopt keeps row factors for local rows only (plain tensors DCP would take for
            # replicated): save its state by parameter name at full shapes instead.
            from memopt.checkpoint import full_state_dict

            full = full_state_dict(self.optimizer, self.model)  # a collective: every rank calls it
            if dist_rank() == 0:
                torch.save(full, path / OPTIMIZER_FULL_FILE)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if tensor_parallel_size() > 1:  # full TP=1 tensors, as a TP=1 run writes them
            save_tp(self.model, self.optimizer, self.tp_dims, path / DCP_DIR, with_optimizer=not is_memopt)
        elif is_memopt:
            dcp.save({"model": model_sd}, checkpoint_id=str(path / DCP_DIR))
        else:
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path / DCP_DIR))
        if dist_rank() == 0:
            torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)

    def load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

        self.model.reshard()  # as in save: the optimizer's DTensors registered, not the unsharded tensors
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sched = safe_torch_load(path / SCHEDULER_FILE)
        reader = safe_dcp_reader(path / DCP_DIR)  # DCP's own reader unpickles .metadata unchecked
        is_memopt = isinstance(self.optimizer, memopt.MemoptOptimizer)
        full = safe_torch_load(path / OPTIMIZER_FULL_FILE) if is_memopt else None
        if tensor_parallel_size() > 1:
            load_tp(self.model, self.optimizer, self.tp_dims, reader, not is_memopt,
                    lambda state, reader: _dcp_load(state, reader, path))
        elif is_memopt:
            state = {"model": model_sd}
            _dcp_load(state, reader, path)
            set_model_state_dict(self.model, state["model"])
        else:
            state = {"model": model_sd, "optimizer": optim_sd}
            _dcp_load(state, reader, path)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if is_memopt:
            from memopt.checkpoint import load_full_state_dict

            load_full_state_dict(self.optimizer, full, self.model)
        self.scheduler.load_state_dict(sched)


def _dp_mesh():
    """The DP sub-mesh of a 2-D (dp, tp) DeviceMesh in megatron's rank order (None at TP=1: FSDP2's
    default mesh over all ranks)."""
    tp = tensor_parallel_size()
    if tp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (data_parallel_size(), tp), mesh_dim_names=("dp", "tp"))["dp"]


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
