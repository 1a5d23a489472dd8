"""FSDP2 checkpoints under tensor parallelism: the same ``dcp/`` a TP=1 run writes.

FSDP2's own DCP state dict keys each parameter by name with its DP shards; under TP the ranks of
one TP group would then write different slices under one name. So at TP > 1 each rank takes the
state full over DP (``full_state_dict=True``), the TP slices are gathered (``tp_state``), and DCP
saves plain full tensors once (its planner drops the replicated copies). The files are those of a
TP=1 run (same names and global shapes): export reads them unchanged, a TP=1 FSDP2 run reshards
them on load, and a TP > 1 run reads full tensors and keeps its slices. Optimizer state: torch
optimizers' tensors shaped like their parameter go the same way; memopt optimizers use their
name-keyed full state (``optimizer_full.pt``, written by the engine) as at TP=1.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from pretrain.models.parallel import tensor_parallel_size
from pretrain.models.tp_state import gather_full, gather_tensor, slice_local, slice_tensor

FULL = StateDictOptions(full_state_dict=True)  # full over DP, on every rank


def _map_optimizer_tensors(optim_sd: dict, dims: dict, fn) -> dict:
    """``fn(tensor, dim)`` on every per-parameter optimizer tensor of a TP-split parameter (by name)."""
    state = {}
    for name, per_param in optim_sd["state"].items():
        dim = dims.get(name)
        state[name] = {k: fn(v, dim) if dim is not None and torch.is_tensor(v) and v.dim() > 0 else v
                       for k, v in per_param.items()}
    return dict(optim_sd, state=state)


def save_tp(model, optimizer, dims: dict, dcp_dir: Path, with_optimizer: bool) -> None:
    """Collective: every rank calls it."""
    state = {"model": gather_full(get_model_state_dict(model, options=FULL), dims)}
    if with_optimizer:
        state["optimizer"] = _map_optimizer_tensors(get_optimizer_state_dict(model, optimizer, options=FULL), dims,
                                                    gather_tensor)
    dcp.save(state, checkpoint_id=str(dcp_dir))


def _full_template(t: torch.Tensor, dim) -> torch.Tensor:
    """An empty tensor of the full (TP=1) shape of this rank's slice ``t``."""
    shape = list(t.shape)
    shape[dim] *= tensor_parallel_size()
    return torch.empty(shape, dtype=t.dtype, device=t.device)


def load_tp(model, optimizer, dims: dict, reader, with_optimizer: bool, dcp_load) -> None:
    """``dcp_load(state, reader)`` reads full tensors into ``state`` (the engine's error handling)."""
    model_sd = get_model_state_dict(model, options=FULL)
    state = {"model": {k: _full_template(v, dims[k]) if k in dims else v for k, v in model_sd.items()}}
    if with_optimizer:
        state["optimizer"] = _map_optimizer_tensors(get_optimizer_state_dict(model, optimizer, options=FULL), dims,
                                                    _full_template)
    dcp_load(state, reader)
    set_model_state_dict(model, slice_local(state["model"], dims), options=FULL)
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, _map_optimizer_tensors(state["optimizer"], dims, slice_tensor),
                                 options=FULL)
