"""What may change between a checkpoint and the run that resumes it.

Checked before anything is loaded (one-line ``CheckpointError``):
  - the engine must read the checkpoint's format (single/DDP: model.pt; FSDP2: dcp/; DeepSpeed);
  - the model settings that shape the weights must match (dropout rates may change);
  - ``optimizer.name`` and ``optimizer.hparams`` must match: the optimizer's hyperparameters are
    restored from the checkpoint with its state, so a changed value would be silently ignored.
Applied after loading, and logged: ``optimizer.lr``, ``train.steps`` and ``schedule.*``. The
schedule is recomputed for this run's settings from the saved step on (see
``schedule.reapply_schedule``), so extending a cosine run re-stretches the cosine over the new
total from where the run stands.
"""
from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint.layout import CONFIG_FILE, detect_format
from pretrain.checkpoint.run_config import read_run_config
from pretrain.errors import CheckpointError

_FORMAT_OF_ENGINE = {"single": "torch", "ddp": "torch", "fsdp2": "dcp", "deepspeed": "deepspeed"}
_ENGINES_OF_FORMAT = {"torch": "single or ddp", "dcp": "fsdp2", "deepspeed": "deepspeed"}


def saved_config(path: Path) -> dict | None:
    """The run config stored in a checkpoint (None for checkpoints from before it was stored)."""
    f = Path(path) / CONFIG_FILE
    return read_run_config(f) if f.is_file() else None


def check_resumable(path: Path, cfg, engine_kind: str) -> dict | None:
    """Refuse a checkpoint this run cannot continue; return its saved config (or None)."""
    fmt = detect_format(path)
    if _FORMAT_OF_ENGINE[engine_kind] != fmt:
        raise CheckpointError(
            f"{path} was written by engine.kind={_ENGINES_OF_FORMAT[fmt]} and this run uses {engine_kind}; resume "
            f"with that engine, or start from its weights with a fresh optimizer: model.init_from={path} "
            "checkpoint.resume=none"
        )
    saved = saved_config(path)
    if saved is None:
        return None
    old = saved.get("optimizer", {})
    if old.get("name") != cfg.optimizer.name:
        raise CheckpointError(
            f"{path} holds {old.get('name')} optimizer state and this run has optimizer.name={cfg.optimizer.name}; "
            f"resume with optimizer.name={old.get('name')}, or start from its weights with a fresh optimizer: "
            f"model.init_from={path} checkpoint.resume=none"
        )
    _check_same_model(path, saved, cfg)
    old_h, new_h = old.get("hparams", {}), dict(cfg.optimizer.hparams)
    for key in sorted(set(old_h) | set(new_h)):
        if old_h.get(key) != new_h.get(key):
            raise CheckpointError(
                f"optimizer.hparams.{key} is {new_h.get(key)!r} but {path} was trained with {old_h.get(key)!r}: "
                "optimizer hyperparameters are restored with the optimizer state, so the change would be ignored; "
                f"resume with the saved value, or start a fresh optimizer with model.init_from={path} "
                "checkpoint.resume=none"
            )
    return saved


def _architecture(model: dict, seq_length) -> dict:
    """The settings that shape the weights (dropout rates may change on resume)."""
    arch = {f"model.{k}": model.get(k) for k in ("kind", "preset")}
    arch.update({f"model.overrides.{k}": v for k, v in model.get("overrides", {}).items() if "dropout" not in k})
    arch["train.seq_length"] = seq_length
    return arch


def _check_same_model(path: Path, saved: dict, cfg) -> None:
    old = _architecture(saved.get("model", {}), saved.get("train", {}).get("seq_length"))
    new = _architecture(cfg.model.model_dump(), cfg.train.seq_length)
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        def shown(d, k):
            return "unset" if d.get(k) is None else repr(d.get(k))

        said = ", ".join(f"{k}={shown(new, k)} (checkpoint: {shown(old, k)})" for k in diff[:3])
        raise CheckpointError(f"{path} holds another model: {said}; resume with the checkpoint's model settings, "
                              "or use another checkpoint.dir for a new model")


def schedule_changes(saved: dict | None, cfg) -> list[str]:
    """One line per changed lr/schedule setting (applied by ``reapply_schedule``)."""
    if saved is None:
        return []
    changes = []
    old_lr = saved.get("optimizer", {}).get("lr")
    if old_lr != cfg.optimizer.lr:
        changes.append(f"optimizer.lr {old_lr} -> {cfg.optimizer.lr}")
    old_steps = saved.get("train", {}).get("steps")
    if old_steps != cfg.train.steps:
        changes.append(f"train.steps {old_steps} -> {cfg.train.steps}")
    old_sched = saved.get("schedule", {})
    for key, value in cfg.schedule.model_dump().items():
        if old_sched.get(key) != value:
            changes.append(f"schedule.{key} {old_sched.get(key)} -> {value}")
    return changes
