"""Typed model configs and named size presets.

A config describes the architecture only: no precision, device, optimizer or engine settings
(those belong to the training loop that wraps the model from outside). Tensor-parallel size is
not part of it either: it comes from megatron's parallel state when the model is built, so one
config (and one checkpoint) serves every TP layout.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

ATTENTION_BACKENDS = ("auto", "sdpa", "local", "te")


@dataclass
class TransformerArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    # Maximum sequence length = number of learned position embeddings.
    seq_length: int
    vocab_size: int
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    # The embedding table is padded to a multiple of this, independent of TP size, so that
    # TP=1 and TP=2 models have identical shapes and identical initial weights.
    make_vocab_size_divisible_by: int = 128
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    # "auto" (TE on GPU when installed, else SDPA), "sdpa", "local" (megatron's stock attention,
    # GPU only) or "te" (Transformer Engine). See pretrain/models/megatron_compat.py.
    attention_backend: str = "auto"
    # Megatron's jit fusions; None = on when CUDA is available.
    fused_kernels: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got "
                f"{self.attention_backend!r}"
            )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_tensor_parallel(arch: TransformerArch, tp: int, check_vocab: bool = True) -> None:
    """ValueError (one line, saying what to change) unless ``arch`` splits over ``tp`` ranks:
    attention heads, hidden and FFN sizes, and the padded vocabulary (which does not depend on
    TP, so runs at every TP size have the same shapes and comparable losses)."""
    if tp == 1:
        return
    for name in ("num_attention_heads", "hidden_size", "ffn_hidden_size"):
        if getattr(arch, name) % tp:
            raise ValueError(f"{name}={getattr(arch, name)} is not divisible by tensor_parallel_size={tp}; "
                             f"choose a tensor_parallel_size that divides it")
    if check_vocab and arch.padded_vocab_size % tp:
        raise ValueError(f"the padded vocabulary ({arch.padded_vocab_size} = vocab {arch.vocab_size} rounded up to "
                         f"make_vocab_size_divisible_by={arch.make_vocab_size_divisible_by}) is not divisible by "
                         f"tensor_parallel_size={tp}; set model.overrides.make_vocab_size_divisible_by to a multiple of {tp}")


@dataclass
class GPTConfig(TransformerArch):
    """GPT-2 layout: learned absolute positions, pre-LayerNorm blocks with a final LayerNorm,
    tanh-approximated GeLU (GPT-2's "gelu_new"), biases everywhere, tied input/output embeddings.
    """

    kind: str = field(default="gpt", init=False)


@dataclass
class BertConfig(TransformerArch):
    """Megatron BERT: pre-LayerNorm blocks with a final LayerNorm (HF ``MegatronBertForMaskedLM``
    layout), exact (erf) GeLU, MLM head with tied decoder weights, optional binary (sentence
    order) head with a pooler, token-type embeddings when the binary head is on.
    """

    add_binary_head: bool = True
    kind: str = field(default="bert", init=False)

    @property
    def num_tokentypes(self) -> int:
        return 2 if self.add_binary_head else 0


# Architecture presets. vocab_size is the usual one for the family; build with your tokenizer's
# size via `get_preset(name, vocab_size=tok.vocab_size)`.
_GPT_PRESETS: Dict[str, Dict[str, Any]] = {
    # For unit tests: builds and runs in milliseconds.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                 vocab_size=8192),
    # The CPU demo: ~14M parameters with the bundled 8k tokenizer.
    "demo": dict(num_layers=6, hidden_size=384, num_attention_heads=6, seq_length=256,
                 vocab_size=8192),
    "gpt2-124m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=1024,
                      vocab_size=50257),
    "gpt2-345m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=1024,
                      vocab_size=50257),
    # Megatron's 1.3B GPT (24 x 2048, 16 heads of 128).
    "gpt2-1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=1024,
                      vocab_size=50257),
}

_BERT_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                 vocab_size=8192),
    "demo": dict(num_layers=6, hidden_size=384, num_attention_heads=6, seq_length=128,
                 vocab_size=8192),
    "bert-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, seq_length=512,
                      vocab_size=30522),
    "bert-large": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=512,
                       vocab_size=30522),
}

PRESETS = {"gpt": _GPT_PRESETS, "bert": _BERT_PRESETS}


def preset_names(kind: str) -> list:
    return sorted(PRESETS[kind])


class ConfigFieldError(ValueError):
    """An override that the config class does not accept; ``field`` names it (so a run config can
    report the full key, ``model.overrides.<field>``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


def _accepts(hint, value) -> bool:
    if typing.get_origin(hint) is Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):  # bool is an int to isinstance, never to a config
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else hint.__name__


def check_overrides(kind: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``overrides`` checked against the kind's config class: ``ConfigFieldError`` for the first
    one that is not a field or has the wrong type (the dataclass itself would take a string for
    an int and fail much later, or raise a TypeError that names no field). Returned with float
    fields given as strings converted: YAML 1.1 reads ``1e-6`` (no dot) as a string."""
    cls = GPTConfig if kind == "gpt" else BertConfig
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    out = dict(overrides)
    for key, value in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=2)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigFieldError(key, f"{key!r} is not a field of {cls.__name__}{hint}; valid fields: {', '.join(valid)}")
        if hints[key] is float and isinstance(value, str):
            try:
                value = out[key] = float(value)
            except ValueError:
                pass
        if not _accepts(hints[key], value):
            raise ConfigFieldError(key, f"{key!r} must be {_type_name(hints[key])} (got {value!r})")
    return out


def get_preset(name: str, kind: Optional[str] = None, **overrides) -> Union[GPTConfig, BertConfig]:
    """A config from a named preset, e.g. ``get_preset("demo", "gpt", vocab_size=8000)``.

    ``kind`` may be omitted for names that exist in one family only (``gpt2-*``, ``bert-*``).
    """
    if kind is None:
        owners = [k for k, table in PRESETS.items() if name in table]
        if len(owners) != 1:
            raise ValueError(
                f"preset {name!r} is " + ("ambiguous" if owners else "unknown")
                + f"; pass kind='gpt' or 'bert' (gpt: {preset_names('gpt')}, "
                f"bert: {preset_names('bert')})"
            )
        kind = owners[0]
    if kind not in PRESETS:
        raise ValueError(f"kind must be 'gpt' or 'bert', got {kind!r}")
    if name not in PRESETS[kind]:
        close = difflib.get_close_matches(name, preset_names(kind), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {kind} preset {name!r}{hint}; choose from {', '.join(preset_names(kind))}")
    overrides = check_overrides(kind, overrides)
    cls = GPTConfig if kind == "gpt" else BertConfig
    return cls(**{**PRESETS[kind][name], **overrides})


def config_from_dict(d: Dict[str, Any], kind: str) -> Union[GPTConfig, BertConfig]:
    """Build a config from a mapping (e.g. a YAML run config's ``model:`` section).

    ``{"preset": "demo", "hidden_dropout": 0.0}`` starts from a preset and overrides fields;
    without ``preset`` every required field must be given. Unknown keys are an error.
    """
    d = dict(d)
    d.pop("kind", None)
    cls = GPTConfig if kind == "gpt" else BertConfig
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - known - {"preset"})
    if unknown:
        raise ValueError(f"unknown {kind} model config keys: {unknown}")
    preset = d.pop("preset", None)
    if preset is not None:
        return get_preset(preset, kind, **d)
    return cls(**d)
