"""Global gradient-norm clipping under tensor parallelism (single/DDP/FSDP2 engines).

torch's ``clip_grad_norm_`` sums the squares of the gradients this rank holds (and, for FSDP2's
DTensors, over the data-parallel mesh). Under TP a rank holds a slice of each split parameter and
a full copy of each replicated one (layer norms, row-parallel biases, position embeddings), so
the norm of the logical model is: the split slices summed over the TP group, the replicated
gradients counted once. Every rank's squares are weighted by 1 / (the number of ranks holding
the same elements), then one all-reduce over the whole world (= TP x DP) gives the total.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pretrain.models.parallel import data_parallel_size, tensor_parallel_size


def clip_grad_norm_tensor_parallel(named_params, max_norm: float, split_names) -> torch.Tensor:
    """Scale every gradient so the logical model's gradient norm is at most ``max_norm``;
    ``split_names`` are the TP-split parameters. Returns the norm before clipping. Collective."""
    tp, dp = tensor_parallel_size(), data_parallel_size()
    grads, total = [], None
    for name, p in named_params:
        if p.grad is None:
            continue
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        copies = (1 if name in split_names else tp) * (1 if isinstance(g, DTensor) else dp)  # FSDP2 shards DP
        sq = local.detach().float().pow(2).sum() / copies
        total = sq if total is None else total + sq
        grads.append(local)
    if total is None:
        total = torch.zeros((), device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized():
        dist.all_reduce(total)
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))
    return norm
