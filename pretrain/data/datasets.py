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

Inputs megatron would fail on obscurely are refused first with a one-line ``DataError``: token
ids the tokenizer does not have (an IndexError at the first forward otherwise), and a split of
some prefix too small for the samples asked of it (megatron would loop forever building its
epochs). A split asked for 0 samples is not checked; if megatron could not even build it empty,
it is returned as None.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from pretrain.data.indexed import max_token_id, prefix_exists, read_index, read_metadata
from pretrain.data.readers import DataError

SPLIT_NAMES = ("train", "valid", "test")
# megatron's BERT sample builder skips a document holding a sentence longer than this (helpers.cpp).
_BERT_LONG_SENTENCE = 512

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


def _check_prefixes(prefixes: Sequence[str], tokenizer, cache_dir: Optional[str]) -> None:
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
    for prefix, top in _max_token_ids(prefixes, cache_dir).items():
        if top is not None and top >= tokenizer.vocab_size:
            raise DataError(
                f"{prefix}: token id {top} found, but the tokenizer "
                f"{os.path.basename(tokenizer.model_path)} has only {tokenizer.vocab_size} ids "
                f"(0..{tokenizer.vocab_size - 1}); re-tokenize the data with this tokenizer"
            )


def _max_token_ids(prefixes: Sequence[str], cache_dir: Optional[str]) -> dict:
    import torch.distributed as dist

    # Under a launcher rank 0 scans the files nobody scanned yet while the other ranks wait for
    # its cache, instead of every rank reading the same files at once. Whether to wait depends
    # only on the sidecars, which every rank sees alike; the cache's state would race.
    unknown = [p for p in prefixes if "max_token_id" not in (read_metadata(p) or {})]
    if (unknown and cache_dir is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        if dist.get_rank() == 0:
            try:
                for prefix in unknown:
                    max_token_id(prefix, cache_dir)
            finally:
                dist.barrier()
        else:
            dist.barrier()
    return {prefix: max_token_id(prefix, cache_dir) for prefix in prefixes}


def _common_config(blend, tokenizer, seq_length, split, seed, cache_dir):
    prefixes, weights = parse_blend(blend)
    _check_prefixes(prefixes, tokenizer, cache_dir)
    return dict(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
    ), prefixes, weights


def _check_sizes(num_samples: Sizes, weights) -> list:
    sizes = list(num_samples)
    if len(sizes) != 3:
        raise DataError(f"num_samples needs (train, valid, test), got {num_samples}")
    if weights is not None and any(s is None for s in sizes):
        raise DataError("a weighted blend needs a sample count for every split (no None)")
    return sizes


def _samples_per_prefix(prefixes, weights, sizes, config) -> list:
    """What megatron's builder asks of each prefix's split datasets (None = one epoch)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        _get_size_per_split_per_dataset,
    )
    from megatron.core.datasets.utils import normalize

    if weights is None:
        return [list(sizes)] if len(prefixes) == 1 else [[None] * 3 for _ in prefixes]
    return _get_size_per_split_per_dataset(
        normalize(weights), sizes, surplus=config.mid_level_dataset_surplus)


def _check_splits(kind: str, prefixes, weights, sizes, config) -> None:
    """Refuse (or, when nothing is asked of it, drop) a split megatron cannot build.

    Each prefix's split is the document range megatron itself takes, from the same split
    matrix and rounding (``_build_megatron_dataset_splits``).
    """
    # An unweighted blend weighs its prefixes by their one-epoch sample counts and asserts
    # that each is positive.
    unweighted_blend = weights is None and len(prefixes) > 1
    matrix = list(config.split_matrix)
    for prefix, wanted in zip(prefixes, _samples_per_prefix(prefixes, weights, sizes, config)):
        index = read_index(prefix)
        # GPT splits count sequences (documents in GPT data), BERT splits documents.
        if kind == "gpt":
            total = len(index.sequence_lengths)
        else:
            total = len(index.document_indices) - 1
        for i, bounds in enumerate(matrix):
            if bounds is None:
                continue
            beg = int(round(bounds[0] * float(total)))
            end = int(round(bounds[1] * float(total)))
            if wanted[i] is None:
                demand = "sample" if unweighted_blend else "epoch"
            else:
                demand = "sample" if wanted[i] > 0 else "build"
            problem = (_gpt_split_problem if kind == "gpt" else _bert_split_problem)(
                index, beg, end, demand, config)
            if problem is None:
                continue
            if sizes[i] == 0:
                # Nothing is asked of this split (e.g. the trainer's test split): leaving it out
                # is what the caller would get from a 0 share, without megatron's endless loop.
                matrix[i] = None
                continue
            if wanted[i] is not None:
                asked = f"{wanted[i]} sample(s) are asked of it"
            elif unweighted_blend:
                asked = "an unweighted blend needs at least one sample from each prefix"
            else:
                asked = "one epoch is asked of it"
            if i == 0:
                fix = "use a larger dataset" + (" or a shorter seq_length" if kind == "gpt" else "")
            else:
                fix = ("use a larger dataset or change the split (e.g. data.split=100,0,0 trains "
                       "on all of it, without validation)")
            raise DataError(f"{prefix}: the {SPLIT_NAMES[i]} part of split {config.split!r} has "
                            f"{problem}, but {asked}; {fix}")
    config.split_matrix = matrix


def _gpt_split_problem(index, beg, end, demand, config) -> Optional[str]:
    """``demand``: "epoch" (one epoch, however small), "build" (0 samples), "sample" (>= 1)."""
    if demand == "epoch":
        return None
    tokens = int(index.sequence_lengths[beg:end].sum(dtype=np.int64))
    need = config.sequence_length + int(config.add_extra_token_to_sequence)
    # megatron adds epochs until they hold num_samples * seq_length + 1 tokens: with none at all
    # (even for 0 samples) that never ends; with fewer than one sample it would repeat the same
    # few tokens in every sample.
    if tokens >= need or (demand == "build" and tokens > 0):
        return None
    per_document = len(index.sequence_lengths) == len(index.document_indices) - 1
    unit = "documents" if per_document else "sequences"
    return (f"{end - beg} {unit} and {tokens} tokens, fewer than one sample "
            f"({need} tokens for seq_length {config.sequence_length})")


def _bert_split_problem(index, beg, end, demand, config) -> Optional[str]:
    """``demand`` as for GPT."""
    docs = index.document_indices[beg:end + 1]
    # megatron reads the split's last document index, which an empty split does not have.
    if end <= beg:
        return "0 documents"
    if demand != "sample":
        return None
    # megatron's sample builder runs up to 2**31 epochs until it has num_samples: without one
    # usable document that is an endless loop. Usable: enough sentences for a sample (two with
    # the sentence-order head) and, when it has several, none over 512 tokens.
    counts = np.diff(docs)
    lengths = index.sequence_lengths
    min_sentences = 2 if config.classification_head else 1
    nonempty = np.flatnonzero(counts > 0)
    has_long = np.zeros(len(counts), dtype=bool)
    if len(nonempty):
        # Between two non-empty documents' starts lie only the first one's sentences.
        starts = (docs[:-1] - docs[0])[nonempty]
        longest = np.maximum.reduceat(lengths[docs[0]:docs[-1]], starts)
        has_long[nonempty] = longest > _BERT_LONG_SENTENCE
    usable = (counts >= min_sentences) & ~((counts > 1) & has_long)
    if usable.any():
        return None
    tokens = int(lengths[docs[0]:docs[-1]].sum(dtype=np.int64))
    return (f"{end - beg} documents and {tokens} tokens but no document megatron can make a BERT "
            f"sample from (one needs at least {min_sentences} sentences, none longer than "
            f"{_BERT_LONG_SENTENCE} tokens)")


def _build(cls, sizes, config):
    # megatron's blended/BERT datasets call torch.distributed.get_rank(): make sure a group
    # exists (a private 1-process group when not launched distributed).
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from pretrain.dist import ensure_process_group

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

    common, prefixes, weights = _common_config(blend, tokenizer, seq_length, split, seed, cache_dir)
    config = GPTDatasetConfig(
        **common,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=reset_attention_mask,
    )
    sizes = _check_sizes(num_samples, weights)
    _check_splits("gpt", prefixes, weights, sizes, config)
    return _build(GPTDataset, sizes, config)


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
    common, prefixes, weights = _common_config(blend, tokenizer, seq_length, split, seed, cache_dir)
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
    sizes = _check_sizes(num_samples, weights)
    _check_splits("bert", prefixes, weights, sizes, config)
    return _build(BERTMaskedWordPieceDataset, sizes, config)
