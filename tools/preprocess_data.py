#!/usr/bin/env python
"""Tokenize jsonl / txt / parquet into Megatron indexed datasets (.bin + .idx).

GPT (one sequence per document, end-of-document token appended):
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model tok.model \
        --output-prefix data/cache/gpt/corpus --append-eod --workers 2
    -> data/cache/gpt/corpus_text_document.{bin,idx}

BERT (one sequence per sentence; the tokenizer needs [CLS]/[SEP]/[MASK]):
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-model tok.model \
        --output-prefix data/cache/bert/corpus --split-sentences --workers 2
    -> data/cache/bert/corpus_text_sentence.{bin,idx}

The files are what megatron.core.datasets.IndexedDataset reads (Megatron-LM compatible). A
<prefix>.meta.json next to them records the tokenizer. Bad input stops with a one-line error and
leaves earlier outputs untouched (exit status 1; 2 for a usage error); --debug shows the traceback.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.cli_errors import ArgumentParser, CommandError, add_debug_flag, run_cli  # noqa: E402
from pretrain.data.preprocess import preprocess  # noqa: E402
from pretrain.data.readers import TXT_MODES  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="preprocess_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files (.jsonl/.json/.txt, optionally .gz, or .parquet) or directories")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    p.add_argument("--output-prefix", required=True,
                   help="outputs are <prefix>_<json-key>_{document,sentence}.{bin,idx}")
    p.add_argument("--json-key", default="text", help="text field in jsonl / column in parquet")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="document",
                   help="what a document is in .txt files")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token </s> to every document (GPT)")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (BERT)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # SystemExit("error: ..."): the tests and callers of main() read the message from it.
    return run_cli(lambda: _run(args), debug=args.debug, raise_exit=True)


def _run(args):
    try:
        summary = preprocess(
            args.input,
            args.tokenizer_model,
            args.output_prefix,
            json_key=args.json_key,
            txt_mode=args.txt_mode,
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            workers=args.workers,
            skip_empty=args.skip_empty,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        raise CommandError("interrupted (no output written)") from None
    print(f"wrote {summary['prefix']}.bin/.idx: {summary['documents']} documents, "
          f"{summary['sequences']} sequences, {summary['tokens']} tokens")
    return summary


if __name__ == "__main__":
    main()
