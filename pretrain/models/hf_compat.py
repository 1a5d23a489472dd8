"""Our megatron-core models <-> transformers' classes, both directions in one place.

- GPT  <-> ``GPT2LMHeadModel`` (``gpt_to_hf`` / ``hf_to_gpt``, ``gpt_config_from_hf``)
- BERT  -> ``MegatronBertForPreTraining`` (its ``bert.*`` / ``cls.predictions.*`` part loads into
  ``MegatronBertForMaskedLM`` as is).

The mappings are pure: a *full* (TP=1, or gathered) state dict in, tensors keyed by the other
side's names out, plus the config fields that make the two models compute the same function.
Only ``hf_classes`` and ``load_hf_model`` touch transformers (imported when called), so export,
``model.init_from`` and the tests read an HF directory the same way.

The one non-trivial piece is the fused QKV projection. megatron-core stores ``linear_qkv`` rows
grouped per head: ``[head0: q k v][head1: q k v]...`` (so a contiguous TP split keeps whole heads),
while HF keeps ``[all q][all k][all v]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from pretrain.errors import UserError
from pretrain.models.config import BertConfig, GPTConfig


class HFCompatError(UserError, ValueError):
    """An HF directory that cannot be read, or a model ours cannot represent exactly."""


class IncompleteHFWeights(HFCompatError):
    """An HF directory whose weights do not fill its model class (export calls that a failed
    validation, not an unreadable input)."""


def split_qkv(t: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split megatron's per-head interleaved QKV weight [3H, H] (or bias [3H]) into q, k, v."""
    rest = t.shape[1:]
    grouped = t.reshape(num_heads, 3, t.shape[0] // (3 * num_heads), *rest)
    q, k, v = (grouped[:, i].reshape(-1, *rest) for i in range(3))
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: [all q][all k][all v] -> per-head [q k v] groups."""
    rest = q.shape[1:]
    parts = [t.reshape(num_heads, t.shape[0] // num_heads, *rest) for t in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *rest)


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


# -- HF -> ours ---------------------------------------------------------------------------------

def gpt_config_from_hf(hf_cfg) -> GPTConfig:
    """Our ``GPTConfig`` for a ``GPT2Config`` (no dropout, SDPA attention: the converted model is
    compared with the HF one); refuses what our GPT cannot compute exactly."""
    act = getattr(hf_cfg, "activation_function", "gelu_new")
    problems = []
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={act!r} (ours is tanh-GeLU)")
    if not getattr(hf_cfg, "tie_word_embeddings", True):
        problems.append("untied output embeddings")
    if getattr(hf_cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(hf_cfg, "scale_attn_weights", True):
        problems.append("non-standard attention scaling")
    if problems:
        raise HFCompatError("this GPT2LMHeadModel cannot be represented exactly: " + "; ".join(problems))
    return GPTConfig(num_layers=hf_cfg.n_layer, hidden_size=hf_cfg.n_embd, num_attention_heads=hf_cfg.n_head,
                     seq_length=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size,
                     ffn_hidden_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd, layernorm_epsilon=hf_cfg.layer_norm_epsilon,
                     hidden_dropout=0.0, attention_dropout=0.0, init_method_std=hf_cfg.initializer_range,
                     attention_backend="sdpa")


def hf_to_gpt(hf_sd: Dict[str, torch.Tensor], cfg: GPTConfig) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`gpt_to_hf`: GPT2LMHeadModel weights -> our names (padded vocab rows are
    zeros; they never reach the logits)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in hf_sd.items()}
    wte = sd["wte.weight"]
    word = torch.zeros(cfg.padded_vocab_size, cfg.hidden_size, dtype=wte.dtype)
    word[: cfg.vocab_size] = wte
    out = {
        "embedding.word_embeddings.weight": word,
        "embedding.position_embeddings.weight": sd["wpe.weight"],
        "decoder.final_layernorm.weight": sd["ln_f.weight"],
        "decoder.final_layernorm.bias": sd["ln_f.bias"],
    }
    h, n = cfg.hidden_size, cfg.num_attention_heads
    for i in range(cfg.num_layers):
        s, d = f"h.{i}.", f"decoder.layers.{i}."
        w = sd[s + "attn.c_attn.weight"].t()
        b = sd[s + "attn.c_attn.bias"]
        out.update({
            d + "input_layernorm.weight": sd[s + "ln_1.weight"],
            d + "input_layernorm.bias": sd[s + "ln_1.bias"],
            d + "self_attention.linear_qkv.weight": merge_qkv(w[:h], w[h:2 * h], w[2 * h:], n),
            d + "self_attention.linear_qkv.bias": merge_qkv(b[:h], b[h:2 * h], b[2 * h:], n),
            d + "self_attention.linear_proj.weight": sd[s + "attn.c_proj.weight"].t(),
            d + "self_attention.linear_proj.bias": sd[s + "attn.c_proj.bias"],
            d + "pre_mlp_layernorm.weight": sd[s + "ln_2.weight"],
            d + "pre_mlp_layernorm.bias": sd[s + "ln_2.bias"],
            d + "mlp.linear_fc1.weight": sd[s + "mlp.c_fc.weight"].t(),
            d + "mlp.linear_fc1.bias": sd[s + "mlp.c_fc.bias"],
            d + "mlp.linear_fc2.weight": sd[s + "mlp.c_proj.weight"].t(),
            d + "mlp.linear_fc2.bias": sd[s + "mlp.c_proj.bias"],
        })
    return {k: v.float().contiguous().clone() for k, v in out.items()}


# -- reading an HF directory ----------------------------------------------------------------------

def hf_classes(name: str):
    """``(config class, model class)`` of transformers for an architecture name we map to."""
    import transformers

    cfg_cls = {"GPT2LMHeadModel": transformers.GPT2Config,
               "MegatronBertForMaskedLM": transformers.MegatronBertConfig}[name]
    return cfg_cls, getattr(transformers, name)


def hf_architecture(path: str) -> Optional[str]:
    """The architecture named by an HF model directory (config.json + model.safetensors), else None."""
    p = Path(path)
    if not ((p / "config.json").is_file() and (p / "model.safetensors").is_file()):
        return None
    try:
        return json.loads((p / "config.json").read_text()).get("architectures", [None])[0]
    except (OSError, json.JSONDecodeError):
        return None


def load_hf_model(path: str, cls_name: Optional[str] = None):
    """An HF model directory loaded with transformers, fp32, eval mode (safetensors only: never
    pickles); every weight of the class must come from the files."""
    cfg_path = Path(path) / "config.json"
    if cls_name is None:
        try:
            cls_name = json.loads(cfg_path.read_text())["architectures"][0]
        except (OSError, json.JSONDecodeError, KeyError, IndexError) as e:
            raise HFCompatError(f"{cfg_path}: cannot read the export's config: {e}") from None
    _, model_cls = hf_classes(cls_name)
    if not (Path(path) / "model.safetensors").is_file():
        raise HFCompatError(f"{path}: no model.safetensors")
    try:
        model, info = model_cls.from_pretrained(path, use_safetensors=True, dtype=torch.float32,
                                                output_loading_info=True, local_files_only=True)
    except Exception as e:
        raise HFCompatError(f"cannot load the export {path} with transformers (corrupt or truncated?): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise IncompleteHFWeights(f"{path}: export does not fill {cls_name}: missing {missing[:5]}, "
                                  f"unexpected {info.get('unexpected_keys', [])[:5]}, "
                                  f"mismatched {info.get('mismatched_keys', [])[:5]}")
    return model.eval()
