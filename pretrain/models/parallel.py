"""Set up (and tear down) torch.distributed and megatron's model-parallel state.

megatron-core layers look up their tensor-parallel group in ``megatron.core.parallel_state``, so
that state must exist before a model is built, even in a single process. Launchers (deepspeed,
torchrun) set RANK / WORLD_SIZE / MASTER_ADDR; a plain ``python`` process gets a private 1-rank
gloo group that needs no port.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.dist import ensure_process_group
from pretrain.models import megatron_compat


def init_model_parallel(
    tensor_parallel_size: int = 1,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """Make megatron's parallel state ready for building models with the given TP size.

    Idempotent for the same TP size; re-initializes when a different size is asked for.
    ``seed`` (same on every rank) seeds python/numpy/torch, and the CUDA RNG tracker on GPU.
    """
    ensure_process_group(backend)
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} must divide the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size:
            if seed is not None:
                megatron_compat.seed_all(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    if seed is not None:
        megatron_compat.seed_all(seed)


def destroy_model_parallel(destroy_process_group: bool = False) -> None:
    """Undo ``init_model_parallel`` (and optionally the process group itself)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


def tensor_parallel_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


# -- the data-parallel dimension under TP -----------------------------------------------------
# megatron orders ranks TP-first: the TP groups are consecutive ranks ({0, 1}, {2, 3} at TP=2 on
# 4 ranks) and a DP group takes one rank of each ({0, 2}, {1, 3}). Everything that splits data
# (the loader, token counts, logged means, gradient averaging) uses the DP dimension only: the
# TP ranks of one replica see the same batches. Before megatron is set up (a bare process, a
# tool), DP is the whole world.

def data_parallel_rank() -> int:
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank()
    return dist.get_rank() if dist.is_initialized() else 0


def data_parallel_size() -> int:
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_world_size()
    return dist.get_world_size() if dist.is_initialized() else 1


def data_parallel_group():
    """megatron's DP group (None, i.e. the default group, before megatron is set up)."""
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group()
    return None


def tensor_parallel_group():
    return parallel_state.get_tensor_model_parallel_group()


def tensor_and_data_parallel_group():
    """All ranks that hold a piece of one logical parameter: TP x DP (the whole world here)."""
    return parallel_state.get_tensor_and_data_parallel_group()
