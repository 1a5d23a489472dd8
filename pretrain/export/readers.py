"""The checkpoint package's readers at the export boundary: the same reads
(``pretrain.checkpoint.model_state``, ``run_config``), their ``CheckpointError`` as this
package's one exception type, ``ExportError``."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Tuple

import torch

from pretrain.checkpoint import layout, model_state
from pretrain.errors import CheckpointError
from pretrain.models.hf_compat import HFCompatError

from .errors import ExportError


@contextlib.contextmanager
def as_export_error():
    """The checkpoint package's and the HF adapter's errors, as ``ExportError``."""
    try:
        yield
    except (CheckpointError, HFCompatError) as e:
        raise ExportError(str(e)) from None


def detect_format(ckpt: Path) -> str:
    with as_export_error():
        return layout.detect_format(ckpt)


def load_model_state(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, format)`` of the model in checkpoint directory ``ckpt`` (a ``step_N``),
    manifest verified first (see ``pretrain.checkpoint.model_state``)."""
    with as_export_error():
        return model_state.load_model_state(ckpt)
