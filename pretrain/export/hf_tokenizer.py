"""The export of a run whose tokenizer already is a Hugging Face one (GPT-2 BPE vocab.json +
merges.txt, or a saved tokenizer directory; ``pretrain.data.tokenizer.HFTokenizer``).

The tokenizer is written with transformers' ``save_pretrained`` (ids unchanged), with the same
conventions as the sentencepiece export (``pretrain/export/tokenizer.py``):

- bos is the end-of-document token the model was trained with (the tokenizer's eos: GPT-2's
  ``<|endoftext|>``). The corpus has documents delimited by it and no other start token, and
  lm-eval's ``hf`` model prefixes an empty context (a rolling-perplexity window) with the
  tokenizer's bos, so the stock lm_eval CLI needs no ``prefix_token_id`` and scores what
  ``tools/eval_zeroshot.py --checkpoint`` scores.
- pad is the tokenizer's pad, or eos when it has none (GPT-2 has none).
- ``split_special_tokens=True``: a literal "<|endoftext|>" in text is tokenized as text, as when
  the corpus was preprocessed.

The written files are loaded back with ``AutoTokenizer`` and must encode probe strings (and
held-out text) to the ids the run's tokenizer gives; otherwise the export is refused.
"""
from __future__ import annotations

import copy
from typing import Dict

from pretrain.data.tokenizer import HFTokenizer, load_tokenizer
from pretrain.errors import UserError

from .errors import ExportError
from .tokenizer import PROBE_TEXTS, compare_encodings, heldout_sample

# on top of the sentencepiece probes: GPT-2's special token as literal text, byte-level edge cases
HF_PROBE_TEXTS = ["a literal <|endoftext|> in text", "<|endoftext|>", "\u00a0non-breaking\u2009thin",
                  "zero\u200bwidth", "mixed 123abc ABC\tx"]


def is_hf_tokenizer(path: str) -> bool:
    """Whether the run's tokenizer at ``path`` is a Hugging Face one (not a sentencepiece model)."""
    try:
        return isinstance(load_tokenizer(path), HFTokenizer)
    except UserError as e:
        raise ExportError(str(e)) from None


def special_ids(tok) -> Dict[str, int]:
    """bos/eos/pad ids of an export with tokenizer ``tok`` (this project's wrapper)."""
    try:
        pad = tok.pad
    except AttributeError:  # no pad token: eos, as the export's tokenizer will name it
        pad = tok.eos
    return {"bos_token_id": tok.eos, "eos_token_id": tok.eos, "pad_token_id": pad}


def export_tokenizer(source: HFTokenizer, model_max_length: int):
    """A copy of ``source``'s transformers tokenizer with the export's special tokens."""
    hf = copy.deepcopy(source.hf_tokenizer)
    eos = hf.eos_token
    hf.bos_token = eos
    if hf.pad_token is None:
        hf.pad_token = eos
    hf.model_max_length = model_max_length
    hf.split_special_tokens = True
    hf.init_kwargs["split_special_tokens"] = True
    return hf


def save_hf_tokenizer(path: str, out_dir: str, model_max_length: int, verify: bool = True) -> dict:
    """Write the run's HF tokenizer at ``path`` into ``out_dir`` (save_pretrained); load the
    written files back and verify their ids and special tokens first."""
    from transformers import AutoTokenizer

    source = load_tokenizer(path)
    export_tokenizer(source, model_max_length).save_pretrained(out_dir)
    written = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = special_ids(source)
    got = {"bos_token_id": written.bos_token_id, "eos_token_id": written.eos_token_id,
           "pad_token_id": written.pad_token_id}
    if got != ids or len(written) != source.vocab_size:
        raise ExportError(f"written tokenizer in {out_dir}: special ids {got} / {len(written)} tokens, "
                          f"expected {ids} / {source.vocab_size}")
    n = 0
    if verify:
        texts = list(PROBE_TEXTS) + HF_PROBE_TEXTS + heldout_sample(200_000)
        n = compare_encodings(written, source, path, texts)
    return {"tokens_compared": n, "vocab_size": source.vocab_size, "type": "huggingface", **ids}
