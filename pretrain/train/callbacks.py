"""Callbacks around the training loop (the OLMo-core way): everything that is not the step itself.

The trainer calls, in order, for every callback in its list:

    on_train_start(trainer)                     after the model, engine and data are ready
    pre_step(trainer)                           before each optimizer step
    post_train_batch(trainer, metrics)          right after the update; may add to ``metrics``
    log_metrics(trainer, metrics)               when ``metrics`` has anything in it
    post_step(trainer)                          after logging (checkpoints are saved here)
    on_skipped_step(trainer)                    instead of the three above for a skipped step
    on_train_end(trainer)                       after the last step (the final checkpoint)
    close(trainer)                              always, also after an error

Logging, TensorBoard, W&B (``logging.wandb``), the progress bar, validation and checkpointing
are the callbacks below; a study or a user adds theirs with ``Trainer(cfg, task, callbacks=[...])``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from pretrain.checkpoint import save_checkpoint
from pretrain.errors import UserError

from pretrain.dist import all_ranks_mean, dist_rank


class Callback:
    """Every hook is optional; the defaults do nothing."""

    def on_model_built(self, trainer, model: torch.nn.Module) -> None:
        """Before the engine wraps ``model`` (and creates the optimizer)."""

    def on_train_start(self, trainer) -> None:
        pass

    def pre_step(self, trainer) -> None:
        pass

    def post_train_batch(self, trainer, metrics: dict) -> None:
        pass

    def log_metrics(self, trainer, metrics: dict) -> None:
        pass

    def post_step(self, trainer) -> None:
        pass

    def on_skipped_step(self, trainer) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def close(self, trainer) -> None:
        pass


class MetricsFileCallback(Callback):
    """Rank 0: one JSON object per logged step in ``<output_dir>/metrics.jsonl`` (appended on
    resume, so one file holds the whole run)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None

    def on_train_start(self, trainer) -> None:
        if dist_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)

    def log_metrics(self, trainer, metrics: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(metrics) + "\n")

    def close(self, trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardCallback(Callback):
    """Rank 0: every numeric metric as a TensorBoard scalar (skipped if tensorboard is absent)."""

    def __init__(self, output_dir: str | Path):
        self.log_dir = Path(output_dir) / "tensorboard"
        self._writer = None

    def on_train_start(self, trainer) -> None:
        if dist_rank() != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_metrics(self, trainer, metrics: dict) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, metrics["step"])

    def close(self, trainer) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbCallback(Callback):
    """Rank 0: every numeric metric as a Weights & Biases scalar (``logging.wandb=true``), the run
    config as the W&B config. ``mode="offline"`` needs no network (WANDB_MODE=offline): the run
    directory is written under ``<output_dir>/wandb`` and can be uploaded later (``wandb sync``)."""

    def __init__(self, output_dir: str | Path, project: str, run_name: str | None, mode: str):
        self.output_dir = Path(output_dir)
        self.project, self.run_name, self.mode = project, run_name, mode
        self._run = None

    def on_train_start(self, trainer) -> None:
        if dist_rank() != 0:
            return
        try:
            import wandb
        except ImportError:  # checked at config load too; a config built in code may skip that
            raise UserError("logging.wandb=true needs the wandb package: pip install wandb") from None
        if self.mode == "offline":
            os.environ["WANDB_MODE"] = "offline"  # also for wandb's service process
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=self.project, name=self.run_name, mode=self.mode, dir=str(self.output_dir),
                               config=json.loads(trainer.config_json), settings=wandb.Settings(silent=True))

    def log_metrics(self, trainer, metrics: dict) -> None:
        if self._run is not None:
            scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
            self._run.log(scalars, step=metrics["step"])

    def close(self, trainer) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class ProgressBarCallback(Callback):
    """Rank 0: a tqdm bar on stderr with the last loss and lr."""

    def __init__(self):
        self._bar = None

    def on_train_start(self, trainer) -> None:
        if dist_rank() == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.state.step, desc="train",
                             file=sys.stderr, dynamic_ncols=True)

    def log_metrics(self, trainer, metrics: dict) -> None:
        if self._bar is not None and "loss" in metrics:
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics.get('lr', 0):.2e}")

    def post_step(self, trainer) -> None:
        if self._bar is not None:
            self._bar.update(1)

    on_skipped_step = post_step

    def close(self, trainer) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class EvaluatorCallback(Callback):
    """Validation loss every ``every`` steps and at the last step: the mean over ``iters``
    micro-batches per rank, always the same samples."""

    def __init__(self, every: int, iters: int):
        self.every, self.iters = every, iters

    def post_train_batch(self, trainer, metrics: dict) -> None:
        step = trainer.state.step
        if not self.every or trainer.valid_ds is None:
            return
        if step % self.every == 0 or step == trainer.cfg.train.steps:
            if "step" not in metrics:
                metrics.update(step=step, lr=trainer.step_lr, tokens=trainer.state.tokens)
            metrics["val_loss"] = self.evaluate(trainer)

    @torch.no_grad()
    def evaluate(self, trainer) -> float:
        from pretrain.data import build_loader

        model = trainer.engine.model
        model.eval()
        from pretrain.models.parallel import data_parallel_group, data_parallel_rank, data_parallel_size

        # Split over DP only: the TP ranks of one replica evaluate the same samples together.
        loader = build_loader(trainer.valid_ds, trainer.cfg.train.micro_batch_size, 0, data_parallel_rank(),
                              data_parallel_size())
        total, count = 0.0, 0
        for i, batch in enumerate(loader):
            if i >= self.iters:
                break
            loss, _ = trainer.loss_fn(model, trainer.to_device(batch))
            total += float(loss)
            count += 1
        model.train()
        value = all_ranks_mean(total / max(count, 1), data_parallel_group())
        return value if math.isfinite(value) else float("nan")


class CheckpointerCallback(Callback):
    """Atomic, verified checkpoints every ``every`` steps (0: only the final one) and at the end
    (``save_final``); keeps the last ``keep_last``."""

    def __init__(self, every: int, keep_last: int, save_final: bool):
        self.every, self.keep_last, self.save_final = every, keep_last, save_final

    def post_step(self, trainer) -> None:
        step = trainer.state.step
        if self.every and step % self.every == 0 and step < trainer.cfg.train.steps:
            self.save(trainer)

    def on_train_end(self, trainer) -> None:
        # A run resumed at its last step has nothing new to save.
        if self.save_final and trainer.state.step > trainer.start_step:
            self.save(trainer)

    def save(self, trainer) -> Path:
        return save_checkpoint(trainer.cfg.checkpoint_dir, trainer.state.step, trainer.engine,
                               trainer.checkpoint_state(), self.keep_last, config_json=trainer.config_json)


def default_callbacks(cfg) -> list[Callback]:
    """Validation, metrics file, TensorBoard, W&B and progress bar (if enabled) and checkpoints, in the
    order their hooks must run (validation adds to the metrics that are then logged; the
    checkpoint is saved after the step's metrics are written)."""
    callbacks: list[Callback] = [
        EvaluatorCallback(cfg.train.eval_every, cfg.train.eval_iters),
        MetricsFileCallback(cfg.output_dir),
        TensorBoardCallback(cfg.output_dir),
    ]
    if cfg.logging.wandb:
        callbacks.append(WandbCallback(cfg.output_dir, cfg.logging.wandb_project, cfg.logging.wandb_run_name,
                                       cfg.logging.wandb_mode))
    if cfg.train.progress_bar:
        callbacks.append(ProgressBarCallback())
    callbacks.append(CheckpointerCallback(cfg.checkpoint.every, cfg.checkpoint.keep_last, cfg.checkpoint.save_final))
    return callbacks
