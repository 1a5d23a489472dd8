"""Megatron-style GPT and BERT built on megatron-core.

    from pretrain.models import init_model_parallel, get_preset, build_gpt, gpt_loss
    init_model_parallel(tensor_parallel_size=1)            # 1-process gloo group on CPU
    model = build_gpt(get_preset("demo", "gpt", vocab_size=tokenizer.vocab_size))
    loss, n_tokens = gpt_loss(model, batch)               # batch from pretrain.data
"""

from pretrain.models.bert import MegatronBert, bert_logits, bert_loss, build_bert
from pretrain.models.config import (
    PRESETS,
    BertConfig,
    GPTConfig,
    config_from_dict,
    get_preset,
    preset_names,
)
from pretrain.models.gpt import MegatronGPT, build_gpt, gpt_logits, gpt_loss, position_ids_for
from pretrain.models.parallel import (
    destroy_model_parallel,
    ensure_process_group,
    init_model_parallel,
    tensor_parallel_rank,
    tensor_parallel_size,
)


def build_model(cfg, seed=1234):
    """``build_gpt`` or ``build_bert`` according to the config's type."""
    return build_gpt(cfg, seed) if isinstance(cfg, GPTConfig) else build_bert(cfg, seed)


def count_parameters(model) -> int:
    """Parameters held by this rank (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BertConfig", "GPTConfig", "MegatronBert", "MegatronGPT", "PRESETS",
    "bert_logits", "bert_loss", "build_bert", "build_gpt", "build_model", "config_from_dict",
    "count_parameters", "destroy_model_parallel", "ensure_process_group", "get_preset",
    "gpt_logits", "gpt_loss", "init_model_parallel", "position_ids_for", "preset_names",
    "tensor_parallel_rank", "tensor_parallel_size",
]
