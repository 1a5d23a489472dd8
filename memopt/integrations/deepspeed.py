"""DeepSpeed engines with memopt client optimizers that stay exact under ZeRO-1/2/3.

ZeRO stages >= 1 hand the client optimizer flat 1-D fp32 partitions (one per parameter group,
or per ZeRO-3 sub-group): a factored optimizer that only sees those keeps a dense second moment
and silently computes another algorithm. ``initialize`` builds the engine with
``deepspeed.initialize`` and then *binds* each flat partition to the logical parameters it holds
pieces of (``MemoptOptimizer.bind_fragments``): per parameter, its name, its offset inside the
flat partition and a ``flat`` layout (which range of the row-major flattening of the full
parameter this rank holds, possibly starting or ending mid-row). The optimizer then reduces its
partial row/column sums over the data-parallel group and computes the single-process update.

Where the fragments come from:
* ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and stage-0 bf16 (``BF16_Optimizer``, which also
  partitions its fp32 master copy): each lp parameter's ``_hp_mapping`` gives
  ``lp_fragment_address`` (range inside the parameter) and ``hp_fragment_address`` (offset in the
  flat partition); parameters without a mapping hold nothing on this rank.
* ZeRO-3: every parameter is partitioned on its own: rank r holds elements
  [r*P, min((r+1)*P, numel)) with P = ``ds_tensor.ds_numel``; the flat fp32 sub-group buffer
  holds these P-sized slices back to back.

DeepSpeed calls the client's ``step()`` during initialization with all-zero gradients (to create
Adam-like states); ``initialize`` suspends the memopt optimizer meanwhile, so its step counters,
factors and weights are those of an untouched optimizer.

ZeRO-Offload (``zero_optimization.offload_optimizer.device`` "cpu" or "nvme"): the fp32
partitions and the optimizer step live on the host. DeepSpeed refuses a client optimizer there
unless ``zero_force_ds_cpu_optimizer`` is false, a guard against torch optimizers stepping slowly
on the CPU; ``initialize`` sets it to false (unless the config says otherwise), because memopt's
CPU step is its fused C++ kernel (``memopt.kernels``; measured against DeepSpeedCPUAdam in
docs/benchmarks/optimizers_fused.md). With one data-parallel rank every partition holds whole
parameters and each is stepped by the kernel; with several, a parameter split between ranks takes
the phased sharded step (its partial sums all-reduced), exact either way.
"""
from __future__ import annotations

import json
import os

import torch

from ..base import MemoptOptimizer
from ..registry import create_optimizer
from ..sharding import Layout, with_tensor_parallel


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, config_params=None, optimizer_params=None, **kwargs):
    """``deepspeed.initialize`` with a memopt optimizer; returns what ``deepspeed.initialize`` returns.

    ``optimizer``: a memopt optimizer instance, or a name for ``memopt.create_optimizer`` with
    ``optimizer_params`` as its hyperparameters (built over ``model_parameters`` or the model's
    trainable parameters). Every other argument goes to ``deepspeed.initialize`` unchanged;
    ``zero_allow_untested_optimizer`` is switched on in the config, and under ZeRO-Offload
    ``zero_force_ds_cpu_optimizer`` off (see the module docstring).
    """
    import deepspeed

    cfg = config if config is not None else config_params
    if isinstance(cfg, (str, os.PathLike)):
        with open(cfg) as f:
            cfg = json.load(f)
    cfg = dict(cfg or {})
    cfg.setdefault("zero_allow_untested_optimizer", True)
    if offloads_optimizer(cfg):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # memopt steps on the host with its kernels
    if isinstance(optimizer, str):
        params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
        optimizer = create_optimizer(optimizer, params, **(optimizer_params or {}))
    elif not isinstance(optimizer, MemoptOptimizer):
        raise TypeError(f"optimizer must be a memopt optimizer or its name, got {type(optimizer).__name__}")
    elif optimizer_params:
        raise ValueError("optimizer_params is only used with an optimizer name")
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage >= 1 and not optimizer.supports_sharding:
        raise NotImplementedError(
            f"{type(optimizer).__name__} does not support ZeRO partitions (memopt sharding covers "
            "Adafactor, CAME, AdaLomo, LOMO, Adapprox); use ZeRO stage 0 with it"
        )
    with optimizer.suspended():
        out = deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                   training_data=training_data, lr_scheduler=lr_scheduler, config=cfg, **kwargs)
    engine = out[0]
    bind_engine(engine, optimizer)
    return out


def offloads_optimizer(cfg: dict) -> bool:
    """True when the DeepSpeed config puts the optimizer step on the host (ZeRO-Offload)."""
    offload = (cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def bind_engine(engine, optimizer: MemoptOptimizer) -> int:
    """Bind the flat partitions of ``engine``'s ZeRO optimizer in ``optimizer``; returns how many."""
    import deepspeed.comm as ds_dist

    zopt = engine.optimizer
    names = _names(engine)
    bound = 0
    if hasattr(zopt, "fp32_partitioned_groups_flat") and hasattr(zopt, "fp16_groups"):  # ZeRO-3
        for sg, params in enumerate(zopt.fp16_groups):
            flat = zopt.fp32_partitioned_groups_flat[sg]
            pg = zopt.sub_group_process_groups[sg] if hasattr(zopt, "sub_group_process_groups") else zopt.dp_process_group
            rank = ds_dist.get_rank(group=pg)
            frags, off = [], 0
            for p in params:
                part = p.ds_tensor.ds_numel
                start = min(rank * part, p.ds_numel)
                length = max(0, min(part, p.ds_numel - start))
                layout = with_tensor_parallel(Layout.flat(p.ds_shape, start, length, pg), p)
                frags.append((names.get(id(p), f"param{id(p)}"), off, layout))
                off += part
            gid = zopt.sub_group_to_group_id[sg] if hasattr(zopt, "sub_group_to_group_id") else 0
            optimizer.bind_fragments(flat, frags, optimizer.param_groups[gid])
            bound += 1
        return bound
    if hasattr(zopt, "bit16_groups"):  # ZeRO-1/2
        lp_groups, flats = zopt.bit16_groups, zopt.single_partition_of_fp32_groups
    elif hasattr(zopt, "bf16_groups") and hasattr(zopt, "fp32_groups_flat_partition"):  # stage-0 bf16
        lp_groups, flats = zopt.bf16_groups, zopt.fp32_groups_flat_partition
    else:
        return 0  # stage 0 fp32/fp16: the client sees whole parameters
    for i, lps in enumerate(lp_groups):
        pg = zopt.real_dp_process_group[i]
        frags = []
        for lp in lps:
            name = names.get(id(lp), f"param{id(lp)}")
            hm = getattr(lp, "_hp_mapping", None)
            if hm is None:
                frags.append((name, 0, with_tensor_parallel(Layout.flat(lp.shape, 0, 0, pg), lp)))
            else:
                lpa, hpa = hm.lp_fragment_address, hm.hp_fragment_address
                layout = with_tensor_parallel(Layout.flat(lp.shape, lpa.start, lpa.numel, pg), lp)
                frags.append((name, hpa.start, layout))
        optimizer.bind_fragments(flats[i], frags, optimizer.param_groups[i])
        bound += 1
    return bound
