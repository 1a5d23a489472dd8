"""megatron's parallel groups under the names DeepSpeed asks its ``mpu`` argument for.

``deepspeed.initialize(mpu=...)`` takes its data-parallel group (gradient reduction, ZeRO
partitions, the batch-size arithmetic) and its model-parallel group (checkpoint file names
``mp_rank_XX``, gradient-norm clipping that counts TP-replicated parameters once) from that
object. megatron-core's ``parallel_state`` has the tensor/data-parallel getters but not the older
``get_model_parallel_rank`` / ``_world_size`` nor ``get_data_parallel_group_ranks``; with no
pipeline parallelism here, model parallel = tensor parallel.
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    # tensor (= model: no pipeline stages here) parallel
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_model_parallel_rank = get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_slice_parallel_group = get_tensor_model_parallel_group
    # data parallel
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    # pipeline parallel: one stage
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    @staticmethod
    def get_pipeline_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_pipeline_model_parallel_rank() -> int:
        return 0
