"""GPT and BERT pretraining tasks: which datasets to build and which loss to use."""
from __future__ import annotations

from pretrain.dist import barrier, dist_rank
from .trainer import TaskSpec


def _blend(cfg, key: str) -> list[str]:
    """The configured blend, or the bundled corpus (prepared once, by rank 0 first)."""
    if cfg.data.blend:
        return list(cfg.data.blend)
    from pretrain.data import bundled

    if dist_rank() == 0:
        bundled.prepare(cfg.data.cache_dir, tokenizer_model=cfg.data.tokenizer)
    barrier()
    return [bundled.prepare(cfg.data.cache_dir, tokenizer_model=cfg.data.tokenizer)[key]]


def _with_eval_seed(cfg, build):
    """(train, valid, test) from ``build(seed)``: training samples in train.seed's order, the
    validation and test samples in data.eval_seed's (when it is set and differs)."""
    train, valid, test = build(cfg.train.seed)
    if cfg.data.eval_seed is not None and cfg.data.eval_seed != cfg.train.seed:
        _, valid, test = build(cfg.data.eval_seed)
    return train, valid, test


def _gpt_datasets(cfg, tokenizer, seq_length, num_samples):
    from pretrain.data import build_gpt_datasets

    return _with_eval_seed(cfg, lambda seed: build_gpt_datasets(
        _blend(cfg, "gpt"), tokenizer, seq_length, num_samples, split=cfg.data.split,
        seed=seed, cache_dir=f"{cfg.data.cache_dir}/index_cache",
    ))


def _bert_datasets(cfg, tokenizer, seq_length, num_samples):
    from pretrain.data import build_bert_datasets

    binary_head = cfg.model.overrides.get("add_binary_head", True)
    return _with_eval_seed(cfg, lambda seed: build_bert_datasets(
        _blend(cfg, "bert"), tokenizer, seq_length, num_samples, split=cfg.data.split,
        seed=seed, cache_dir=f"{cfg.data.cache_dir}/index_cache", binary_head=binary_head,
    ))


def _gpt_loss(model, batch):
    from pretrain.models import gpt_loss

    return gpt_loss(model, batch)


def _bert_loss(model, batch):
    from pretrain.models import bert_loss

    return bert_loss(model, batch)


GPT = TaskSpec(kind="gpt", build_datasets=_gpt_datasets, loss_fn=_gpt_loss, tokens_key="tokens")
BERT = TaskSpec(kind="bert", build_datasets=_bert_datasets, loss_fn=_bert_loss, tokens_key="text")
TASKS = {"gpt": GPT, "bert": BERT}
