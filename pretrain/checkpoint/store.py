"""Atomic, verified, keep-last-K checkpoints, and finding the one to resume from.

A checkpoint is written as ``step_00000100.tmp/``: the engine's files, each rank's RNG,
``trainer.json``, ``config.json``, then ``manifest.json`` (checksums) last; the directory is
renamed to ``step_00000100/`` only then, so a crash mid-save leaves the previous checkpoint the
latest one. Stale ``.tmp`` directories are removed by the next save. On resume the manifest is
checked first; ``resume=auto`` falls back to the newest checkpoint that verifies, and says so.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pretrain.errors import CheckpointError
from pretrain.dist import barrier, dist_rank

from .layout import (CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_FILE,
                     checkpoint_name, rng_file, step_of)
from .manifest import has_manifest, verify_checkpoint, write_manifest
from .safe_load import safe_torch_load


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (complete = renamed from ``.tmp``, with
    a manifest, or a ``trainer.json`` for checkpoints from before manifests)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found) if (p / MANIFEST_FILE).is_file() or (p / TRAINER_FILE).is_file()]


def resolve_resume(ckpt_dir: Path, resume: str, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from (verified against its manifest), or None to start fresh.
    Collective when distributed (verification is spread over the ranks)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_FILE).is_file():
            raise CheckpointError(f"not a complete checkpoint (no {TRAINER_FILE}): {path}")
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume={path} fails verification: {problem}")
        _warn_unverified(path, warn)
        return path
    candidates = list_checkpoints(ckpt_dir)[::-1]
    refused = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            if refused:
                warn(f"resuming from {path.name}, the newest checkpoint that verifies; refused: " + "; ".join(refused))
            _warn_unverified(path, warn)
            return path
        refused.append(problem)
    if refused:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies (newest: {refused[0]}); move the damaged "
                              "ones away or set checkpoint.resume=none to start over")
    return None


def _warn_unverified(path: Path, warn) -> None:
    if not has_manifest(path):
        warn(f"{path} has no {MANIFEST_FILE} (written by an older version): loaded without checksum verification")


def rng_state() -> dict:
    """All RNG states as tensors and numbers, so the file loads with ``weights_only=True``."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        tracker = _megatron_rng_tracker()
        if tracker is not None:  # megatron's dropout under tensor parallelism draws from these
            state["megatron_tracker"] = tracker.get_states()
    return state


def _megatron_rng_tracker():
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if tracker.is_initialized() else None


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        tracker = _megatron_rng_tracker()
        if tracker is not None and "megatron_tracker" in state:
            tracker.set_states(state["megatron_tracker"])


def save_checkpoint(ckpt_dir: Path, step: int, engine, trainer_state: dict, keep_last: int,
                    config_json: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if dist_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / rng_file(dist_rank()))
    if dist_rank() == 0:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
        if config_json is not None:
            (tmp / CONFIG_FILE).write_text(config_json)
    barrier()
    write_manifest(tmp)  # last: only a fully written checkpoint gets one
    if dist_rank() == 0:
        if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_single_checkpoint(ckpt_dir: Path, step: int, model_state: dict, trainer_state: dict, config_json: str,
                            optimizer_state: dict | None = None, scheduler_state: dict | None = None) -> Path:
    """A checkpoint in the single-process format written from states, without an engine (one
    process only): ``model.pt``, ``optimizer.pt`` / ``scheduler.pt`` when given, ``trainer.json``,
    ``config.json``, then the manifest; atomic like :func:`save_checkpoint`. No RNG files: a run
    resuming it keeps its own seed, as when no RNG file matches its rank. Other checkpoints in
    ``ckpt_dir`` are left alone (nothing is pruned). Returns the checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, state in ((MODEL_FILE, model_state), (OPTIMIZER_FILE, optimizer_state), (SCHEDULER_FILE, scheduler_state)):
        if state is not None:
            torch.save(state, tmp / name)
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
    (tmp / CONFIG_FILE).write_text(config_json)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def _gist(e: BaseException) -> str:
    """The informative line of a load_state_dict error (its first line is only a heading)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("size mismatch", "Missing key", "Unexpected key")):
            return ln[:300]
    return lines[0][:300] if lines else ""


def load_checkpoint(path: Path, engine) -> dict:
    """Restore engine state and this rank's RNG; return the trainer state."""
    path = Path(path)
    trainer_state = read_json(path / TRAINER_FILE)
    try:
        engine.load(path)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        # A checkpoint that passed its checksums but does not fit this model or optimizer.
        raise CheckpointError(f"cannot restore {path} into this run ({type(e).__name__}: {_gist(e)}); was it "
                              "written with other model.* settings?") from e
    rng_path = path / rng_file(dist_rank())
    if rng_path.is_file():  # absent when resuming on more ranks than saved: keep the fresh seed
        state = safe_torch_load(rng_path)
        try:
            set_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{rng_path}: not an RNG state file ({type(e).__name__}: {e})") from None
    return trainer_state
