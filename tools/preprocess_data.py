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

Megatron-LM's flags work too (its tools/preprocess_data.py command lines run unchanged):
    python tools/preprocess_data.py --input corpus.jsonl --json-keys text title \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \
        --output-prefix data/cache/gpt2/corpus --append-eod --workers 2 --partitions 2 --log-interval 1000
    -> data/cache/gpt2/corpus_text_document.{bin,idx} and corpus_title_document.{bin,idx}
--tokenizer-type: SentencePieceTokenizer (--tokenizer-model x.model), GPT2BPETokenizer
(--vocab-file, --merge-file; nothing is downloaded), HuggingFaceTokenizer (--tokenizer-model a
local tokenizer directory). --partitions is accepted for those command lines: the output is one
dataset per key in input order, and --workers sets the parallelism. --keep-newlines keeps line
breaks inside sentences with --split-sentences (without it, documents keep theirs anyway).

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
from pretrain.data.tokenizer import TOKENIZER_TYPES, load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="preprocess_data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files (.jsonl/.json/.txt, optionally .gz, or .parquet) or directories")
    p.add_argument("--tokenizer-model",
                   help="sentencepiece .model file, or a local Hugging Face tokenizer directory")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help="Megatron-LM's name for the tokenizer (default: from --tokenizer-model / --vocab-file)")
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: the vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: the merges.txt")
    p.add_argument("--output-prefix", required=True,
                   help="outputs are <prefix>_<json-key>_{document,sentence}.{bin,idx}")
    p.add_argument("--json-keys", "--json-key", dest="json_keys", nargs="+", default=["text"],
                   help="text field(s) in jsonl / column(s) in parquet; one dataset per key")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="document",
                   help="what a document is in .txt files")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token </s> to every document (GPT)")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (BERT)")
    p.add_argument("--keep-newlines", action="store_true",
                   help="--split-sentences: keep line breaks inside sentences")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--partitions", type=int, default=1,
                   help="accepted for Megatron-LM command lines; the output is the same for any value")
    p.add_argument("--log-interval", type=int, default=None,
                   help="a progress line every this many documents instead of the progress bar")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    args = p.parse_args(argv)
    gpt2 = args.tokenizer_type == "GPT2BPETokenizer" or (args.tokenizer_type is None and args.vocab_file)
    if gpt2:
        if not (args.vocab_file and args.merge_file):
            p.error("GPT2BPETokenizer needs --vocab-file and --merge-file (nothing is downloaded)")
    elif not args.tokenizer_model:
        p.error("the following arguments are required: --tokenizer-model (or --tokenizer-type "
                "GPT2BPETokenizer with --vocab-file and --merge-file)")
    elif args.vocab_file or args.merge_file:
        p.error(f"--vocab-file/--merge-file are for GPT2BPETokenizer, not {args.tokenizer_type or 'a --tokenizer-model'}")
    if args.partitions < 1:
        p.error(f"--partitions must be at least 1, got {args.partitions}")
    if len(set(args.json_keys)) != len(args.json_keys):
        p.error(f"--json-keys names a key twice: {' '.join(args.json_keys)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # SystemExit("error: ..."): the tests and callers of main() read the message from it.
    return run_cli(lambda: _run(args), debug=args.debug, raise_exit=True)


def _run(args):
    tok = load_tokenizer(args.tokenizer_model, args.tokenizer_type, args.vocab_file, args.merge_file)
    summaries = []
    for key in args.json_keys:
        try:
            summary = preprocess(
                args.input,
                tok,
                args.output_prefix,
                json_key=key,
                txt_mode=args.txt_mode,
                append_eod=args.append_eod,
                split_sentences=args.split_sentences,
                workers=args.workers,
                skip_empty=args.skip_empty,
                progress=not args.quiet,
                keep_newlines=args.keep_newlines,
                log_interval=args.log_interval,
            )
        except KeyboardInterrupt:
            raise CommandError(f"interrupted (no output written for --json-keys {key})") from None
        print(f"wrote {summary['prefix']}.bin/.idx: {summary['documents']} documents, "
              f"{summary['sequences']} sequences, {summary['tokens']} tokens")
        summaries.append(summary)
    # one key: the summary as before, for callers of main()
    return summaries[0] if len(summaries) == 1 else summaries


if __name__ == "__main__":
    main()
