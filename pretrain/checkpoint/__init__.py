"""The checkpoint format: its layout on disk, safe reading, checksums, and save/resume.

Every reader and writer of checkpoints (the engines, the trainer, export, evaluation) goes
through this package, so the layout is known in one place (``layout.py``) and no file is ever
unpickled with code execution allowed (``safe_load.py``).
"""
from pretrain.errors import CheckpointError

from .layout import checkpoint_name, detect_format, step_of
from .manifest import verify_checkpoint, write_manifest
from .safe_load import safe_dcp_reader, safe_torch_load, weights_only_torch_load
from .store import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint

__all__ = [
    "CheckpointError", "checkpoint_name", "detect_format", "list_checkpoints", "load_checkpoint", "resolve_resume",
    "safe_dcp_reader", "safe_torch_load", "save_checkpoint", "step_of", "verify_checkpoint",
    "weights_only_torch_load", "write_manifest",
]
