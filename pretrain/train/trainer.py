"""The training loop: data -> engine.train_step -> callbacks.

Lean on purpose: parallelism, gradient accumulation and loss scaling live in the engine
(``engines/``); logging, validation, the progress bar and checkpoints are callbacks
(``callbacks.py``); the checkpoint format is ``pretrain.checkpoint``. This file builds the
pieces in order, resumes, and runs the steps.

    summary = Trainer(cfg, GPT, callbacks=[MyCallback()]).fit()
    summary = train(cfg, GPT)                       # the same, with the default callbacks only
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pretrain.checkpoint import load_checkpoint, model_config, resolve_resume
from pretrain.config import RunConfig, dump_config
from pretrain.errors import UserError

from .callbacks import Callback, default_callbacks
from pretrain.dist import all_ranks_mean, dist_rank, dist_world
from pretrain.models.parallel import data_parallel_group, data_parallel_size
from .engines import build_engine, select_engine_kind
from .metrics import peak_memory_bytes
from .precision import autocast_loss_fn, check_precision, prepare_model, uses_autocast
from .resume import check_resumable, schedule_changes
from .schedule import reapply_schedule
from .step_norms import step_scalars


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclass
class TaskSpec:
    """What differs between GPT and BERT pretraining."""

    kind: str  # "gpt" or "bert"
    build_datasets: Callable  # (cfg, tokenizer, seq_length, num_samples) -> (train, valid, test)
    loss_fn: Callable  # (model, batch) -> (loss, extra)
    tokens_key: str  # the batch entry holding token ids (for token counts)


@dataclass
class TrainState:
    """What ``trainer.json`` holds: where the run stands."""

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    nonfinite_skipped_steps: int = 0


class Trainer:
    def __init__(self, cfg: RunConfig, task: TaskSpec, loss_fn: Callable | None = None,
                 callbacks: Sequence[Callback] = ()):
        self.cfg, self.task = cfg, task
        self.loss_fn = loss_fn or task.loss_fn
        # The caller's callbacks first: they see each update before validation and logging.
        self.callbacks = [*callbacks, *default_callbacks(cfg)]
        self.state = TrainState()
        self.start_step = 0
        self.engine = None
        self.valid_ds = None
        self.step_lr = None  # the lr of the step being run
        self.config_json = dump_config(cfg)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))

    # -- helpers used by callbacks -----------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def warn(self, message: str) -> None:
        if dist_rank() == 0:
            from tqdm import tqdm

            tqdm.write(f"warning: {message}", file=sys.stdout)  # above the progress bar, if any

    def checkpoint_state(self) -> dict:
        return dict(asdict(self.state), world_size=dist_world(), engine=self.engine.name,
                    tensor_parallel_size=self.cfg.parallel.tensor_parallel_size)

    def _logs(self, step: int) -> bool:
        """Whether ``step`` (1-based) writes metrics."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or step == 1

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self) -> None:
        from pretrain.data import build_loader, load_tokenizer
        from pretrain.models import build_model
        from pretrain.models.parallel import data_parallel_rank

        cfg = self.cfg
        _init_parallel(cfg)  # also the process group
        # TP ranks of one replica see the same batches: data is split over DP only.
        world = data_parallel_size()
        kind = select_engine_kind(cfg)
        check_precision(cfg, kind)  # engine.kind=auto is resolved only now
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        model_cfg = model_config(cfg, tokenizer.vocab_size, kind=self.task.kind)
        _check_tensor_parallel(model_cfg, cfg.parallel.tensor_parallel_size)

        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
        n_evals = cfg.train.steps // cfg.train.eval_every + 1 if cfg.train.eval_every else 0
        num_samples = (cfg.train.steps * self.global_batch,
                       max(1, n_evals) * cfg.train.eval_iters * cfg.train.micro_batch_size * world, 0)
        train_ds, self.valid_ds, _ = self.task.build_datasets(cfg, tokenizer, model_cfg.seq_length, num_samples)

        model = build_model(model_cfg, seed=cfg.train.seed).to(self.device)
        notes: list[str] = []  # said once the run has started
        resume_from = resolve_resume(cfg.checkpoint_dir, cfg.checkpoint.resume, warn=notes.append)
        saved_cfg = check_resumable(resume_from, cfg, kind) if resume_from is not None else None
        if cfg.model.init_from and resume_from is None:
            _init_weights(model, cfg.model.init_from, model_cfg)  # before the engine shards parameters
        # bf16 weights only for bf16_pure; bf16 keeps fp32 masters (pretrain/train/precision.py).
        model = prepare_model(model, cfg.train.precision)
        self._each("on_model_built", model)
        self.engine = build_engine(model, cfg, kind)
        if uses_autocast(cfg.train.precision, kind):  # bf16 compute over fp32 weights, validation too
            self.loss_fn = autocast_loss_fn(self.loss_fn, self.device.type)

        if resume_from is not None:
            saved = load_checkpoint(resume_from, self.engine)
            self.state = TrainState(**{k: saved[k] for k in asdict(TrainState())})
            changes = schedule_changes(saved_cfg, cfg)
            if changes:
                notes.append("applied on resume: " + ", ".join(changes) + "; the schedule is recomputed for "
                             f"this run from step {self.state.step}")
            if self.engine.lr is not None:
                reapply_schedule(self.engine.scheduler, cfg.optimizer.lr)
            notes.append(f"resumed from {resume_from} at step {self.state.step}")
        self.start_step = self.state.step
        self.loader = build_loader(train_ds, cfg.train.micro_batch_size, self.state.consumed_samples,
                                   data_parallel_rank(), world, cfg.data.num_workers)
        if dist_rank() == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / "config.json").write_text(self.config_json)
        self._each("on_train_start")
        for note in notes:
            self.warn(note)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Run (or resume) training as configured; returns a summary dict (rank 0's view)."""
        cfg = self.cfg
        try:
            self._setup()
            batches = iter(self.loader)
            nonfinite_in_a_row = 0
            first_loss = last_loss = None
            t_start, tokens_at_start = time.perf_counter(), self.state.tokens
            while self.state.step < cfg.train.steps:
                self._each("pre_step")
                t0 = time.perf_counter()
                self.step_lr = self.engine.lr  # DeepSpeed steps its schedule inside the step
                micro = [self.to_device(next(batches)) for _ in range(cfg.train.grad_accum_steps)]
                step_tokens = sum(int(b[self.task.tokens_key].numel()) for b in micro) * data_parallel_size()
                logs = self._logs(self.state.step + 1)
                losses = self.engine.train_step(micro, self.loss_fn, measure=logs and cfg.logging.norms)
                self.state.consumed_samples += self.global_batch
                self.state.tokens += step_tokens
                self.state.step += 1
                if losses is None:
                    self.state.nonfinite_skipped_steps += 1
                    nonfinite_in_a_row += 1
                    self.warn(f"step {self.state.step}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                        raise TrainingError(
                            f"stopping: {nonfinite_in_a_row} non-finite losses in a row at step {self.state.step}; "
                            "lower optimizer.lr, enable train.clip_grad_norm, or resume from the last checkpoint "
                            "with different settings"
                        )
                    self._each("on_skipped_step")
                    continue
                nonfinite_in_a_row = 0
                last_loss = all_ranks_mean(sum(losses) / len(losses), data_parallel_group())
                first_loss = last_loss if first_loss is None else first_loss
                metrics = {}
                step = self.state.step
                if logs:
                    metrics = dict(step=step, loss=last_loss, lr=self.step_lr, tokens=self.state.tokens,
                                   tokens_per_s=step_tokens / (time.perf_counter() - t0),
                                   peak_memory_bytes=peak_memory_bytes(),
                                   nonfinite_skipped_steps=self.state.nonfinite_skipped_steps,
                                   **step_scalars(self.engine))
                self._each("post_train_batch", metrics)
                if metrics:
                    self._each("log_metrics", metrics)
                self._each("post_step")
            self._each("on_train_end")
        finally:
            self._each("close")
        elapsed = time.perf_counter() - t_start
        return dict(
            steps=self.state.step, first_loss=first_loss, last_loss=last_loss,
            tokens_per_s=(self.state.tokens - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
            peak_memory_bytes=peak_memory_bytes(), nonfinite_skipped_steps=self.state.nonfinite_skipped_steps,
            engine=self.engine.name, world_size=dist_world(), output_dir=str(cfg.output_dir),
            tensor_parallel_size=cfg.parallel.tensor_parallel_size,
        )


def train(cfg: RunConfig, task: TaskSpec, loss_fn: Callable | None = None,
          callbacks: Sequence[Callback] = ()) -> dict:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view)."""
    return Trainer(cfg, task, loss_fn=loss_fn, callbacks=callbacks).fit()


def _init_parallel(cfg: RunConfig) -> None:
    """megatron's parallel state at the run's TP size (a one-line error if it does not divide the world)."""
    from pretrain.config import ConfigError
    from pretrain.dist import ensure_process_group
    from pretrain.models import init_model_parallel

    ensure_process_group()
    tp = cfg.parallel.tensor_parallel_size
    if dist_world() % tp:
        raise ConfigError(f"config key 'parallel.tensor_parallel_size': {tp} does not divide the {dist_world()} "
                          "processes (data-parallel size = processes / tensor_parallel_size)")
    init_model_parallel(tensor_parallel_size=tp, seed=cfg.train.seed)


def _check_tensor_parallel(model_cfg, tp: int) -> None:
    from pretrain.config import ConfigError
    from pretrain.models.config import check_tensor_parallel

    try:
        check_tensor_parallel(model_cfg, tp)
    except ValueError as e:
        raise ConfigError(f"config key 'parallel.tensor_parallel_size': {e}") from None


def _init_weights(model, source: str, model_cfg) -> None:
    from pretrain.checkpoint import initial_weights
    from pretrain.models.tp_state import slice_local, split_dims

    # Checkpoints hold full (TP=1) tensors: this rank takes its slices.
    weights = slice_local(initial_weights(source, model_cfg), split_dims(model))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"model.init_from={source}: missing {missing[:5]}, unexpected {unexpected[:5]}")
