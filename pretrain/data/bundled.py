"""The bundled public-domain corpus and tokenizer under ``data/`` (see data/README.md).

Documents: each Jane Austen *chapter* (the six novels come as one text file and are cut at their
title and chapter lines) and each Shakespeare / Milton work. A few whole works are held out from
training (and from tokenizer training) for later evaluation: ``HELDOUT``.

Paths point into the repository's ``data/``; set ``PRETRAIN_DATA_DIR`` to use another copy
(e.g. with a non-editable install).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
from typing import Dict, Iterator, List

DATA_DIR = os.environ.get(
    "PRETRAIN_DATA_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data"),
)
AUSTEN = os.path.join(DATA_DIR, "corpora", "austen.txt.gz")
SHAKESPEARE_MILTON = os.path.join(DATA_DIR, "corpora", "shakespeare_milton.jsonl.gz")
TOKENIZER = os.path.join(DATA_DIR, "tokenizer", "spm_bpe_8k.model")
CACHE_DIR = os.path.join(DATA_DIR, "cache")

# How train.jsonl is laid out (training_documents); recorded in the prepared datasets' metadata,
# so outputs of an older layout are rebuilt.
PIECE_CHARS = 16_000
SHUFFLE_SEED = 1234
CORPUS_LAYOUT = f"pieces-{PIECE_CHARS}-shuffled-{SHUFFLE_SEED}"

# Held out from training for evaluation: one novel, one play, one long poem.
HELDOUT = ("austen/persuasion", "shakespeare_milton/tempest", "shakespeare_milton/paradise_regained")

# The novels in austen.txt, in file order, by their exact title line.
_AUSTEN_TITLES = [
    ("EMMA", "emma"),
    ("MANSFIELD PARK", "mansfield_park"),
    ("NORTHANGER ABBEY", "northanger_abbey"),
    ("Persuasion", "persuasion"),
    ("PRIDE AND PREJUDICE", "pride_and_prejudice"),
    ("SENSE AND SENSIBILITY", "sense_and_sensibility"),
]
_CHAPTER = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|\d+)\.?\s*$")


def austen_documents(path: str = AUSTEN) -> Iterator[Dict[str, str]]:
    """One document per chapter: ``{"title": "austen/<novel>/chapter-NN", "text": ...}``."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    starts: List[int] = []
    for title, _ in _AUSTEN_TITLES:
        after = starts[-1] + 1 if starts else 0
        try:
            starts.append(lines.index(title, after))
        except ValueError:
            raise ValueError(f"{path}: novel title line {title!r} not found") from None
    starts.append(len(lines))
    for (_, slug), begin, end in zip(_AUSTEN_TITLES, starts, starts[1:]):
        novel = lines[begin:end]
        heads = [i for i, line in enumerate(novel) if _CHAPTER.match(line)]
        # Front matter (title, author, volume) stays with the first chapter.
        bounds = [0] + heads[1:] + [len(novel)]
        for n, (a, b) in enumerate(zip(bounds, bounds[1:]), 1):
            text = "\n".join(novel[a:b]).strip()
            if text:
                yield {"title": f"austen/{slug}/chapter-{n:02d}", "text": text}


def shakespeare_milton_documents(path: str = SHAKESPEARE_MILTON) -> Iterator[Dict[str, str]]:
    """One document per work: ``{"title": "shakespeare_milton/<work>", "text": ...}``."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield {"title": f"shakespeare_milton/{record['title']}", "text": record["text"]}


def is_heldout(title: str) -> bool:
    return any(title == h or title.startswith(h + "/") for h in HELDOUT)


def corpus_documents(part: str = "train") -> Iterator[Dict[str, str]]:
    """Documents of the bundled corpus: ``part`` is "train", "heldout" or "all"."""
    if part not in ("train", "heldout", "all"):
        raise ValueError(f"part must be train, heldout or all, got {part!r}")
    for source in (austen_documents(), shakespeare_milton_documents()):
        for doc in source:
            if part == "all" or (part == "heldout") == is_heldout(doc["title"]):
                yield doc


def pieces(doc: Dict[str, str], max_chars: int = PIECE_CHARS) -> Iterator[Dict[str, str]]:
    """``doc`` cut into pieces of at most ``max_chars`` characters, at blank lines where possible
    (else at a line break); titles get ``/part-NN`` when there is more than one piece."""
    text, out, start = doc["text"], [], 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = window.rfind("\n\n")
        if cut < max_chars // 4:  # no paragraph break in most of the window: a line break will do
            cut = window.rfind("\n")
        if cut <= 0:
            cut = max_chars
        out.append(text[start:start + cut])
        start += cut
    out.append(text[start:])
    out = [piece.strip() for piece in out if piece.strip()]
    if len(out) == 1:
        yield {"title": doc["title"], "text": out[0]}
        return
    for i, piece in enumerate(out, 1):
        yield {"title": f"{doc['title']}/part-{i:02d}", "text": piece}


def training_documents() -> List[Dict[str, str]]:
    """The training part as written to ``train.jsonl``: pieces of <= PIECE_CHARS characters in a
    fixed shuffled order. Megatron's train/valid/test split takes *consecutive* documents, so
    in file order (Austen first, Milton last) its 1% validation share would be three Milton
    poems; similar-sized shuffled pieces make each split a sample of the whole corpus."""
    docs = [piece for doc in corpus_documents("train") for piece in pieces(doc)]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def write_corpus_jsonl(out_dir: str) -> Dict[str, str]:
    """Write ``train.jsonl`` (``training_documents``) and ``heldout.jsonl`` (whole documents, in
    order) into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for part in ("train", "heldout"):
        path = os.path.join(out_dir, f"{part}.jsonl")
        tmp = f"{path}.tmp-{os.getpid()}"
        docs = training_documents() if part == "train" else corpus_documents(part)
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths[part] = path
    return paths


def prepare(
    out_dir: str = CACHE_DIR,
    tokenizer_model: str = TOKENIZER,
    workers: int = 1,
    force: bool = False,
    progress: bool = False,
) -> Dict[str, str]:
    """Make the bundled corpus trainable: jsonl parts, then GPT and BERT indexed datasets.

    Returns the dataset prefixes: ``gpt`` / ``gpt_heldout`` (documents, with end-of-document
    tokens) and ``bert`` (sentences). Outputs already made with the same tokenizer are reused
    unless ``force``. Takes ~15 s on 2 CPU cores; needs no network.
    """
    from pretrain.data.indexed import prefix_exists, read_metadata
    from pretrain.data.preprocess import output_prefix_for, preprocess
    from pretrain.data.tokenizer import SentencePieceTokenizer

    sha = SentencePieceTokenizer(tokenizer_model).sha256
    corpus_dir = os.path.join(out_dir, "corpus")
    jobs = {  # name: (corpus part, output prefix, split sentences)
        "gpt": ("train", os.path.join(out_dir, "gpt", "corpus"), False),
        "gpt_heldout": ("heldout", os.path.join(out_dir, "gpt", "heldout"), False),
        "bert": ("train", os.path.join(out_dir, "bert", "corpus"), True),
    }
    prefixes, parts = {}, None
    for name, (part, out, split) in jobs.items():
        prefix = output_prefix_for(out, "text", split)
        meta = read_metadata(prefix) if prefix_exists(prefix) else None
        if force or meta is None or meta.get("tokenizer_sha256") != sha or meta.get("corpus_layout") != CORPUS_LAYOUT:
            # Up-to-date outputs are left alone (so concurrent callers only read).
            parts = parts or write_corpus_jsonl(corpus_dir)
            preprocess([parts[part]], tokenizer_model, out, append_eod=not split,
                       split_sentences=split, workers=workers, progress=progress,
                       extra_metadata={"corpus_layout": CORPUS_LAYOUT})
            # Megatron's cached sample indices are keyed by path and settings, not by content:
            # the trainer keeps them under <cache>/index_cache, and they would point into the old data.
            shutil.rmtree(os.path.join(out_dir, "index_cache"), ignore_errors=True)
        prefixes[name] = prefix
    return prefixes
