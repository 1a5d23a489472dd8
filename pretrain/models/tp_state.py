"""Tensor-parallel parameters by name: which are split and along which dim, declaring them to
memopt, and turning this rank's slices into full (TP=1) tensors and back.

megatron-core marks every split parameter with ``tensor_model_parallel=True`` and
``partition_dim`` (column-parallel weights and their biases along 0, row-parallel weights along
1, the vocab-parallel embedding along 0); the full tensor is the concatenation of the TP ranks'
slices in TP-rank order (``use_cpu_initialization`` builds it that way, so weights at any TP size
start identical). Wrappers replace parameters (FSDP2's ``fully_shard``) and drop those
attributes, so the split is read by name before wrapping (``split_dims``) and applied by name
after it (``mark_for_optimizer``).

Checkpoints hold full tensors by name: ``gather_full`` before saving, ``slice_local`` after
loading, so a checkpoint written at TP=2 is the one a TP=1 run writes, and resumes at any TP size.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.distributed as dist

from pretrain.models.parallel import (tensor_and_data_parallel_group, tensor_parallel_group, tensor_parallel_rank,
                                      tensor_parallel_size)


def split_dims(model: torch.nn.Module) -> Dict[str, int]:
    """``{parameter name: split dim}`` for the tensor-parallel parameters of an unwrapped model."""
    dims = {}
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            if getattr(p, "partition_stride", 1) != 1:
                raise ValueError(f"{name}: strided tensor-parallel splits (stride {p.partition_stride}) are not supported")
            dims[name] = int(p.partition_dim)
    return dims


def mark_for_optimizer(named_params, dims: Mapping[str, int]) -> int:
    """Declare every TP-split parameter (``named_params``: the parameters the optimizer will see,
    after the engine wrapped the model) to memopt; returns how many were marked (0 at TP=1)."""
    import memopt

    world = tensor_parallel_size()
    if world == 1:
        return 0
    named_params = list(named_params)
    rank, group, tp_dp = tensor_parallel_rank(), tensor_parallel_group(), tensor_and_data_parallel_group()
    marked = 0
    for name, p in named_params:
        if name in dims:
            memopt.mark_tensor_parallel(p, dims[name], rank, world, group, tp_dp_group=tp_dp)
            marked += 1
    missing = set(dims) - {n for n, _ in named_params}
    if missing:  # a wrapper renamed parameters: the optimizer would treat slices as whole tensors
        raise RuntimeError(f"tensor-parallel parameters not found after wrapping: {sorted(missing)[:3]}")
    return marked


def gather_tensor(local: torch.Tensor, dim: int) -> torch.Tensor:
    """The full tensor from this rank's slice along ``dim`` (a collective over the TP group)."""
    world = tensor_parallel_size()
    if world == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=tensor_parallel_group())
    return torch.cat(parts, dim=dim)


def slice_tensor(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor along ``dim``."""
    world = tensor_parallel_size()
    if world == 1:
        return full
    if full.shape[dim] % world:
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be split {world} ways along dim {dim}")
    return full.chunk(world, dim=dim)[tensor_parallel_rank()].clone()


def gather_full(state: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """A model state dict with every TP-split entry gathered to its full shape. Collective: every
    rank calls it with the same keys (in the same order)."""
    return {k: gather_tensor(v, dims[k]) if k in dims else v for k, v in state.items()}


def slice_local(state: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """A full (TP=1) model state dict cut to this rank's slices."""
    return {k: slice_tensor(v, dims[k]) if k in dims and torch.is_tensor(v) else v for k, v in state.items()}


def gather_optimizer_state(state: Mapping, names: list, dims: Mapping[str, int]) -> dict:
    """A torch optimizer's ``state_dict()`` with the per-parameter tensors of TP-split parameters
    (those shaped like the parameter: AdamW's moments, SGD's momentum) gathered to full shape.
    ``names[i]`` is the parameter of index ``i`` in the state dict. Collective over TP."""
    out = dict(state, state={})
    for index, per_param in sorted(state["state"].items()):
        dim = dims.get(names[index])
        out["state"][index] = {
            k: gather_tensor(v, dim) if dim is not None and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in per_param.items()
        }
    return out


def slice_optimizer_state(state: Mapping, names: list, dims: Mapping[str, int]) -> dict:
    """``gather_optimizer_state`` undone: a full optimizer state cut to this TP rank's slices."""
    out = dict(state, state={})
    for index, per_param in state["state"].items():
        dim = dims.get(names[int(index)])
        out["state"][index] = {
            k: slice_tensor(v, dim) if dim is not None and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in per_param.items()
        }
    return out


def optimizer_param_names(optimizer: torch.optim.Optimizer, named_params) -> list:
    """The parameter name of each index of ``optimizer.state_dict()`` (indices run over the param
    groups' parameters in order)."""
    name_of = {id(p): n for n, p in named_params}
    try:
        return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise RuntimeError("the optimizer holds a parameter that is not the model's") from None
