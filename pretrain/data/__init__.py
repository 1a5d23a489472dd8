"""Data: tokenizer, Megatron indexed datasets, GPT/BERT datasets, a resumable loader.

    from pretrain.data import load_tokenizer, build_gpt_datasets, build_loader
    tok = load_tokenizer("data/tokenizer/spm_bpe_8k.model")
    train, valid, test = build_gpt_datasets("data/cache/gpt/corpus_text_document", tok,
                                            seq_length=256, num_samples=(4000, 100, 100))
    loader = build_loader(train, micro_batch_size=8, consumed_samples=resume_at)

Names are imported on first use, so tools that only tokenize do not pay for megatron-core.
"""

import importlib

_EXPORTS = {
    "DataError": "readers",
    "iter_documents": "readers",
    "SentencePieceTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "IndexedDatasetWriter": "indexed",
    "preprocess": "preprocess",
    "split_sentences": "preprocess",
    "build_gpt_datasets": "datasets",
    "build_bert_datasets": "datasets",
    "parse_blend": "datasets",
    "ResumableBatchSampler": "loader",
    "build_loader": "loader",
    "bundled": "bundled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pretrain.data' has no attribute {name!r}")
    module = importlib.import_module(f"pretrain.data.{_EXPORTS[name]}")
    return module if name == _EXPORTS[name] else getattr(module, name)
