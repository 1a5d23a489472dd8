"""Fused backward (LOMO, AdaLomo) under ``DistributedDataParallel``.

A post-accumulate-grad hook would see the local, not yet averaged gradient, so the update runs
in a DDP *communication hook* instead: each bucket's gradients are all-reduced (averaged) and, in
the future's continuation, every parameter of the bucket is updated with its averaged gradient
while backward continues with the next buckets. Parameters are whole (replicated) under DDP, so
the optimizer needs no collectives of its own: every rank computes the same update.

Cost: DDP keeps its bucket buffers (one flat copy of all gradients) for the lifetime of the
model whatever the optimizer does, so under DDP fused backward saves the *optimizer's* reads of
``p.grad`` after backward but not gradient memory; ``fused_backward(ddp, opt, loss)`` drops the
``.grad`` references after backward so no gradient outlives its update. For the memory saving,
use FSDP2 (whose reduce-scattered shard gradients are freed by the fused update) or LOMO's
single-process mode. Global-norm clipping and fp16 loss scaling need all gradients before the
first update and are not supported in this mode (use ``loss.backward()`` + ``opt.step()``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..fused import FusedBackwardOptimizer


def register_fused_backward(ddp_model, optimizer: FusedBackwardOptimizer, process_group=None) -> None:
    """Make ``loss.backward()`` on ``ddp_model`` update every parameter inside backward."""
    if not isinstance(optimizer, FusedBackwardOptimizer):
        raise TypeError(f"fused backward needs LOMO/AdaLomo, got {type(optimizer).__name__}")
    if optimizer.clip_grad_norm is not None:
        raise NotImplementedError(
            "clip_grad_norm needs every gradient before the first update: under DDP use "
            "loss.backward() + optimizer.step() (or FSDP2's fused_backward)"
        )
    # The gradients are averaged over DDP's own group (the data-parallel one under tensor
    # parallelism), unless told otherwise.
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)

    def hook(state, bucket):
        buf = bucket.buffer()
        buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

        def update(f):
            with torch.no_grad():
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    grp = optimizer.group_of(p)
                    optimizer.update_param(p, optimizer.prepare_grad(g, grp), grp)
            return f.value()[0]

        return fut.then(update)

    ddp_model.register_comm_hook(None, hook)


def fused_backward(ddp_model, optimizer, loss: torch.Tensor) -> None:
    """``loss.backward()`` with the comm-hook updates, then drop every ``.grad`` reference."""
    loss.backward()
    for p in ddp_model.parameters():
        p.grad = None
