"""Read the model weights of any engine's checkpoint into one full (unsharded) state dict.

No process group and no knowledge of the world size that wrote the checkpoint is needed:

- single process / DDP: ``step_N/model.pt`` (``torch.load(weights_only=True)``)
- FSDP2: ``step_N/dcp`` (torch DCP), read with ``no_dist=True``; the ``.metadata`` file is a
  pickle, read here with an unpickler that only admits DCP's own metadata classes.
- DeepSpeed stage 0: ``step_N/deepspeed/mp_rank_00_model_states.pt`` (``module``)
- DeepSpeed ZeRO 1-3: the fp32 master partitions in ``*_optim_states.pt``, merged by DeepSpeed's
  ``zero_to_fp32``; DeepSpeed calls ``torch.load(weights_only=False)`` there, so we run it with
  ``torch.load`` forced to ``weights_only=True`` and only DeepSpeed's two plain data classes
  (``ZeroStageEnum``, ``LossScaler``, ``fragment_address``) allow-listed: no arbitrary code can run.

A missing, truncated or corrupt file raises ``ExportError`` naming the file.
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Dict, Tuple

import torch

from .errors import ExportError


def detect_format(ckpt: Path) -> str:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ExportError(f"{ckpt}: no such checkpoint directory")
    if (ckpt / "model.pt").is_file():
        return "torch"
    if (ckpt / "dcp").is_dir():
        return "dcp"
    if (ckpt / "deepspeed").is_dir():
        return "deepspeed"
    raise ExportError(f"{ckpt}: neither model.pt, dcp/ nor deepspeed/ found: not a checkpoint of this framework")


def safe_torch_load(path: Path):
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / contains code
        raise ExportError(f"cannot read checkpoint file {path} (corrupt, truncated or not a weights file): "
                          f"{type(e).__name__}: {_first_error_line(e)}") from None


def load_model_state(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state_dict, format)`` of the model in checkpoint directory ``ckpt`` (a ``step_N``)."""
    ckpt = Path(ckpt)
    fmt = detect_format(ckpt)
    if fmt == "torch":
        sd = safe_torch_load(ckpt / "model.pt")
    elif fmt == "dcp":
        sd = _load_dcp(ckpt / "dcp")
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

class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses, torch sizes/dtypes and plain containers."""

    _ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
    _ALLOWED = {("torch", "Size"), ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
                ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "int8"), ("torch", "uint8"),
                ("torch", "bool"), ("torch", "strided"), ("torch", "contiguous_format"), ("torch", "preserve_format"),
                ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("pathlib", "PosixPath"),
                ("torch.serialization", "_get_layout"), ("torch._utils", "_rebuild_tensor_v2"),
                ("torch.storage", "_load_from_bytes")}

    def find_class(self, module, name):
        if module.startswith(self._ALLOWED_PREFIXES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from DCP metadata")


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta_path = Path(self.path) / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(meta_path.read_bytes())).load()
            except Exception as e:
                raise ExportError(f"cannot read DCP metadata {meta_path}: {type(e).__name__}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _load_dcp(path: Path) -> Dict[str, torch.Tensor]:
    """The ``model`` part of a DCP checkpoint, in this process, without a process group."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (path / ".metadata").is_file():
        raise ExportError(f"{path}: DCP checkpoint without .metadata (incomplete)")
    reader = _safe_reader(path)
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
                          f"{_first_error_line(e)}") from None
    model = sd.get("model")
    if not isinstance(model, dict):
        raise ExportError(f"{path}: DCP checkpoint has no 'model' state")
    return model


def _first_error_line(e: BaseException) -> str:
    """The innermost error line of an exception (DCP wraps per-rank tracebacks in its message)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception")) or "Unsupported global" in ln]
    return (errs[-1] if errs else lines[0] if lines else "")[:300]


# -- DeepSpeed ----------------------------------------------------------------------------------

class _SafeTorch:
    """Stands in for the ``torch`` module inside DeepSpeed's zero_to_fp32: same, except that
    ``load`` always uses ``weights_only=True``."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return torch.load(f, *args, **kwargs)
        except Exception as e:
            raise ExportError(f"cannot read DeepSpeed checkpoint file {f} (corrupt or truncated?): "
                              f"{type(e).__name__}: {_first_error_line(e)}") from None


def _deepspeed_safe_globals():
    """DeepSpeed's plain data classes found in its checkpoint files: an enum, the loss scaler's
    state holder and ZeRO-1/2's (numel, start) fragment record. Constructing them runs no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_deepspeed(ckpt: Path) -> Dict[str, torch.Tensor]:
    ds_dir = ckpt / "deepspeed"
    files = sorted(p.name for p in ds_dir.glob("*model_states.pt"))
    if not files:
        raise ExportError(f"{ds_dir}: no DeepSpeed *model_states.pt files")
    try:
        import deepspeed.utils.zero_to_fp32 as z2f
    except ImportError:
        raise ExportError("reading a DeepSpeed checkpoint needs the deepspeed package") from None
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        states = safe_torch_load(ds_dir / files[0])
        stage = _zero_stage(ds_dir)
        if stage == 0:
            module = states.get("module")
            if not isinstance(module, dict):
                raise ExportError(f"{ds_dir / files[0]}: no 'module' state")
            return module
        original = z2f.torch
        z2f.torch = _SafeTorch()
        try:
            return z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"cannot merge the ZeRO-{stage} checkpoint in {ds_dir}: {type(e).__name__}: {e}") from None
        finally:
            z2f.torch = original


def _zero_stage(ds_dir: Path) -> int:
    optim = sorted(ds_dir.glob("*optim_states.pt"))
    if not optim:
        return 0
    # The stage is recorded in the optimizer files; a small read of the first one.
    sd = safe_torch_load(optim[0])
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
