"""Checksums of a checkpoint's files: ``manifest.json`` holds the size and sha256 of every
other file, is written last (atomically, by rename), and is checked before anything is loaded.

A flipped byte, a truncated shard or a file replaced after the save is then refused, naming the
file, instead of being trained on. Hashing is spread over the ranks (each hashes every
``world``-th file), so a large sharded checkpoint costs each rank only its share.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pretrain.dist import all_gather_objects, dist_rank, dist_world

from .layout import MANIFEST_FILE

FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _my_share(names: list[str]) -> list[str]:
    return names[dist_rank()::dist_world()]


def write_manifest(ckpt: Path) -> None:
    """Collective: every rank calls it after all files are written; rank 0 writes the manifest."""
    ckpt = Path(ckpt)
    names = _files(ckpt) if dist_rank() == 0 else None
    names = all_gather_objects(names)[0]
    mine = {n: {"bytes": (ckpt / n).stat().st_size, "sha256": _sha256(ckpt / n)} for n in _my_share(names)}
    entries: dict = {}
    for part in all_gather_objects(mine):
        entries.update(part)
    if dist_rank() == 0:
        tmp = ckpt / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "files": dict(sorted(entries.items()))}, indent=1))
        os.replace(tmp, ckpt / MANIFEST_FILE)


def _check(ckpt: Path, name: str, entry: dict) -> str | None:
    path = ckpt / name
    if not path.is_file():
        return f"{path}: listed in {MANIFEST_FILE} but missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, {MANIFEST_FILE} says {entry['bytes']} (truncated or replaced)"
    if _sha256(path) != entry["sha256"]:
        return f"{path}: sha256 differs from {MANIFEST_FILE} (corrupted or modified after the save)"
    return None


def verify_checkpoint(ckpt: Path) -> str | None:
    """``None`` when every file matches the manifest, else one line naming the first bad file.
    Collective when distributed (every rank gets the same answer). A checkpoint written before
    manifests existed has none and is accepted (``has_manifest`` tells them apart)."""
    ckpt = Path(ckpt)
    manifest = ckpt / MANIFEST_FILE
    entries, problem = {}, None
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["files"]
            if not isinstance(entries, dict):
                raise ValueError("'files' is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{manifest}: unreadable ({type(e).__name__}: {e})"
    if problem is None:
        names = sorted(entries)
        for name in _my_share(names):
            try:
                problem = _check(ckpt, name, entries[name])
            except (OSError, KeyError, TypeError) as e:
                problem = f"{ckpt / name}: cannot be checked ({type(e).__name__}: {e})"
            if problem:
                break
    problems = [p for p in all_gather_objects(problem) if p]
    return problems[0] if problems else None


def has_manifest(ckpt: Path) -> bool:
    return (Path(ckpt) / MANIFEST_FILE).is_file()
