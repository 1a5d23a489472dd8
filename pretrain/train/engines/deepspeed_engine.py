"""DeepSpeed engine: ZeRO stages 0-3 with any memopt optimizer as a client optimizer.

memopt optimizers go through ``memopt.integrations.deepspeed.initialize`` (which keeps their
factored and low-rank states exact on ZeRO's flat fragments); torch's AdamW and SGD go through
``deepspeed.initialize``. The DeepSpeed JSON is built from the run config, or read from
``engine.deepspeed_config`` and checked against it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import memopt
from memopt.registry import FUSED_BACKWARD

from pretrain.checkpoint.layout import DEEPSPEED_FULL_FILE, DEEPSPEED_MODEL_FULL_FILE, DEEPSPEED_TAG, DEEPSPEED_WORLD_FILE
from pretrain.checkpoint.safe_load import safe_torch_load, weights_only_torch_load
from pretrain.checkpoint.store import read_json
from pretrain.errors import CheckpointError
from pretrain.optim import build_scheduler, optimizer_kwargs

from pretrain.dist import dist_rank, dist_world
from pretrain.models.parallel import tensor_parallel_size
from pretrain.models.tp_state import gather_full, mark_for_optimizer, slice_tensor, split_dims
from .base import Engine, use_fused_backward

TORCH_OPTIMIZERS = ("adamw", "sgd")


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
    # The optimizer is built from optimizer.*, which load_run_config filled from this section
    # (pretrain.deepspeed_json); a config built another way must not disagree with the file.
    section = ds.pop("optimizer", None)
    if section is not None:
        from pretrain.deepspeed_json import optimizer_from_json

        chosen = optimizer_from_json(section, cfg.engine.deepspeed_config)
        if chosen["name"] != cfg.optimizer.name or chosen.get("lr", cfg.optimizer.lr) != cfg.optimizer.lr:
            raise ValueError(f"{cfg.engine.deepspeed_config}: its optimizer section ({chosen['name']}) disagrees with "
                             f"optimizer.name={cfg.optimizer.name}, optimizer.lr={cfg.optimizer.lr}")
    if "scheduler" in ds:
        raise ValueError(f"{cfg.engine.deepspeed_config}: a scheduler section is not used here; set schedule.* instead")
    return ds


class DeepSpeedEngine(Engine):
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
        self.tp_dims = split_dims(model)
        mark_for_optimizer(list(model.named_parameters()), self.tp_dims)  # DeepSpeed keeps these parameters
        # megatron's groups for DeepSpeed: DP for gradients and ZeRO partitions, TP for clipping
        # and its per-TP-rank checkpoint files.
        extra = {}
        if tensor_parallel_size() > 1:
            from .megatron_mpu import MegatronMPU

            extra["mpu"] = MegatronMPU()
        optimizer = memopt.create_optimizer(cfg.optimizer.name, model.parameters(), **optimizer_kwargs(cfg))

        def scheduler(opt):
            return build_scheduler(opt, cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.schedule.min_lr_ratio)

        if cfg.optimizer.name in TORCH_OPTIMIZERS:
            initialize = deepspeed.initialize
        else:
            from memopt.integrations.deepspeed import initialize
        self.engine, self.optimizer, _, self.scheduler = initialize(
            model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler, **extra
        )
        self.model = self.engine

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def backward(self, loss: torch.Tensor, recompute_loss, accum: int) -> None:
        # DeepSpeed divides by the accumulation steps and applies its loss scale itself, and
        # applies the update (and the schedule) at accumulation boundaries.
        self.engine.backward(loss)
        self.engine.step()

    def apply_update(self) -> None:
        pass  # done by the last micro-batch's engine.step()

    def skip_step(self) -> None:
        self.engine.zero_grad()

    # -- logged norms (pretrain/train/step_norms.py) --------------------------------------------
    # engine.step() runs inside backward() and clears the gradients: ZeRO's own norm is read.
    grads_in_dot_grad = False

    def step_grad_norm(self):
        """The global gradient norm before clipping, as DeepSpeed computed it for the step just
        taken (None where it computes none: ZeRO stage 0 without gradient_clipping)."""
        return self.engine.get_global_grad_norm()

    def norm_tensors(self):
        if self.engine.zero_optimization_stage() == 3:  # each rank holds one partition of each
            return [(p, p.ds_tensor, 1) for p in self.engine.module.parameters() if p.requires_grad]
        return super().norm_tensors()

    def optimizer_state_bytes(self) -> int:
        import torch.distributed as dist

        from pretrain.train.step_norms import optimizer_state_total

        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the client inside ZeRO's wrapper
        return optimizer_state_total(inner, dist.group.WORLD if self.engine.zero_optimization_stage() >= 1 else None)

    @property
    def _memopt_client(self):
        """The memopt optimizer on ZeRO partitions (None for torch optimizers or ZeRO stage 0)."""
        opt = self.optimizer if isinstance(self.optimizer, memopt.MemoptOptimizer) else getattr(self.optimizer, "optimizer", None)
        if isinstance(opt, memopt.MemoptOptimizer) and opt.fragments:
            return opt
        return None

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if dist_rank() == 0:
            (path / DEEPSPEED_WORLD_FILE).write_text(json.dumps({"world_size": dist_world(),
                                                                 "tensor_parallel_size": tensor_parallel_size()}))
        client = self._memopt_client
        params = self._full_params() if client is not None or tensor_parallel_size() > 1 else None
        if tensor_parallel_size() > 1 and dist_rank() == 0:
            # DeepSpeed writes one model file per TP rank (mp_rank_XX) that its zero_to_fp32 does
            # not merge: export and evaluation read these full (TP=1) weights instead.
            torch.save(params, path / DEEPSPEED_MODEL_FULL_FILE)
        if client is not None:
            # DeepSpeed saves the client's state per rank (world-size dependent). This copy, by
            # parameter name at full shapes, is what resumes at another world size.
            from memopt.checkpoint import full_state_dict

            full = full_state_dict(client, self.engine.module)  # collectives: every rank calls them
            if dist_rank() == 0:
                torch.save({"params": params, "optimizer": full, "scheduler": self.scheduler.state_dict(),
                            "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples},
                           path / DEEPSPEED_FULL_FILE)

    def _full_params(self) -> dict:
        """Every parameter by name at its full (TP=1) shape, fp32 masters where ZeRO keeps them.
        Collective (over DP for ZeRO's partitions, over TP for the slices)."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = {}
        for name, p in self.engine.module.named_parameters():
            master = safe_get_full_fp32_param(p) if self.engine.zero_optimization_stage() >= 1 else None
            params[name] = (master if master is not None else p).detach().float().cpu()
        return gather_full(params, self.tp_dims)

    def load(self, path: Path) -> None:
        world_file = path / DEEPSPEED_WORLD_FILE
        layout = read_json(world_file) if world_file.is_file() else {}
        saved, saved_tp = layout.get("world_size"), layout.get("tensor_parallel_size", 1)
        if saved is not None and (saved, saved_tp) != (dist_world(), tensor_parallel_size()):
            return self._load_resharded(path, saved, saved_tp)
        # DeepSpeed loads its files with weights_only=False: forced to weights_only here.
        with weights_only_torch_load():
            load_path, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise CheckpointError(f"no DeepSpeed checkpoint under {path}/{DEEPSPEED_TAG}")

    def _load_resharded(self, path: Path, saved_world: int, saved_tp: int) -> None:
        """Resume a checkpoint written by ``saved_world`` ranks at TP ``saved_tp`` on this run's layout."""
        full_file = path / DEEPSPEED_FULL_FILE
        if self._memopt_client is None or not full_file.is_file():
            raise CheckpointError(
                f"{path} was written by {saved_world} DeepSpeed ranks at tensor_parallel_size={saved_tp} and this "
                f"run has {dist_world()} at {tensor_parallel_size()}: DeepSpeed checkpoints resume on the same layout only (memopt optimizers under ZeRO >= 1 also write "
                f"{DEEPSPEED_FULL_FILE}, which resumes anywhere; for torch optimizers convert with DeepSpeed's "
                "ds_to_universal.py); restart with the original number of ranks"
            )
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from memopt.checkpoint import load_full_state_dict

        full = safe_torch_load(full_file)
        try:
            missing = [n for n, _ in self.engine.module.named_parameters() if n not in full["params"]]
        except (KeyError, TypeError) as e:  # a foreign file: say which, before anything is changed
            raise CheckpointError(f"{full_file}: not a {DEEPSPEED_FULL_FILE} file ({type(e).__name__}: {e})") from None
        if missing:
            raise CheckpointError(f"{full_file} has no weights for {len(missing)} parameters of this model "
                               f"(e.g. {missing[0]!r}): it was written for another model")
        stage3 = self.engine.zero_optimization_stage() == 3
        for name, p in self.engine.module.named_parameters():
            value = slice_tensor(full["params"][name], self.tp_dims[name]) if name in self.tp_dims else full["params"][name]
            safe_set_full_fp32_param(p, value)  # the fp32 master fragment this rank holds
            # ... and the (bf16 or fp32) weight the forward uses, which DeepSpeed refreshes only at a step.
            if stage3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    with torch.no_grad():
                        p.copy_(value.to(p.dtype))
            else:
                with torch.no_grad():
                    p.copy_(value.to(device=p.device, dtype=p.dtype))
        load_full_state_dict(self._memopt_client, full["optimizer"], self.engine.module)
        self.scheduler.load_state_dict(full["scheduler"])
        self.engine.global_steps = full["global_steps"]
        self.engine.global_samples = full["global_samples"]
        if dist_rank() == 0:
            print(f"{path}: written by {saved_world} DeepSpeed ranks, resumed on {dist_world()} from {DEEPSPEED_FULL_FILE}",
                  file=sys.stderr, flush=True)
