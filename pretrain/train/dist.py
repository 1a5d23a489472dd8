"""Rank and world helpers that also work in a plain single process (no process group)."""
from __future__ import annotations

import torch
import torch.distributed as dist


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


def all_ranks_mean(x: float) -> float:
    """The mean of a number over the ranks (float64, so it does not depend on the reduce order)."""
    if dist_world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist_world()
