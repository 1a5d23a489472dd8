"""GPT and BERT datasets from megatron-core, over one or a weighted blend of indexed prefixes.

megatron-core does the real work (document shuffling, sample packing, blending, cached index
files); this module turns a readable call into its configs and checks inputs first:

    train, valid, test = build_gpt_datasets(
        ["0.7", "data/a_text_document", "0.3", "data/b_text_document"],
        tokenizer, seq_length=256, num_samples=(10_000, 500, 500), split="98,1,1")

``blend`` is a prefix, a list of prefixes (weighted by size) or Megatron's
``[w1, prefix1, w2, prefix2, ...]``. ``split`` divides each prefix's *documents* into
train/valid/test. ``num_samples`` is how many samples each split must provide (megatron builds
as many epochs as needed); ``None`` for a split means one epoch (only without explicit weights).
Index files are cached in ``cache_dir`` (default: megatron's ``<data dir>/cache``) and reused
when everything that shapes them is unchanged.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

from pretrain.data.indexed import prefix_exists, read_metadata
from pretrain.data.readers import DataError

Blend = Union[str, Sequence[Union[str, float]]]
Sizes = Tuple[Optional[int], Optional[int], Optional[int]]


def parse_blend(blend: Blend) -> Tuple[List[str], Optional[List[float]]]:
    """``"p"`` / ``["p1", "p2"]`` / ``["0.7", "p1", "0.3", "p2"]`` -> (prefixes, weights|None)."""
    if isinstance(blend, str):
        blend = blend.split()
    items = list(blend)
    if not items:
        raise DataError("empty data blend")

    def is_number(x) -> bool:
        try:
            float(x)
        except (TypeError, ValueError):
            return False
        return True

    if is_number(items[0]):
        if len(items) % 2:
            raise DataError(f"weighted blend needs weight/prefix pairs, got {items}")
        weights = [float(w) for w in items[0::2]]
        prefixes = [str(p) for p in items[1::2]]
        if any(is_number(p) for p in prefixes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"bad weighted blend {items}")
        return prefixes, weights
    return [str(p) for p in items], None


def _check_prefixes(prefixes: Sequence[str], tokenizer) -> None:
    for prefix in prefixes:
        if not prefix_exists(prefix):
            raise DataError(f"{prefix}: no .bin/.idx files with this prefix (run tools/preprocess_data.py)")
        meta = read_metadata(prefix)
        # Data from other tools (e.g. Megatron-LM) has no sidecar: nothing to compare then.
        if meta is not None and meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
            raise DataError(
                f"{prefix}: tokenized with a different tokenizer ({meta.get('tokenizer_model')}, "
                f"sha256 {meta['tokenizer_sha256'][:12]}) than {os.path.basename(tokenizer.model_path)} "
                f"(sha256 {tokenizer.sha256[:12]})"
            )


def _common_config(blend, tokenizer, seq_length, split, seed, cache_dir):
    prefixes, weights = parse_blend(blend)
    _check_prefixes(prefixes, tokenizer)
    return dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
    ), weights


def _check_sizes(num_samples: Sizes, weights) -> list:
    sizes = list(num_samples)
    if len(sizes) != 3:
        raise DataError(f"num_samples needs (train, valid, test), got {num_samples}")
    if weights is not None and any(s is None for s in sizes):
        raise DataError("a weighted blend needs a sample count for every split (no None)")
    return sizes


def _build(cls, sizes, config):
    # megatron's blended/BERT datasets call torch.distributed.get_rank(): make sure a group
    # exists (a private 1-process group when not launched distributed).
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from pretrain.models.parallel import ensure_process_group

    ensure_process_group()
    # Every rank reads data (tensor-parallel ranks need the same batches): build on all of them.
    # megatron builds cache files on rank 0 first, the others then load them.
    return tuple(BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build())


def build_gpt_datasets(
    blend: Blend,
    tokenizer,
    seq_length: int,
    num_samples: Sizes = (None, None, None),
    split: str = "98,1,1",
    seed: int = 1234,
    cache_dir: Optional[str] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
):
    """(train, valid, test) ``GPTDataset``s (a split is None when its share is 0).

    Samples are dicts of ``tokens``, ``labels`` (tokens shifted by one), ``loss_mask`` and
    ``position_ids``; ``attention_mask`` only with ``reset_attention_mask`` (per-document
    causal masks), otherwise the model applies plain causal attention without a mask tensor.
    """
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    common, weights = _common_config(blend, tokenizer, seq_length, split, seed, cache_dir)
    config = GPTDatasetConfig(
        **common,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=reset_attention_mask,
    )
    return _build(GPTDataset, _check_sizes(num_samples, weights), config)


def build_bert_datasets(
    blend: Blend,
    tokenizer,
    seq_length: int,
    num_samples: Sizes = (None, None, None),
    split: str = "98,1,1",
    seed: int = 1234,
    cache_dir: Optional[str] = None,
    binary_head: bool = True,
    masking_probability: float = 0.15,
    short_sequence_probability: float = 0.1,
    masking_max_ngram: int = 3,
    whole_word_masking: bool = True,
):
    """(train, valid, test) ``BERTMaskedWordPieceDataset``s over sentence-split prefixes.

    Samples: ``text`` (token ids with [CLS]/[SEP] and masks applied), ``types`` (segment ids),
    ``labels`` (original ids at masked positions, -1 elsewhere), ``loss_mask``, ``padding_mask``
    (1 = real token), ``is_random`` (sentence-order label) and ``truncated``. With
    ``binary_head`` every sample holds two segments, so documents need at least two sentences.
    Defaults are Megatron-LM's BERT defaults.
    """
    from megatron.core.datasets.bert_dataset import (
        BERTMaskedWordPieceDataset,
        BERTMaskedWordPieceDatasetConfig,
    )

    if not tokenizer.has_bert_tokens:
        raise DataError(f"{tokenizer.model_path}: BERT needs a tokenizer with [CLS]/[SEP]/[MASK]")
    common, weights = _common_config(blend, tokenizer, seq_length, split, seed, cache_dir)
    config = BERTMaskedWordPieceDatasetConfig(
        **common,
        masking_probability=masking_probability,
        short_sequence_probability=short_sequence_probability,
        masking_max_ngram=masking_max_ngram,
        masking_do_full_word=whole_word_masking,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        classification_head=binary_head,
    )
    return _build(BERTMaskedWordPieceDataset, _check_sizes(num_samples, weights), config)
