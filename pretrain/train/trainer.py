"""The training loop: data -> model -> loss -> engine, with validation, logging and checkpoints.

Lean on purpose: parallelism lives in the engine, logging in MetricsLogger, persistence in
checkpoint.py; this file is the order in which they are called.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from pretrain.config import RunConfig, dump_config
from pretrain.errors import UserError

from pretrain.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, step_of

from .dist import dist_rank, dist_world
from .engines import build_engine, select_engine_kind
from .metrics import MetricsLogger, peak_memory_bytes
from .resume import check_resumable, schedule_changes
from .schedule import reapply_schedule


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclass
class TaskSpec:
    """What differs between GPT and BERT pretraining."""

    kind: str  # "gpt" or "bert"
    build_datasets: Callable  # (cfg, tokenizer, seq_length, num_samples) -> (train, valid, test)
    loss_fn: Callable  # (model, batch) -> (loss, extra)
    tokens_key: str  # the batch entry holding token ids (for token counts)


def _mean_over_ranks(x: float) -> float:
    if dist_world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist_world()


def _all_finite(loss: torch.Tensor) -> bool:
    """Agree across ranks: a step is skipped everywhere if any rank's loss is not finite."""
    ok = torch.tensor([1.0 if bool(torch.isfinite(loss.detach())) else 0.0])
    if dist_world() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() == 1.0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: RunConfig, task: TaskSpec, loss_fn: Callable | None = None) -> dict:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view)."""
    from pretrain.data import build_loader, load_tokenizer
    from pretrain.models import build_model, get_preset, init_model_parallel

    loss_fn = loss_fn or task.loss_fn
    init_model_parallel(tensor_parallel_size=1, seed=cfg.train.seed)
    rank, world = dist_rank(), dist_world()
    kind = select_engine_kind(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    if cfg.train.seq_length:
        overrides["seq_length"] = cfg.train.seq_length
    model_cfg = get_preset(cfg.model.preset, task.kind, **overrides)
    seq_length = model_cfg.seq_length

    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    n_evals = cfg.train.steps // cfg.train.eval_every + 1 if cfg.train.eval_every else 0
    num_samples = (cfg.train.steps * global_batch, max(1, n_evals) * cfg.train.eval_iters * cfg.train.micro_batch_size * world, 0)
    train_ds, valid_ds, _ = task.build_datasets(cfg, tokenizer, seq_length, num_samples)

    model = build_model(model_cfg, seed=cfg.train.seed).to(device)
    notes: list[str] = []  # said once the logger exists
    resume_from = resolve_resume(cfg.checkpoint_dir, cfg.checkpoint.resume, warn=notes.append)
    saved_cfg = check_resumable(resume_from, cfg, kind) if resume_from is not None else None
    if cfg.model.init_from and resume_from is None:
        _init_weights(model, cfg.model.init_from, model_cfg)  # before the engine shards parameters
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    engine = build_engine(model, cfg, kind)

    step, consumed, tokens_seen, nonfinite_total = 0, 0, 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, engine)
        step, consumed = state["step"], state["consumed_samples"]
        tokens_seen, nonfinite_total = state["tokens"], state["nonfinite_skipped_steps"]
        changes = schedule_changes(saved_cfg, cfg)
        if changes:
            notes.append("applied on resume: " + ", ".join(changes) + f"; the schedule is recomputed for this run "
                         f"from step {step}")
        if engine.lr is not None:
            reapply_schedule(engine.scheduler, cfg.optimizer.lr)

    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(dump_config(cfg))
    logger = MetricsLogger(out, rank == 0, cfg.train.steps, step, cfg.train.progress_bar and rank == 0)
    for note in notes:
        logger.warn(note)
    if rank == 0 and resume_from is not None:
        logger.warn(f"resumed from {resume_from} at step {step}")

    loader = build_loader(train_ds, cfg.train.micro_batch_size, consumed, rank, world, cfg.data.num_workers)
    batches = iter(loader)
    nonfinite_in_a_row = 0
    first_loss = last_loss = None
    t_start, tokens_at_start = time.perf_counter(), tokens_seen
    accum = cfg.train.grad_accum_steps

    def save(at_step: int) -> None:
        save_checkpoint(
            cfg.checkpoint_dir, at_step, engine,
            dict(step=at_step, consumed_samples=consumed, tokens=tokens_seen,
                 nonfinite_skipped_steps=nonfinite_total, world_size=world, engine=kind),
            cfg.checkpoint.keep_last, config_json=dump_config(cfg),
        )

    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            lr = engine.lr  # the lr this step's update uses (DeepSpeed steps its schedule inside backward)
            engine.model.train()
            losses, finite, step_tokens = [], True, 0
            for micro in range(accum):
                batch = _to_device(next(batches), device)
                rng = torch.get_rng_state()
                loss, _ = loss_fn(engine.model, batch)

                def recompute(batch=batch, rng=rng):
                    torch.set_rng_state(rng)  # same dropout masks as the first forward
                    return loss_fn(engine.model, batch)[0]

                step_tokens += int(batch[task.tokens_key].numel()) * world
                if not _all_finite(loss):
                    finite = False
                    break
                losses.append(float(loss.detach()))
                if engine.name == "deepspeed":
                    engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                else:
                    engine.backward(loss / accum, recompute_loss=lambda: recompute() / accum)
            consumed += global_batch
            tokens_seen += step_tokens
            if not finite:
                engine.skip_step()
                nonfinite_total += 1
                nonfinite_in_a_row += 1
                logger.warn(f"step {step + 1}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise TrainingError(
                        f"stopping: {nonfinite_in_a_row} non-finite losses in a row at step {step + 1}; "
                        "lower optimizer.lr, enable train.clip_grad_norm, or resume from the last checkpoint "
                        "with different settings"
                    )
                step += 1
                logger.advance()
                continue
            nonfinite_in_a_row = 0
            engine.step()
            step += 1
            loss_value = _mean_over_ranks(sum(losses) / len(losses))
            first_loss = loss_value if first_loss is None else first_loss
            last_loss = loss_value
            dt = time.perf_counter() - t0
            record = None
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or step == 1:
                record = dict(step=step, loss=loss_value, lr=lr, tokens=tokens_seen,
                              tokens_per_s=step_tokens / dt, peak_memory_bytes=peak_memory_bytes(),
                              nonfinite_skipped_steps=nonfinite_total)
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps) and valid_ds is not None:
                record = record or dict(step=step, lr=lr, tokens=tokens_seen)
                record["val_loss"] = evaluate(engine, valid_ds, cfg, loss_fn, device)
            if record is not None:
                logger.log(record)
            logger.advance()
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                save(step)
        if cfg.checkpoint.save_final and (resume_from is None or step > step_of(resume_from)):
            save(step)
    finally:
        logger.close()

    elapsed = time.perf_counter() - t_start
    return dict(
        steps=step, first_loss=first_loss, last_loss=last_loss,
        tokens_per_s=(tokens_seen - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(), nonfinite_skipped_steps=nonfinite_total,
        engine=kind, world_size=world, output_dir=str(out),
    )


def _init_weights(model, source: str, model_cfg) -> None:
    from pretrain.export.hf import initial_weights

    missing, unexpected = model.load_state_dict(initial_weights(source, model_cfg), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"model.init_from={source}: missing {missing[:5]}, unexpected {unexpected[:5]}")


@torch.no_grad()
def evaluate(engine, valid_ds, cfg: RunConfig, loss_fn, device) -> float:
    """Mean validation loss over ``eval_iters`` micro-batches per rank (always the same samples)."""
    from pretrain.data import build_loader

    engine.model.eval()
    loader = build_loader(valid_ds, cfg.train.micro_batch_size, 0, dist_rank(), dist_world())
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= cfg.train.eval_iters:
            break
        loss, _ = loss_fn(engine.model, _to_device(batch, device))
        total += float(loss)
        count += 1
    engine.model.train()
    value = _mean_over_ranks(total / max(count, 1))
    return value if math.isfinite(value) else float("nan")
