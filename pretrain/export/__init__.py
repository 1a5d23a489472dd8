"""Checkpoint readers (every engine), HF export/import with logit validation, tokenizer conversion.

    from pretrain.export import export, import_gpt2, load_model_state
"""
from .errors import ExportError
from .hf import ValidationError, export, import_gpt2, read_checkpoint, validate_export
from .readers import detect_format, load_model_state

__all__ = ["ExportError", "ValidationError", "detect_format", "export", "import_gpt2", "load_model_state",
           "read_checkpoint", "validate_export"]
