"""Process-group helpers shared by data, models, training and checkpoints: rank and world
queries and small collectives that also work in a plain single process (no process group), and
``ensure_process_group`` for code (megatron's datasets and layers) that needs a group to exist.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def ensure_process_group(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialize torch.distributed if nobody has yet.

    Under a launcher (WORLD_SIZE set) this joins the launcher's world through ``env://``;
    otherwise it creates a 1-process group backed by an in-memory store (no port needed).
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dist_world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank only if ``ok`` is true on every rank (one tiny all-reduce)."""
    if dist_world() == 1:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if dist_world() == 1:
        return [obj]
    out = [None] * dist_world()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_mean(x: float, group=None) -> float:
    """The mean of a number over the ranks of ``group`` (default: all), in float64 so it does not
    depend on the reduce order. Tensor-parallel runs pass the data-parallel group: the TP ranks
    of one replica hold the same loss, and each replica counts once."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t) / world
