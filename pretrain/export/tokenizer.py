"""A Hugging Face fast tokenizer built from this project's sentencepiece model, with the same ids.

The sentencepiece model (``pretrain.data.tokenizer``) is BPE with byte fallback, identity
normalization, whitespace kept as is and a "▁" prepended to the text (``add_dummy_prefix``). Its
encoder merges adjacent symbols by the score of the merged piece over the whole (normalized)
string; a ``tokenizers`` BPE whose merges are ranked by the merged piece's id does the same.
Pre-tokenization is not needed: the vocabulary itself holds no piece spanning what sentencepiece
would not join (digits are split, "▁" only starts a piece).

Special tokens (<pad> <unk> <s> </s> [CLS] [SEP] [MASK]) are sentencepiece *control* symbols:
raw text never produces them. The HF tokenizer therefore sets ``split_special_tokens=True`` so a
literal "[SEP]" in text is tokenized as text there too.

``verify_tokenizer`` encodes held-out text (and awkward strings) with both and reports the first
difference; the exporter refuses to write a tokenizer that differs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from pretrain.data.tokenizer import BERT_SPECIAL_TOKENS, SentencePieceTokenizer

from .errors import ExportError

SPACE = "\u2581"

# Strings with the edge cases: leading/trailing/multiple spaces, newlines, tabs, digits, bytes
# outside the vocabulary, literal special-token text.
PROBE_TEXTS = [
    "Hello world", " leading space", "trailing space ", "two  spaces   three", "\n\nnew\nlines\n",
    "tabs\tand\r\nCRLF", "digits 1234567890 and 3.14159", "émigré naïve café", "日本語のテキスト 🙂👍",
    "literal [SEP] and <s> and </s> [MASK]", "", " ", "x", "A" * 50, "-- -- --'\"!?;:",
]


def build_hf_tokenizer(spm_path: str, model_max_length: int = 1024):
    """A ``PreTrainedTokenizerFast`` with the sentencepiece model's vocabulary and ids."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceTokenizer(spm_path)
    proto = _model_proto(spm_path)
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ExportError(f"{spm_path}: only sentencepiece BPE models can be converted (this one is not BPE)")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ExportError(f"{spm_path}: normalization {norm.name!r} is not identity; cannot convert exactly")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = _bpe_merges(vocab)
    bpe = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
              byte_fallback=proto.trainer_spec.byte_fallback)
    tok = Tokenizer(bpe)
    steps = []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(Regex(" "), SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    extra = [t for t in BERT_SPECIAL_TOKENS if sp.has_bert_tokens]
    # bos_token is </s>, as GPT-2's is its end-of-text: the models here are trained on documents
    # delimited by </s> and never see <s>, and lm-eval's hf model prefixes an empty context (a
    # rolling-perplexity window) with the tokenizer's bos, so the export needs no prefix_token_id.
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", unk_token="<unk>", bos_token="</s>", eos_token="</s>",
        additional_special_tokens=["<s>"],
        **({"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"} if extra else {}),
        model_max_length=model_max_length,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        add_prefix_space=None,
    )
    return hf


def _bpe_merges(vocab: dict) -> list:
    """Every way to build a piece from two pieces, ranked by the merged piece's id (lower id =
    higher sentencepiece score = merged first), ties by the parts' ids."""
    ranked = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _model_proto(spm_path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    return proto


def verify_tokenizer(hf, spm_path: str, texts: Optional[Iterable[str]] = None, max_chars: int = 200_000) -> int:
    """Encode ``texts`` (default: the probe strings and up to ``max_chars`` of held-out text) with
    both tokenizers; raise ``ExportError`` at the first difference. Returns the number of tokens
    compared."""
    sp = SentencePieceTokenizer(spm_path)
    n = compare_encodings(hf, sp, spm_path, texts, max_chars)
    if hf.vocab_size != sp.vocab_size or hf.eos_token_id != sp.eos or hf.pad_token_id != sp.pad:
        raise ExportError("HF tokenizer's vocabulary size or special ids differ from sentencepiece's")
    return n


def compare_encodings(hf, source, name: str, texts: Optional[Iterable[str]] = None, max_chars: int = 200_000) -> int:
    """``hf`` (a transformers tokenizer) encodes and decodes every text as ``source`` (this
    project's tokenizer wrapper: ``tokenize`` / ``detokenize``) does; ``ExportError`` at the first
    difference. Default texts: the probe strings and up to ``max_chars`` of held-out text."""
    if texts is None:
        texts = list(PROBE_TEXTS) + list(heldout_sample(max_chars))
    n = 0
    for text in texts:
        a = source.tokenize(text)
        b = hf.encode(text, add_special_tokens=False)
        if a != b:
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ExportError(
                f"HF tokenizer differs from {name} on {text[:60]!r}: at token {i}: "
                f"source {a[i:i + 5]} vs HF {b[i:i + 5]}"
            )
        if hf.decode(b) != source.detokenize(a):
            raise ExportError(f"HF tokenizer decodes {text[:60]!r} differently from {name}")
        n += len(a)
    return n


def heldout_sample(max_chars: int) -> List[str]:
    """Paragraph-sized pieces of the held-out documents (bundled corpus), up to max_chars."""
    try:
        from pretrain.data import bundled

        docs = bundled.corpus_documents("heldout")
    except Exception:  # no bundled corpus (a user's own tokenizer and data): probes only
        return []
    out, total = [], 0
    for doc in docs:
        for para in doc["text"].split("\n\n"):
            if total >= max_chars:
                return out
            out.append(para)
            total += len(para)
    return out


def save_tokenizer(spm_path: str, out_dir: str, model_max_length: int, verify: bool = True) -> dict:
    """Write tokenizer.json / tokenizer_config.json / special_tokens_map.json and a copy of the
    sentencepiece model (tokenizer.model) into ``out_dir``; verify ids first."""
    hf = build_hf_tokenizer(spm_path, model_max_length)
    n = verify_tokenizer(hf, spm_path) if verify else 0
    hf.save_pretrained(out_dir)
    shutil.copyfile(spm_path, os.path.join(out_dir, "tokenizer.model"))
    return {"tokens_compared": n, "vocab_size": hf.vocab_size}
