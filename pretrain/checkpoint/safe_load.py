"""Reading checkpoint files without ever executing pickled code.

A ``.pt`` file is a pickle, and ``torch.load(weights_only=False)`` runs whatever callable the
file names: a crafted checkpoint is a program. Every load here is ``weights_only=True`` (tensors,
containers, numbers and an explicit allow-list of plain data classes):

- our own files: :func:`safe_torch_load`;
- DeepSpeed's files, which DeepSpeed itself loads with ``weights_only=False``:
  :func:`weights_only_torch_load` forces ``weights_only=True`` on every ``torch.load`` made
  inside it, with DeepSpeed's few data classes allow-listed;
- DCP's ``.metadata`` (a raw pickle): :func:`safe_dcp_reader`, an unpickler that admits only
  DCP's metadata classes, torch sizes/dtypes and plain containers.

Any failure is a :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import torch

from pretrain.errors import CheckpointError


def first_error_line(e: BaseException) -> str:
    """The innermost error line of an exception (DCP and torch.load wrap long explanations)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception")) or "Unsupported global" in ln]
    return (errs[-1] if errs else lines[0] if lines else "")[:300]


def _refusal(path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint file {path} (corrupt, truncated or not a weights file): "
                           f"{type(e).__name__}: {first_error_line(e)}")


def safe_torch_load(path: Path):
    """``torch.load(path, weights_only=True)`` onto the CPU; one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refusal(path, e) from None


def deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes found in its checkpoint files: the ZeRO stage enum, the
    loss scaler's state holder and ZeRO-1/2's (numel, start) fragment record. Rebuilding them
    runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load(extra_globals: list | None = None):
    """Inside this block every ``torch.load`` (also DeepSpeed's) is ``weights_only=True``."""
    original = torch.load
    allowed = deepspeed_safe_globals() + list(extra_globals or [])

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise _refusal(f, e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


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


def read_dcp_metadata(path: Path):
    """The ``Metadata`` of the DCP checkpoint directory ``path``, through the allow-list."""
    meta_path = Path(path) / ".metadata"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: DCP checkpoint without .metadata (incomplete)")
    try:
        return _MetadataUnpickler(io.BytesIO(meta_path.read_bytes())).load()
    except Exception as e:
        raise CheckpointError(f"cannot read DCP metadata {meta_path}: {type(e).__name__}: {e}") from None


def safe_dcp_reader(path: Path):
    """A ``FileSystemReader`` for ``dcp.load(storage_reader=...)`` whose metadata read is safe
    (DCP's own reader calls ``pickle.load`` on ``.metadata``; its tensor reads are already
    ``weights_only``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))
