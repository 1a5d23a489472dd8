"""Tokenize documents into Megatron indexed datasets (the engine behind tools/preprocess_data.py).

Output naming follows Megatron-LM: ``<output_prefix>_<key>_document`` (one sequence per
document, for GPT) or ``<output_prefix>_<key>_sentence`` (one sequence per sentence, for BERT).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from pretrain.data.indexed import IndexedDatasetWriter, token_dtype
from pretrain.data.readers import DataError, check_inputs, iter_documents
from pretrain.data.tokenizer import load_tokenizer

# --- sentence splitting (BERT) -------------------------------------------------------------------
# NLTK's punkt would need a model download; a rule-based splitter is enough for the sentence-pair
# task: it ends sentences at . ! ? (plus closing quotes/brackets) before whitespace and a capital,
# digit or opening quote, except after common abbreviations and single-letter initials.
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "rev", "capt", "col", "gen",
    "lt", "sgt", "mt", "no", "vol", "ch", "fig", "e.g", "i.e", "viz", "cf", "esq", "messrs",
}
_BOUNDARY = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_CLOSERS = ".!?\"')]\u201d\u2019"


def split_sentences(text: str, keep_newlines: bool = False) -> List[str]:
    """Split a document into sentences; blank lines always end a sentence. Whitespace inside a
    sentence (hard line wraps) is collapsed to single spaces, unless ``keep_newlines``
    (Megatron-LM's --keep-newlines), which keeps the line breaks inside a sentence."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        if keep_newlines:
            paragraph = "\n".join(" ".join(line.split()) for line in paragraph.strip().split("\n"))
        else:
            paragraph = " ".join(paragraph.split())
        start = 0
        for m in _BOUNDARY.finditer(paragraph):
            candidate = paragraph[start:m.end(1)]
            words = candidate.split()
            last = words[-1].rstrip(_CLOSERS).lower() if words else ""
            if m.group(1).startswith(".") and (
                last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())
            ):
                continue
            sentences.append(candidate.strip())
            start = m.end()
        tail = paragraph[start:].strip()
        if tail:
            sentences.append(tail)
    return sentences


# --- per-process encoder (runs in pool workers) --------------------------------------------------
_worker_state: Dict = {}


def _init_worker(tokenizer, split: bool, append_eod: bool, keep_newlines: bool = False) -> None:
    # the tokenizer object arrives pickled (it pickles its files' content or paths)
    _worker_state["tok"] = tokenizer
    _worker_state["split"] = split
    _worker_state["append_eod"] = append_eod
    _worker_state["keep_newlines"] = keep_newlines


def _encode(item: Tuple[str, str]) -> Tuple[str, List[List[int]], int]:
    where, text = item
    tok = _worker_state["tok"]
    pieces = split_sentences(text, _worker_state["keep_newlines"]) if _worker_state["split"] else [text]
    sequences = [ids for ids in (tok.tokenize(p) for p in pieces) if ids]
    if sequences and _worker_state["append_eod"]:
        sequences[-1].append(tok.eod)
    return where, sequences, len(text.encode("utf-8"))


def output_prefix_for(output_prefix: str, key: str, split: bool) -> str:
    return f"{output_prefix}_{key}_{'sentence' if split else 'document'}"


def preprocess(
    inputs: Sequence[str],
    tokenizer_model,
    output_prefix: str,
    json_key: str = "text",
    txt_mode: str = "document",
    append_eod: bool = False,
    split_sentences: bool = False,
    workers: int = 1,
    skip_empty: bool = False,
    progress: bool = True,
    extra_metadata: Optional[Dict] = None,
    keep_newlines: bool = False,
    log_interval: Optional[int] = None,
) -> Dict:
    """Tokenize ``inputs`` into ``<output_prefix>_<key>_{document|sentence}.{bin,idx}``.

    Everything that can be checked up front (inputs exist, tokenizer loads and fits the request,
    output directory) is checked before anything is written; on any error the temporary files
    are removed and existing outputs are left as they were. Returns a summary dict (also written
    to the .meta.json, with ``extra_metadata`` merged in). ``tokenizer_model`` is a path for
    ``load_tokenizer`` or a loaded tokenizer. ``log_interval``: a progress line every that many
    documents (Megatron-LM's --log-interval) instead of the progress bar.
    """
    files = check_inputs(inputs)
    tok = load_tokenizer(tokenizer_model) if isinstance(tokenizer_model, (str, os.PathLike)) else tokenizer_model
    if log_interval is not None and log_interval < 1:
        raise DataError(f"--log-interval must be at least 1, got {log_interval}")
    if split_sentences and not tok.has_bert_tokens:
        raise DataError(
            f"{tok.model_path}: --split-sentences is for BERT, but this tokenizer has no "
            "[CLS]/[SEP]/[MASK]; train one with tools/train_tokenizer.py --bert-special-tokens"
        )
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    prefix = output_prefix_for(output_prefix, json_key, split_sentences)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: output directory is a file")
    os.makedirs(out_dir, exist_ok=True)

    docs = iter_documents(files, text_key=json_key, txt_mode=txt_mode, skip_empty=skip_empty)
    writer = IndexedDatasetWriter(prefix, token_dtype(tok.vocab_size))
    pool = None
    try:
        init_args = (tok, split_sentences, append_eod, keep_newlines)
        if workers == 1:
            _init_worker(*init_args)
            encoded: Iterator = map(_encode, docs)
        else:
            # spawn: workers import only this light module, never a forked copy of the parent.
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
            encoded = pool.imap(_encode, docs, chunksize=16)
        _write_all(encoded, writer, progress, log_interval)
        if writer.num_documents == 0:
            raise DataError("no documents in the inputs")
        summary = {
            "format": "megatron-indexed",
            "tokenizer_sha256": tok.sha256,
            "tokenizer_model": os.path.basename(tok.model_path),
            "vocab_size": tok.vocab_size,
            "json_key": json_key,
            "append_eod": append_eod,
            "split_sentences": split_sentences,
            "inputs": [os.path.basename(f) for f in files],
            "documents": writer.num_documents,
            "sequences": writer.num_sequences,
            "tokens": writer.num_tokens,
            "max_token_id": writer.max_token_id,
            **(extra_metadata or {}),
        }
        writer.finalize(metadata=summary)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"prefix": prefix, **summary}


def _write_all(encoded: Iterator, writer: IndexedDatasetWriter, progress: bool,
               log_interval: Optional[int] = None) -> None:
    from tqdm import tqdm

    bar = tqdm(unit="doc", disable=not progress or log_interval is not None, file=sys.stderr,
               dynamic_ncols=True, desc="tokenizing")
    total_bytes = 0
    start = time.time()
    try:
        for where, sequences, nbytes in encoded:
            if not sequences:
                raise DataError(f"{where}: document has no tokens")
            writer.add_document(sequences)
            total_bytes += nbytes
            bar.update(1)
            if log_interval and writer.num_documents % log_interval == 0:
                # Megatron-LM's progress line, for the logs of users who grep it
                elapsed = max(time.time() - start, 1e-9)
                print(f"Processed {writer.num_documents} documents ({writer.num_documents / elapsed:.1f} docs/s, "
                      f"{total_bytes / elapsed / 2**20:.2f} MB/s).", file=sys.stderr, flush=True)
            if bar.n % 64 == 0:
                bar.set_postfix(tokens=writer.num_tokens, MB=round(total_bytes / 2**20, 1))
        bar.set_postfix(tokens=writer.num_tokens, MB=round(total_bytes / 2**20, 1))
    finally:
        bar.close()
