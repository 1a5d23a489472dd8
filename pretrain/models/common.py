"""What GPT and BERT share: the megatron TransformerConfig and the layer spec's attention choice."""

from __future__ import annotations

from typing import Callable

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from pretrain.models import megatron_compat
from pretrain.models.config import TransformerArch


def require_model_parallel() -> int:
    """The TP size, or a clear error when megatron's parallel state was not set up."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron model-parallel state is not initialized: call "
            "pretrain.models.init_model_parallel(tensor_parallel_size) before building a model"
        )
    return parallel_state.get_tensor_model_parallel_world_size()


def transformer_config(
    arch: TransformerArch, activation_func: Callable, bias_activation_fusion: bool
) -> TransformerConfig:
    """The megatron TransformerConfig for an architecture, on the current TP layout."""
    tp = require_model_parallel()
    if arch.num_attention_heads % tp:
        raise ValueError(f"num_attention_heads {arch.num_attention_heads} not divisible by TP={tp}")
    if arch.padded_vocab_size % tp:
        raise ValueError(
            f"padded vocab {arch.padded_vocab_size} not divisible by TP={tp}; raise "
            "make_vocab_size_divisible_by"
        )
    backend = megatron_compat.resolve_attention_backend(arch.attention_backend)
    flags = megatron_compat.fusion_flags(arch.fused_kernels)
    flags["bias_activation_fusion"] = flags["bias_activation_fusion"] and bias_activation_fusion
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        ffn_hidden_size=arch.ffn_hidden_size,
        hidden_dropout=arch.hidden_dropout,
        attention_dropout=arch.attention_dropout,
        layernorm_epsilon=arch.layernorm_epsilon,
        init_method_std=arch.init_method_std,
        activation_func=activation_func,
        tensor_model_parallel_size=tp,
        # Build the full weight on every rank from the default torch generator, then keep this
        # rank's slice: initial weights are identical for any TP size given the same seed, and
        # parameters start on CPU whatever the hardware (engines move them).
        use_cpu_initialization=True,
        # TE reads NVTE_* switches; "local" keeps TE's env untouched for our non-TE attentions.
        attention_backend=AttnBackend.auto if backend == "te" else AttnBackend.local,
        **flags,
    )


def set_core_attention(spec: ModuleSpec, backend: str) -> ModuleSpec:
    """Put the chosen core attention into a layer spec (linear layers and norms stay local, so
    parameter names do not depend on the attention backend)."""
    attn = spec.submodules.self_attention.submodules
    if backend == "sdpa":
        attn.core_attention = megatron_compat.SDPACoreAttention
    elif backend == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        attn.core_attention = DotProductAttention
    elif backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        attn.core_attention = TEDotProductAttention
    else:
        raise ValueError(f"unresolved attention backend {backend!r}")
    return spec


def gather_vocab(logits):
    """Gather vocab-parallel logits [..., V/TP] from the TP group into [..., V]."""
    return megatron_compat.gather_last_dim(logits, parallel_state.get_tensor_model_parallel_group())


def masked_mean(per_token_loss, loss_mask):
    """Mean of per-token losses over positions where loss_mask is 1 (0 if there are none)."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
