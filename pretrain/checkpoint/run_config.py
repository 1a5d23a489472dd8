"""Which run wrote a checkpoint, where it stands, and which model it built.

    model_config(cfg, tokenizer.vocab_size)                      # what the trainer builds
    model_config(saved_dict, vocab, for_inference=True)           # what export and eval rebuild

``model_config`` is the one place that turns a run config (the typed ``RunConfig``, or the JSON
dict saved as ``config.json`` next to and inside every checkpoint) into a model config: the
preset, then ``model.overrides``, ``vocab_size`` defaulting to the tokenizer's, and
``train.seq_length`` (when set) winning over both. A rule kept in several copies drifts, and a
drifted copy rebuilds a checkpoint into a model of another shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pretrain.errors import CheckpointError

from .layout import CONFIG_FILE, TRAINER_FILE, step_of
from .store import read_json

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = "data/tokenizer/spm_bpe_8k.model"


def model_config(run_cfg, tokenizer_vocab: Optional[int] = None, *, kind: Optional[str] = None,
                 for_inference: bool = False):
    """The ``GPTConfig`` / ``BertConfig`` a run config builds.

    ``run_cfg``: a ``RunConfig`` or its saved JSON dict (sections may be missing: checkpoints of
    older versions). ``kind`` overrides ``model.kind`` (the trainer's task decides it).
    ``for_inference``: no dropout and SDPA attention, for rebuilding a checkpoint on any machine
    (the weights are the same under every attention backend)."""
    from pretrain.models.config import get_preset

    if not isinstance(run_cfg, dict):
        run_cfg = run_cfg.model_dump()
    m = run_cfg.get("model") or {}
    overrides = dict(m.get("overrides") or {})
    if tokenizer_vocab is not None:
        overrides.setdefault("vocab_size", tokenizer_vocab)
    seq = (run_cfg.get("train") or {}).get("seq_length")
    if seq:
        overrides["seq_length"] = seq
    if for_inference:
        overrides.update(hidden_dropout=0.0, attention_dropout=0.0, attention_backend="sdpa")
    return get_preset(m.get("preset", "demo"), kind or m.get("kind", "gpt"), **overrides)


def find_run_config(ckpt: Path) -> Path:
    """The run config of checkpoint ``ckpt``: its own ``config.json`` (the config that wrote
    exactly this checkpoint), else ``output_dir/config.json`` above it (default layout
    ``output_dir/checkpoints/step_N``; checkpoints from before configs were stored in them)."""
    ckpt = Path(ckpt).resolve()
    for parent in (ckpt, ckpt.parent.parent, ckpt.parent):
        if (parent / CONFIG_FILE).is_file():
            return parent / CONFIG_FILE
    raise CheckpointError(f"no run config.json found above {ckpt}; pass --run-config output_dir/config.json")


def read_run_config(path: Path) -> dict:
    """A saved run config (``config.json``) as a dict."""
    return read_json(path)


def read_trainer_state(ckpt: Path) -> dict:
    """``trainer.json``: step, data position, counters, world size and engine of the save."""
    return read_json(Path(ckpt) / TRAINER_FILE)


def resolve_path(p: str, base: Optional[Path] = None) -> str:
    """A path from a run config: as given, else relative to the config's dir (for a checkpoint's
    own config.json also the run's output_dir, two levels up), else the repo root."""
    bases = [base] if base else []
    if base and step_of(base) is not None:
        bases.append(base.parent.parent)
    cands = [Path(p)] + [b / p for b in bases] + [ROOT / p]
    for c in cands:
        if c.exists():
            return str(c)
    raise CheckpointError(f"{p}: not found (tried {', '.join(str(c) for c in cands)})")


def tokenizer_path(run_cfg: dict, cfg_path: Path) -> str:
    """The run's tokenizer file (a relative path may be relative to the config's directory)."""
    return resolve_path((run_cfg.get("data") or {}).get("tokenizer", DEFAULT_TOKENIZER), Path(cfg_path).parent)
