"""Pure weight mappings from our megatron-core models to transformers' classes.

- GPT  -> ``GPT2LMHeadModel``
- BERT -> ``MegatronBertForPreTraining`` (its ``bert.*`` / ``cls.predictions.*`` part loads into
  ``MegatronBertForMaskedLM`` as is).

Both take a *full* (TP=1, or gathered) state dict and return tensors keyed by HF names, plus the
HF config fields that make the two models compute the same function. No transformers import here:
an exporter builds the HF objects, saves them and compares logits.

The one non-trivial piece is the fused QKV projection. megatron-core stores ``linear_qkv`` rows
grouped per head: ``[head0: q k v][head1: q k v]...`` (so a contiguous TP split keeps whole heads),
while HF keeps ``[all q][all k][all v]``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from pretrain.models.config import BertConfig, GPTConfig


def split_qkv(t: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split megatron's per-head interleaved QKV weight [3H, H] (or bias [3H]) into q, k, v."""
    rest = t.shape[1:]
    grouped = t.reshape(num_heads, 3, t.shape[0] // (3 * num_heads), *rest)
    q, k, v = (grouped[:, i].reshape(-1, *rest) for i in range(3))
    return q, k, v


def _drop_extra_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # megatron linear layers add `_extra_state` entries (TE/fp8 bookkeeping, None here).
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def gpt_to_hf(sd: Dict[str, torch.Tensor], cfg: GPTConfig):
    """Map a GPT state dict to ``GPT2LMHeadModel`` names. Returns ``(hf_state_dict, config)``.

    Conv1D layers in GPT-2 store weights as [in, out], hence the transposes. Rows of the padded
    vocabulary are dropped.
    """
    sd = _drop_extra_state(sd)
    out = {
        "transformer.wte.weight": sd["embedding.word_embeddings.weight"][: cfg.vocab_size],
        "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["decoder.final_layernorm.bias"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        qkv_w = torch.cat(split_qkv(sd[src + "self_attention.linear_qkv.weight"], cfg.num_attention_heads))
        qkv_b = torch.cat(split_qkv(sd[src + "self_attention.linear_qkv.bias"], cfg.num_attention_heads))
        out.update({
            dst + "ln_1.weight": sd[src + "input_layernorm.weight"],
            dst + "ln_1.bias": sd[src + "input_layernorm.bias"],
            dst + "attn.c_attn.weight": qkv_w.t(),
            dst + "attn.c_attn.bias": qkv_b,
            dst + "attn.c_proj.weight": sd[src + "self_attention.linear_proj.weight"].t(),
            dst + "attn.c_proj.bias": sd[src + "self_attention.linear_proj.bias"],
            dst + "ln_2.weight": sd[src + "pre_mlp_layernorm.weight"],
            dst + "ln_2.bias": sd[src + "pre_mlp_layernorm.bias"],
            dst + "mlp.c_fc.weight": sd[src + "mlp.linear_fc1.weight"].t(),
            dst + "mlp.c_fc.bias": sd[src + "mlp.linear_fc1.bias"],
            dst + "mlp.c_proj.weight": sd[src + "mlp.linear_fc2.weight"].t(),
            dst + "mlp.c_proj.bias": sd[src + "mlp.linear_fc2.bias"],
        })
    out["lm_head.weight"] = out["transformer.wte.weight"]
    out = {k: v.contiguous() for k, v in out.items()}
    config = dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_length,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.ffn_hidden_size,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.layernorm_epsilon,
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=True,
    )
    return out, config


def bert_to_hf(sd: Dict[str, torch.Tensor], cfg: BertConfig):
    """Map a BERT state dict to ``MegatronBertForPreTraining`` names.

    Returns ``(hf_state_dict, config)``. Without a binary head the pooler / sentence classifier
    are absent (HF initializes them) and token-type embeddings are zeros (type 0 adds nothing).
    """
    sd = _drop_extra_state(sd)
    v = cfg.vocab_size
    word = sd["embedding.word_embeddings.weight"][:v]
    out = {
        "bert.embeddings.word_embeddings.weight": word,
        "bert.embeddings.position_embeddings.weight": sd["embedding.position_embeddings.weight"],
        "bert.encoder.ln.weight": sd["encoder.final_layernorm.weight"],
        "bert.encoder.ln.bias": sd["encoder.final_layernorm.bias"],
        "cls.predictions.transform.dense.weight": sd["lm_head.dense.weight"],
        "cls.predictions.transform.dense.bias": sd["lm_head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["lm_head.layer_norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["lm_head.layer_norm.bias"],
        "cls.predictions.decoder.weight": word,
        "cls.predictions.bias": sd["output_layer.bias"][:v],
        "cls.predictions.decoder.bias": sd["output_layer.bias"][:v],
    }
    if "embedding.tokentype_embeddings.weight" in sd:
        out["bert.embeddings.token_type_embeddings.weight"] = sd["embedding.tokentype_embeddings.weight"]
    else:
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(2, cfg.hidden_size)
    if cfg.add_binary_head:
        out.update({
            "bert.pooler.dense.weight": sd["pooler.dense.weight"],
            "bert.pooler.dense.bias": sd["pooler.dense.bias"],
            "cls.seq_relationship.weight": sd["binary_head.weight"],
            "cls.seq_relationship.bias": sd["binary_head.bias"],
        })
    for i in range(cfg.num_layers):
        src, dst = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        q_w, k_w, v_w = split_qkv(sd[src + "self_attention.linear_qkv.weight"], cfg.num_attention_heads)
        q_b, k_b, v_b = split_qkv(sd[src + "self_attention.linear_qkv.bias"], cfg.num_attention_heads)
        out.update({
            dst + "attention.ln.weight": sd[src + "input_layernorm.weight"],
            dst + "attention.ln.bias": sd[src + "input_layernorm.bias"],
            dst + "attention.self.query.weight": q_w,
            dst + "attention.self.query.bias": q_b,
            dst + "attention.self.key.weight": k_w,
            dst + "attention.self.key.bias": k_b,
            dst + "attention.self.value.weight": v_w,
            dst + "attention.self.value.bias": v_b,
            dst + "attention.output.dense.weight": sd[src + "self_attention.linear_proj.weight"],
            dst + "attention.output.dense.bias": sd[src + "self_attention.linear_proj.bias"],
            dst + "ln.weight": sd[src + "pre_mlp_layernorm.weight"],
            dst + "ln.bias": sd[src + "pre_mlp_layernorm.bias"],
            dst + "intermediate.dense.weight": sd[src + "mlp.linear_fc1.weight"],
            dst + "intermediate.dense.bias": sd[src + "mlp.linear_fc1.bias"],
            dst + "output.dense.weight": sd[src + "mlp.linear_fc2.weight"],
            dst + "output.dense.bias": sd[src + "mlp.linear_fc2.bias"],
        })
    out = {k: t.contiguous() for k, t in out.items()}
    config = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        hidden_act="gelu",
        max_position_embeddings=cfg.seq_length,
        type_vocab_size=2,
        layer_norm_eps=cfg.layernorm_epsilon,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_method_std,
        tie_word_embeddings=True,
    )
    return out, config
