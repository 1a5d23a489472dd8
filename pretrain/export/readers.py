"""Read the model weights of any engine's checkpoint into one full (unsharded) state dict.

No process group and no knowledge of the world size that wrote the checkpoint is needed:

- single process / DDP: ``step_N/model.pt`` (``torch.load(weights_only=True)``)
- FSDP2: ``step_N/dcp`` (torch DCP), read with ``no_dist=True``; the ``.metadata`` file is a
  pickle, read here with an unpickler that only admits DCP's own metadata classes.
- DeepSpeed stage 0: ``step_N/deepspeed/mp_rank_00_model_states.pt`` (``module``)
- DeepSpeed ZeRO 1-3: the fp32 master partitions in ``*_optim_states.pt``, merged by DeepSpeed's
  ``zero_to_fp32``; DeepSpeed calls ``torch.load(weights_only=False)`` there, so it runs inside
  ``pretrain.checkpoint.weights_only_torch_load`` (``weights_only=True`` forced, DeepSpeed's few
  plain data classes allow-listed): no arbitrary code can run.

The checkpoint's manifest (checksums) is verified first. A missing, truncated or corrupt file
raises ``ExportError`` naming the file.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from pretrain.checkpoint import layout
from pretrain.checkpoint.manifest import verify_checkpoint
from pretrain.checkpoint import safe_load as checkpoint_safe_load
from pretrain.errors import CheckpointError

from .errors import ExportError


def detect_format(ckpt: Path) -> str:
    with _as_export_error():
        return layout.detect_format(ckpt)


def safe_torch_load(path: Path):
    with _as_export_error():
        return checkpoint_safe_load.safe_torch_load(path)


@contextlib.contextmanager
def _as_export_error():
    """The checkpoint package's errors, as this package's one exception type."""
    try:
        yield
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def load_model_state(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, format)`` of the model in checkpoint directory ``ckpt`` (a ``step_N``)."""
    ckpt = Path(ckpt)
    fmt = detect_format(ckpt)
    problem = verify_checkpoint(ckpt)  # checksums first: never convert a damaged checkpoint
    if problem:
        raise ExportError(f"{ckpt} fails verification: {problem}")
    if fmt == "torch":
        sd = safe_torch_load(ckpt / layout.MODEL_FILE)
    elif fmt == "dcp":
        sd = _load_dcp(ckpt / layout.DCP_DIR)
    else:
        sd = _load_deepspeed(ckpt)
    if not isinstance(sd, dict) or not sd:
        raise ExportError(f"{ckpt}: no model weights found")
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            continue
        if not torch.is_tensor(v):
            raise ExportError(f"{ckpt}: entry {k!r} is not a tensor")
        out[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
    return out, fmt


# -- FSDP2 / DCP ------------------------------------------------------------------------------

def _load_dcp(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model`` part of a DCP checkpoint, in this process, without a process group."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = checkpoint_safe_load.safe_dcp_reader(path)
    with _as_export_error():
        metadata = reader.read_metadata()
    model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    if not model_keys:
        raise ExportError(f"{path}: DCP checkpoint has no 'model' entries")
    sd: dict = {}
    try:
        # Only the model's tensors are read (keys=...), not the optimizer state.
        _load_state_dict(sd, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except ExportError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        raise ExportError(f"cannot read DCP checkpoint {path} (corrupt or truncated shard?): {type(e).__name__}: "
                          f"{checkpoint_safe_load.first_error_line(e)}") from None
    model = sd.get("model")
    if not isinstance(model, dict):
        raise ExportError(f"{path}: DCP checkpoint has no 'model' state")
    return model


# -- DeepSpeed ----------------------------------------------------------------------------------

def _load_deepspeed(ckpt: Path) -> Dict[str, torch.Tensor]:
    ds_dir = ckpt / layout.DEEPSPEED_TAG
    files = sorted(p.name for p in ds_dir.glob("*model_states.pt"))
    if not files:
        raise ExportError(f"{ds_dir}: no DeepSpeed *model_states.pt files")
    try:
        import deepspeed.utils.zero_to_fp32 as z2f
    except ImportError:
        raise ExportError("reading a DeepSpeed checkpoint needs the deepspeed package") from None
    # zero_to_fp32 calls torch.load(weights_only=False): forced to weights_only in this block.
    with _as_export_error(), checkpoint_safe_load.weights_only_torch_load():
        states = torch.load(ds_dir / files[0], map_location="cpu")
        stage = _zero_stage(ds_dir)
        if stage == 0:
            module = states.get("module") if isinstance(states, dict) else None
            if not isinstance(module, dict):
                raise ExportError(f"{ds_dir / files[0]}: no 'module' state")
            return module
        try:
            return z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=layout.DEEPSPEED_TAG)
        except (ExportError, CheckpointError):
            raise
        except Exception as e:
            raise ExportError(f"cannot merge the ZeRO-{stage} checkpoint in {ds_dir}: {type(e).__name__}: {e}") from None


def _zero_stage(ds_dir: Path) -> int:
    optim = sorted(ds_dir.glob("*optim_states.pt"))
    if not optim:
        return 0
    # The stage is recorded in the optimizer files; a small read of the first one.
    sd = torch.load(optim[0], map_location="cpu")  # inside weights_only_torch_load
    osd = sd.get("optimizer_state_dict", {}) if isinstance(sd, dict) else {}
    stage = osd.get("zero_stage", 0)
    return int(getattr(stage, "value", stage))


# -- run config ---------------------------------------------------------------------------------

def find_run_config(ckpt: Path) -> Path:
    """``output_dir/config.json`` of the run that wrote ``ckpt`` (default layout
    ``output_dir/checkpoints/step_N``)."""
    ckpt = Path(ckpt).resolve()
    for parent in (ckpt.parent.parent, ckpt.parent, ckpt):
        if (parent / "config.json").is_file():
            return parent / "config.json"
    raise ExportError(f"no run config.json found above {ckpt}; pass --run-config output_dir/config.json")


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {Path(ckpt) / 'trainer.json'}: {e}") from None
