"""GPT with the GPT-2 layout, built on megatron-core's GPTModel.

Parameter names are megatron-core's own (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.self_attention.linear_qkv.weight``, ``decoder.final_layernorm.weight``, ...),
so Megatron users recognize checkpoints, and the mapping to HF ``GPT2LMHeadModel`` is a pure
weight mapping (see ``pretrain.models.hf_compat``). The output layer has no weight of its own:
it reuses the word embeddings (tied, as in GPT-2).

The forward pass is megatron's, except that at TP = 1 the tied word embedding's gradient is built
in place (``pretrain.models.tied_embedding``: the same outputs, bitwise the same gradient, one
vocab x hidden tensor less memory in backward):
``model(input_ids, position_ids, attention_mask, labels=None)`` returns vocab-parallel logits
``[b, s, V_padded/TP]`` or, with labels, per-token losses ``[b, s]``. The helpers below are free
functions (not methods) so they work the same on a model wrapped by DDP / FSDP / DeepSpeed.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from memopt.heap import release_free_memory
from pretrain.models import megatron_compat
from pretrain.models.common import gather_vocab, masked_mean, set_core_attention, transformer_config
from pretrain.models.config import GPTConfig
from pretrain.models.tied_embedding import in_place_unsupported, tie_gradient_in_place


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's activation ("gelu_new" in transformers): the tanh approximation of GeLU."""
    return F.gelu(x, approximate="tanh")


class MegatronGPT(GPTModel):
    """megatron-core GPTModel configured from a ``GPTConfig``; ``model_config`` keeps the latter."""

    def __init__(self, cfg: GPTConfig):
        fused = megatron_compat.fusion_flags(cfg.fused_kernels)["bias_activation_fusion"]
        # Megatron's fused bias-GeLU kernel (GPU) is the tanh approximation, i.e. exactly GPT-2's
        # activation, but it only fires for activation_func == F.gelu. Unfused we say it directly.
        activation = F.gelu if fused else gelu_tanh
        config = transformer_config(cfg, activation, bias_activation_fusion=True)
        backend = megatron_compat.resolve_attention_backend(cfg.attention_backend)
        super().__init__(
            config=config,
            transformer_layer_spec=set_core_attention(get_gpt_layer_local_spec(), backend),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.seq_length,
            share_embeddings_and_output_weights=True,
            position_embedding_type="learned_absolute",
            parallel_output=True,
        )
        self.model_config = cfg
        # One gradient tensor for the tied embedding (bitwise the stock gradient, one dense
        # vocab x hidden tensor fewer at the end of backward) where megatron's layout allows it.
        if in_place_unsupported(self) is None:
            tie_gradient_in_place(self)


def build_gpt(cfg: GPTConfig, seed: Optional[int] = 1234, release_init_memory: bool = True) -> MegatronGPT:
    """Build a GPT for the current TP layout (call ``init_model_parallel`` first).

    With the same ``seed`` every TP size gets the same initial weights (each rank holds its
    slice). ``seed=None`` leaves the torch generator alone. ``release_init_memory`` returns the
    initialisation's freed temporaries to the kernel (``memopt.heap.release_free_memory``).
    """
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"build_gpt needs a GPTConfig, got {type(cfg).__name__}")
    if seed is not None:
        torch.manual_seed(seed)
    model = MegatronGPT(cfg)
    if release_init_memory:
        # Megatron's CPU initialisation makes two full-size temporaries per weight (the master
        # weight and its concatenated slice); with glibc's default malloc up to a few hundred MB
        # of them stay resident in the heap (docs/benchmarks/memory.md). One trim returns them.
        release_free_memory()
    return model


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """0..s-1 for every row of a [b, s] batch."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def gpt_logits(model, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None):
    """Full-vocabulary logits ``[b, s, vocab_size]`` (gathered over TP, padding rows dropped)."""
    if position_ids is None:
        position_ids = position_ids_for(tokens)
    logits = gather_vocab(model(tokens, position_ids, None))
    return logits[..., : _unwrap(model).model_config.vocab_size]


def gpt_loss(model, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over ``loss_mask`` for a batch from ``pretrain.data`` GPT datasets.

    Returns ``(loss, num_tokens)``; ``num_tokens`` lets a training loop weight micro-batches.
    ``attention_mask`` is used only when the dataset made one (document-level masking);
    otherwise the attention is plain causal.
    """
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = position_ids_for(tokens)
    per_token = model(tokens, position_ids, batch.get("attention_mask"), labels=batch["labels"])
    loss_mask = batch["loss_mask"]
    return masked_mean(per_token, loss_mask), loss_mask.sum()


def _unwrap(model):
    # DDP / FSDP / DeepSpeed wrappers keep the real module under `.module`.
    while not hasattr(model, "model_config") and hasattr(model, "module"):
        model = model.module
    return model
