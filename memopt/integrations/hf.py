"""memopt optimizers inside ``transformers.Trainer``, also under DeepSpeed ZeRO and FSDP2.

Plain ``Trainer`` keeps a memopt optimizer passed as ``optimizers=(opt, None)`` only without
DeepSpeed: with ``TrainingArguments(deepspeed=...)`` it discards it (``deepspeed_init`` resets
``trainer.optimizer`` and calls ``create_optimizer()``, i.e. AdamW), and a memopt optimizer that
reaches accelerate's ``deepspeed.initialize`` is never told which logical parameters ZeRO's flat
partitions hold (it refuses to step rather than silently compute a dense update). With FSDP,
Trainer refuses ``optimizers=`` altogether.

``MemoptTrainer`` is ``Trainer`` with one more route:
* ``create_optimizer`` returns the memopt optimizer (built by name over the model's trainable
  parameters, Trainer's weight-decay groups when ``weight_decay > 0``, lr from
  ``TrainingArguments.learning_rate``; or the instance given), which Trainer hands to accelerate;
* under DeepSpeed (ZeRO 0-3, any accelerate-built engine) the optimizer is suspended while
  DeepSpeed initializes (its zero-gradient state-creating step changes nothing) and, at
  ``on_train_begin``, bound to the engine's partitions exactly as
  ``memopt.integrations.deepspeed.initialize`` does (``bind_engine``); DeepSpeed's checkpoints,
  which Trainer writes and resumes from, carry the bound per-fragment states;
* under FSDP2 (``fsdp_config={"fsdp_version": 2}``) accelerate swaps the optimizer's parameters
  for their ``Shard(0)`` DTensors, which memopt optimizers step exactly (FSDP1's flat parameters
  are refused with one line);
* ``fused_backward=True`` (LOMO, AdaLomo): each parameter is updated inside Trainer's own
  ``loss.backward()`` (post-accumulate-grad hooks; DDP's communication hook when accelerate
  wrapped the model in DDP; FSDP2 fires the hooks after its reduce-scatter) and Trainer's
  ``optimizer.step()`` then finds no gradient left. Not under DeepSpeed, whose ZeRO
  reduce-scatter offers no per-parameter callback.
* memopt's Adafactor at its defaults (relative step, no lr) gets transformers'
  ``AdafactorSchedule`` (which reports the step size) instead of an LR schedule it cannot have.
"""
from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..base import MemoptOptimizer
from ..fused import FusedBackwardOptimizer
from ..registry import FUSED_BACKWARD, create_optimizer, optimizer_hparams
from .ddp import register_fused_backward
from .deepspeed import bind_engine


class MemoptTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is a memopt optimizer, also under DeepSpeed/FSDP2.

    Args (besides Trainer's):
        memopt_optimizer: a memopt optimizer name (``memopt.create_optimizer``) or instance. A
            memopt instance passed as Trainer's ``optimizers=(opt, scheduler)`` is taken too.
        memopt_params: hyperparameters for a name (not ``lr``: that is
            ``TrainingArguments.learning_rate``, and ``weight_decay`` is Trainer's too).
        fused_backward: LOMO/AdaLomo only; update inside backward (see the module docstring).
    """

    def __init__(self, *args, memopt_optimizer: str | MemoptOptimizer | None = None,
                 memopt_params: dict | None = None, fused_backward: bool = False, **kwargs):
        optimizers = kwargs.get("optimizers", (None, None))
        if isinstance(optimizers[0], MemoptOptimizer):
            if memopt_optimizer is not None:
                raise ValueError("pass the memopt optimizer once: memopt_optimizer= or optimizers=(opt, ...)")
            memopt_optimizer = optimizers[0]
            kwargs["optimizers"] = (None, optimizers[1])  # Trainer refuses optimizers= under FSDP
        if memopt_optimizer is None:
            raise ValueError("MemoptTrainer needs memopt_optimizer= (a memopt optimizer name or instance)")
        self._check_request(memopt_optimizer, memopt_params or {}, fused_backward)
        self.memopt_optimizer = memopt_optimizer
        self.memopt_params = dict(memopt_params or {})
        self.fused_backward = fused_backward
        self._suspension = None
        self._attached_to = None  # the engine / wrapped model the optimizer was attached to
        super().__init__(*args, **kwargs)
        self._check_args()
        self.add_callback(_AttachToEngine(self))

    # -- checks at the edge ---------------------------------------------------------------
    @staticmethod
    def _check_request(opt, params: dict, fused: bool) -> None:
        if isinstance(opt, str):
            if opt.lower() in ("adamw", "sgd"):
                raise ValueError(f"memopt_optimizer={opt!r} is torch's; use transformers.Trainer for it")
            valid = optimizer_hparams(opt)  # also checks the name
            for key in ("lr", "weight_decay"):
                if key in params:
                    where = "learning_rate" if key == "lr" else "weight_decay"
                    raise ValueError(f"memopt_params: {key} comes from TrainingArguments({where}=...); remove it")
            unknown = [k for k in params if k not in valid]
            if unknown:
                raise ValueError(f"memopt_params: {unknown[0]!r} is not a hyperparameter of {opt!r}; valid: "
                                 f"{', '.join(valid)}")
            fusable = opt.lower() in FUSED_BACKWARD
        elif isinstance(opt, MemoptOptimizer):
            if params:
                raise ValueError("memopt_params is only used with an optimizer name")
            fusable = isinstance(opt, FusedBackwardOptimizer)
        else:
            raise TypeError(f"memopt_optimizer must be a memopt optimizer or its name, got {type(opt).__name__}")
        if fused and not fusable:
            raise ValueError(f"fused_backward=True needs LOMO or AdaLomo, got {opt if isinstance(opt, str) else type(opt).__name__}")
        clip = params.get("clip_grad_norm") if isinstance(opt, str) else getattr(opt, "clip_grad_norm", None)
        if fused and clip is not None:
            raise ValueError("fused_backward=True under Trainer has one backward per step, and clip_grad_norm needs a "
                             "norm-only pass first: drop clip_grad_norm (or use fused_backward=False and "
                             "TrainingArguments(max_grad_norm=...))")

    def _check_args(self) -> None:
        args = self.args
        if self.is_fsdp_enabled and int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)) != 2:
            raise ValueError("memopt under FSDP needs FSDP2's per-parameter shards: set "
                             "fsdp_config={'fsdp_version': 2} (FSDP1's flat parameters would change the algorithm)")
        if self.is_deepspeed_enabled and "optimizer" in self.accelerator.state.deepspeed_plugin.deepspeed_config:
            raise ValueError("the DeepSpeed config has an optimizer section, which Trainer would use instead of the "
                             "memopt optimizer: remove it (memopt_optimizer= chooses the optimizer)")
        if not self.fused_backward:
            return
        if self.is_deepspeed_enabled:
            raise ValueError("fused_backward=True is not available under DeepSpeed (ZeRO's reduce-scatter has no "
                             "per-parameter callback): use fused_backward=False, exact on ZeRO partitions, or FSDP2")
        if args.gradient_accumulation_steps != 1:
            raise ValueError("fused_backward=True updates inside every backward: set gradient_accumulation_steps=1 "
                             "or fused_backward=False")
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError("fused_backward=True leaves Trainer no gradients to clip: set TrainingArguments("
                             "max_grad_norm=0) (or fused_backward=False to clip)")
        if args.fp16:
            raise ValueError("fused_backward=True cannot take Trainer's fp16 loss scaling: use bf16, fp32 or "
                             "fused_backward=False")

    # -- the optimizer Trainer builds, steps and checkpoints -------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:  # deepspeed_init resets it before calling this
            opt = self.memopt_optimizer
            if isinstance(opt, str):
                opt = self._build(opt, self.model if model is None else model)
                self.memopt_optimizer = opt  # a second call (DeepSpeed re-init) keeps the same one
            if self.is_deepspeed_enabled:
                self._check_zero_stage(opt)
                # DeepSpeed steps its client once with zero gradients to create Adam-like states.
                self._suspension = opt.suspended()
                self._suspension.__enter__()
            self.optimizer = opt
        return self.optimizer

    def _build(self, name: str, model) -> MemoptOptimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hp = dict(self.memopt_params)
        if self.args.weight_decay > 0:
            decay = set(self.get_decay_parameter_names(model))
            params = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            params = [g for g in params if g["params"]]
        else:
            params = [p for _, p in named]
        if not (name.lower() == "adafactor" and hp.get("relative_step", True)):
            hp["lr"] = self.args.learning_rate
        return create_optimizer(name, params, **hp)

    def _check_zero_stage(self, opt: MemoptOptimizer) -> None:
        stage = int(self.accelerator.state.deepspeed_plugin.zero_stage or 0)
        if stage >= 1 and not opt.supports_sharding:
            raise ValueError(f"{type(opt).__name__} does not support ZeRO partitions; use ZeRO stage 0 with it")

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        groups = (self.optimizer if optimizer is None else optimizer).param_groups
        if self.lr_scheduler is None and groups and all(g.get("relative_step") for g in groups):
            from transformers.optimization import AdafactorSchedule

            # Adafactor's relative step has no lr to schedule; this reports the step it takes
            # (it asks the optimizer itself, not accelerate's wrapper, for it).
            self.lr_scheduler = AdafactorSchedule(self.memopt_optimizer)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # -- after accelerate built the engine ------------------------------------------------
    def attach_to_engine(self) -> None:
        """Bind ZeRO partitions / install the fused-backward hooks (``on_train_begin``)."""
        opt, wrapped = self.memopt_optimizer, self.model_wrapped
        if self._suspension is not None:
            self._suspension.__exit__(None, None, None)
            self._suspension = None
        if self._attached_to is wrapped:
            return  # a second train() on the same engine
        if self._attached_to is not None:
            raise RuntimeError("this memopt optimizer is attached to an earlier engine: build a new MemoptTrainer "
                               "(with a new optimizer) for another DeepSpeed/DDP set-up")
        self._attached_to = wrapped
        if self.is_deepspeed_enabled:
            bind_engine(wrapped, opt)
        if self.fused_backward:
            self._install_fused_hooks(opt)

    def _install_fused_hooks(self, opt: FusedBackwardOptimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = self.model_wrapped
        if isinstance(wrapped, DistributedDataParallel):
            register_fused_backward(wrapped, opt)  # averaged bucket gradients, then the update
            return

        def update(p):
            g, p.grad = p.grad, None
            group = opt.group_of(p)
            opt.update_param(p, opt.prepare_grad(g, group), group)

        for group in opt.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(update)


class _AttachToEngine(TrainerCallback):
    """Runs ``MemoptTrainer.attach_to_engine`` once accelerate has prepared model and optimizer;
    with fused backward, drops the gradients before Trainer's ``optimizer.step()``."""

    def __init__(self, trainer: MemoptTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.attach_to_engine()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.fused_backward:
            # DDP writes the averaged bucket gradients back into .grad after the fused updates
            # (and Trainer has just logged their norm): a step on them would update twice.
            for p in self.trainer.model.parameters():
                p.grad = None
