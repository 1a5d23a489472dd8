"""Which per-parameter path a memopt update takes: the fused kernels of ``memopt.kernels`` or
torch ops (``resolve_fused``), and when a bound ZeRO partition may take the per-parameter path at
all (``held_whole``). ``memopt.base.resolve_foreach`` decides between that path and the
sync-free multi-tensor one; docs/foreach.md has the table."""
from __future__ import annotations

import torch

from . import kernels
from .sharding import Layout


def resolve_fused(group: dict, device: torch.device) -> bool:
    """Whether the per-parameter update of a ``group`` parameter on ``device`` runs the fused
    kernels of ``memopt.kernels`` instead of torch ops. None -> yes on CPU when the C++ kernels
    build here and ``foreach`` is None too (``foreach=False`` asks for the torch reference path;
    the kernels measured faster, docs/benchmarks/optimizers_fused.md); no on other devices."""
    fused = group.get("fused")
    if fused is None:
        return device.type == "cpu" and group.get("foreach") is None and kernels.available("cpu")
    return fused


def held_whole(layout: Layout) -> bool:
    """A flat layout that holds every element of its parameter in a process group of one (ZeRO
    with one data-parallel rank, e.g. single-GPU ZeRO-Offload): its phased step would need no
    collective and equals the local update. Its sharded state (the row window is every row, the
    moments flat vectors) has the local state's memory layout, which the fused kernels need."""
    if layout.kind != "flat" or layout.col_split or layout.start != 0 or layout.length != layout.numel:
        return False
    import torch.distributed as dist

    return layout.group is not None and dist.is_initialized() and dist.get_world_size(layout.group) == 1
