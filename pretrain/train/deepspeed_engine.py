"""DeepSpeed engine: ZeRO stages 0-3 with any memopt optimizer as a client optimizer.

memopt optimizers go through ``memopt.integrations.deepspeed.initialize`` (which keeps their
factored and low-rank states exact on ZeRO's flat fragments); torch's AdamW and SGD go through
``deepspeed.initialize``. The DeepSpeed JSON is built from the run config, or read from
``engine.deepspeed_config`` and checked against it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import memopt
from memopt.registry import FUSED_BACKWARD

from .engines import optimizer_kwargs, use_fused_backward
from .schedule import build_scheduler

TORCH_OPTIMIZERS = ("adamw", "sgd")
_TAG = "deepspeed"


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed JSON for this run (from the user's file when given)."""
    if cfg.engine.deepspeed_config:
        ds = json.loads(Path(cfg.engine.deepspeed_config).read_text())
        mbs = ds.get("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size)
        gas = ds.get("gradient_accumulation_steps", cfg.train.grad_accum_steps)
        if (mbs, gas) != (cfg.train.micro_batch_size, cfg.train.grad_accum_steps):
            raise ValueError(
                f"{cfg.engine.deepspeed_config}: train_micro_batch_size_per_gpu={mbs}, gradient_accumulation_steps="
                f"{gas} disagree with train.micro_batch_size={cfg.train.micro_batch_size}, "
                f"train.grad_accum_steps={cfg.train.grad_accum_steps}"
            )
        ds.setdefault("train_micro_batch_size_per_gpu", mbs)
        ds.setdefault("gradient_accumulation_steps", gas)
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    else:
        ds = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum_steps,
            "zero_optimization": {"stage": cfg.engine.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if cfg.train.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        if cfg.train.clip_grad_norm is not None and cfg.optimizer.name not in FUSED_BACKWARD:
            ds["gradient_clipping"] = cfg.train.clip_grad_norm
    ds["zero_allow_untested_optimizer"] = True
    ds.pop("optimizer", None)  # the optimizer comes from optimizer.* in the run config
    ds.pop("scheduler", None)
    return ds


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg):
        import deepspeed
        import deepspeed.ops

        if not torch.cuda.is_available():
            # On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce op on first use
            # (minutes on a fresh machine); gloo through torch.distributed is enough here.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        self.cfg = cfg
        self.module = model
        # Ordinary steps on ZeRO's partitions (exact through memopt.integrations.deepspeed); there is
        # no public per-parameter callback after ZeRO's reduce-scatter (docs/sharding.md).
        self.fused = use_fused_backward(cfg, False, self.name)
        ds_config = deepspeed_config(cfg)
        optimizer = memopt.create_optimizer(cfg.optimizer.name, model.parameters(), **optimizer_kwargs(cfg))

        def scheduler(opt):
            return build_scheduler(opt, cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio)

        if cfg.optimizer.name in TORCH_OPTIMIZERS:
            initialize = deepspeed.initialize
        else:
            from memopt.integrations.deepspeed import initialize
        self.engine, self.optimizer, _, self.scheduler = initialize(
            model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler
        )
        self.model = self.engine

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def backward(self, loss: torch.Tensor, recompute_loss=None) -> None:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed applies the update (and the schedule) at accumulation boundaries

    def step(self) -> None:
        pass

    def skip_step(self) -> None:
        self.engine.zero_grad()

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=_TAG)

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=_TAG)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{_TAG}")
