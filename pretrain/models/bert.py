"""Megatron BERT (masked LM, optional binary sentence-order head) on megatron-core's BertModel.

Layout: learned absolute + token-type embeddings, pre-LayerNorm blocks with a final LayerNorm,
exact (erf) GeLU, an MLM head (dense -> GeLU -> LayerNorm -> tied decoder with bias), and with
``add_binary_head`` a pooler (dense+tanh on the first token) and a 2-way classifier. This is HF
``MegatronBertForPreTraining`` / ``MegatronBertForMaskedLM`` up to a weight mapping.

Forward is megatron's: ``model(input_ids, attention_mask, tokentype_ids=None, lm_labels=None)``
with ``attention_mask`` = 1 for real tokens, 0 for padding. It returns ``(logits, binary_logits)``
or, with labels, ``(per_token_lm_loss [b, s], binary_logits)``.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel

from memopt.heap import release_free_memory
from pretrain.models import megatron_compat
from pretrain.models.common import gather_vocab, masked_mean, set_core_attention, transformer_config
from pretrain.models.config import BertConfig


class MegatronBert(BertModel):
    """megatron-core BertModel configured from a ``BertConfig``; ``model_config`` keeps the latter."""

    def __init__(self, cfg: BertConfig):
        # BERT's GeLU is the exact erf form; megatron's fused bias-GeLU is the tanh approximation,
        # so that fusion stays off for BERT even on GPU.
        config = transformer_config(cfg, F.gelu, bias_activation_fusion=False)
        backend = megatron_compat.resolve_attention_backend(cfg.attention_backend)
        # The stock spec is a module-level object: copy before changing its attention.
        spec = set_core_attention(copy.deepcopy(bert_layer_local_spec), backend)
        super().__init__(
            config=config,
            num_tokentypes=cfg.num_tokentypes,
            transformer_layer_spec=spec,
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.seq_length,
            share_embeddings_and_output_weights=True,
            position_embedding_type="learned_absolute",
            add_binary_head=cfg.add_binary_head,
            parallel_output=True,
        )
        self.model_config = cfg

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        # CPU workaround 3 (pretrain/models/megatron_compat.py): megatron's check needs TE for
        # any attention other than its own DotProductAttention.
        core = self.transformer_layer_spec.submodules.self_attention.submodules.core_attention
        dims = megatron_compat.bert_attention_mask_dims(core)
        return dims if dims is not None else super()._sanity_check_attention_and_get_attn_mask_dimension()


def build_bert(cfg: BertConfig, seed: Optional[int] = 1234, release_init_memory: bool = True) -> MegatronBert:
    """Build a BERT for the current TP layout (call ``init_model_parallel`` first)."""
    if not isinstance(cfg, BertConfig):
        raise TypeError(f"build_bert needs a BertConfig, got {type(cfg).__name__}")
    if seed is not None:
        torch.manual_seed(seed)
    model = MegatronBert(cfg)
    if release_init_memory:
        # Megatron's CPU initialisation makes two full-size temporaries per weight (the master
        # weight and its concatenated slice); with glibc's default malloc up to a few hundred MB
        # of them stay resident in the heap (docs/benchmarks/memory.md). One trim returns them.
        release_free_memory()
    return model


def bert_logits(
    model,
    tokens: torch.Tensor,
    padding_mask: torch.Tensor,
    tokentype_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """MLM logits ``[b, s, vocab_size]`` (gathered over TP, padding rows dropped) and the binary
    head's logits ``[b, 2]`` (None without a binary head)."""
    cfg = _unwrap(model).model_config
    if cfg.num_tokentypes == 0:
        tokentype_ids = None
    elif tokentype_ids is None:
        tokentype_ids = torch.zeros_like(tokens)
    logits, binary_logits = model(tokens, padding_mask, tokentype_ids=tokentype_ids)
    return gather_vocab(logits)[..., : cfg.vocab_size], binary_logits


def bert_loss(model, batch: Dict[str, torch.Tensor]):
    """Loss for a batch from ``pretrain.data`` BERT datasets.

    Returns ``(loss, parts)`` with ``loss = mlm (+ sentence order)`` and ``parts`` a dict holding
    the detached ``mlm`` and ``sop`` (when the binary head is on) terms.
    """
    cfg = _unwrap(model).model_config
    types = batch["types"] if cfg.num_tokentypes > 0 else None
    per_token, binary_logits = model(
        batch["text"], batch["padding_mask"], tokentype_ids=types, lm_labels=batch["labels"]
    )
    mlm = masked_mean(per_token, batch["loss_mask"])
    parts = {"mlm": mlm.detach()}
    loss = mlm
    if binary_logits is not None:
        sop = F.cross_entropy(binary_logits.float(), batch["is_random"].long())
        parts["sop"] = sop.detach()
        loss = loss + sop
    return loss, parts


def _unwrap(model):
    while not hasattr(model, "model_config") and hasattr(model, "module"):
        model = model.module
    return model
