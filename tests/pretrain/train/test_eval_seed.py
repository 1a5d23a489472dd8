"""data.eval_seed: runs of different train.seed validate on the same samples when it is set,
and on their own seed's sample order when it is not (the old behaviour); training samples
always follow train.seed."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def _datasets(*overrides):
    from pretrain.config import load_run_config
    from pretrain.data import load_tokenizer
    from pretrain.train.tasks import GPT

    cfg = load_run_config(str(ROOT / "configs/gpt_tiny.yaml"),
                          [f"data.cache_dir={ROOT / 'data/cache'}", f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}",
                           *overrides])
    tok = load_tokenizer(cfg.data.tokenizer)
    return GPT.build_datasets(cfg, tok, 64, (64, 32, 0))


def _first(ds, n=8):
    return torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in range(n)])


def test_eval_seed_fixes_the_validation_samples_across_training_seeds():
    train1, valid1, _ = _datasets("train.seed=1", "data.eval_seed=7")
    train2, valid2, _ = _datasets("train.seed=2", "data.eval_seed=7")
    assert torch.equal(_first(valid1), _first(valid2))
    assert not torch.equal(_first(train1), _first(train2))  # training order still follows train.seed


def test_without_eval_seed_the_validation_order_follows_the_training_seed():
    _, valid1, _ = _datasets("train.seed=1")
    _, valid2, _ = _datasets("train.seed=2")
    _, same, _ = _datasets("train.seed=1", "data.eval_seed=1")
    assert not torch.equal(_first(valid1), _first(valid2))
    assert torch.equal(_first(valid1), _first(same))
