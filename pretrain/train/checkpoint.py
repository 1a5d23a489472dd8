"""Atomic, keep-last-K checkpoints and resume.

A checkpoint is a directory ``step_00000100/`` holding what the engine writes (model,
optimizer, schedule), ``trainer.json`` (step, data position, counters) and one
``rng_rank{r}.pt`` per rank. It is written as ``step_00000100.tmp`` and renamed once complete,
so a crash mid-save leaves the previous checkpoint as the latest loadable one; stale ``.tmp``
directories are ignored and cleaned up by the next save.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .engines import barrier, dist_rank

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer.json").is_file()]


def resolve_resume(ckpt_dir: Path, resume: str) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no trainer.json): {path}")
    return path


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
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, engine, trainer_state: dict, keep_last: int) -> Path:
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if dist_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{dist_rank()}.pt")
    barrier()
    if dist_rank() == 0:
        # trainer.json is written last: its presence marks a complete checkpoint.
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():  # re-saving the same step (e.g. final == periodic): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, engine) -> dict:
    """Restore engine state and this rank's RNG; return the trainer state."""
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RuntimeError(f"cannot read {path / 'trainer.json'}: {e}") from None
    engine.load(path)
    rng_file = path / f"rng_rank{dist_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep the fresh seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state
