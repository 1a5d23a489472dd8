"""The checkpoint format: its layout on disk, safe reading, checksums, and save/resume.

Every reader and writer of checkpoints (the engines, the trainer, export, evaluation, the
study) goes through this package, so the layout is known in one place (``layout.py``), no file
is ever unpickled with code execution allowed (``safe_load.py``), a checkpoint's weights are read
one way for every engine (``model_state.py``) and its run config becomes a model config by one
rule (``run_config.py``).
"""
from pretrain.errors import CheckpointError

from .layout import checkpoint_name, detect_format, step_of
from .manifest import verify_checkpoint, write_manifest
from .model_state import Source, initial_weights, load_model_state, read_checkpoint
from .run_config import find_run_config, model_config, read_run_config, read_trainer_state
from .safe_load import safe_dcp_reader, safe_torch_load, weights_only_torch_load
from .store import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint, write_single_checkpoint

__all__ = [
    "CheckpointError", "Source", "checkpoint_name", "detect_format", "find_run_config", "initial_weights",
    "list_checkpoints", "load_checkpoint", "load_model_state", "model_config", "read_checkpoint", "read_run_config",
    "read_trainer_state", "resolve_resume", "safe_dcp_reader", "safe_torch_load", "save_checkpoint", "step_of",
    "verify_checkpoint", "weights_only_torch_load", "write_manifest", "write_single_checkpoint",
]
