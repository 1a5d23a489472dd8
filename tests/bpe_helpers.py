"""Shared by the GPT-2-BPE tests: a byte-level BPE in GPT-2's file format, trained offline."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def write_gpt2_bpe(directory: Path, texts: Sequence[str], vocab_size: int) -> Path:
    """Train a byte-level BPE on ``texts`` (nothing is downloaded) with GPT-2's <|endoftext|> and
    save it as ``directory/vocab.json`` + ``directory/merges.txt``; returns ``directory``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return directory
