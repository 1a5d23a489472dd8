#!/usr/bin/env python
"""Prepare the bundled corpus (data/corpora) for training; needs no download.

    python tools/prepare_corpus.py                 # -> data/cache/{corpus,gpt,bert}/...
    python tools/prepare_corpus.py --train-tokenizer   # also re-train data/tokenizer/spm_bpe_8k

Writes data/cache/corpus/{train,heldout}.jsonl (documents: Austen chapters, Shakespeare and Milton
works; the held-out works are listed in data/README.md), then the Megatron indexed datasets
data/cache/gpt/corpus_text_document (GPT, with end-of-document tokens),
data/cache/gpt/heldout_text_document and data/cache/bert/corpus_text_sentence (BERT).
--train-tokenizer re-creates the committed tokenizer exactly as it was made (training part only).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.data import bundled  # noqa: E402
from pretrain.data.readers import DataError  # noqa: E402
from pretrain.data.tokenizer import train_sentencepiece  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=bundled.CACHE_DIR, help="output directory (default data/cache)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild even if outputs are up to date")
    p.add_argument("--train-tokenizer", action="store_true",
                   help=f"re-train {os.path.relpath(bundled.TOKENIZER)} first (8192 BPE + BERT tokens)")
    args = p.parse_args(argv)
    try:
        if args.train_tokenizer:
            docs = (d["text"] for d in bundled.corpus_documents("train"))
            path = train_sentencepiece(docs, bundled.TOKENIZER[: -len(".model")], vocab_size=8192,
                                       model_type="bpe", bert_special_tokens=True, num_threads=1)
            print(f"wrote {path}")
        prefixes = bundled.prepare(args.out, workers=args.workers, force=args.force, progress=True)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    for name, prefix in prefixes.items():
        print(f"{name}: {prefix}")


if __name__ == "__main__":
    main()
