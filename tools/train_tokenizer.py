#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback) from jsonl / txt / parquet.

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix data/tokenizer/spm_bpe_8k \
        --vocab-size 8192 --model-type bpe --bert-special-tokens

Writes <prefix>.model and <prefix>.vocab. Special ids are fixed: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>
(end of document), and with --bert-special-tokens 4 [CLS], 5 [SEP], 6 [MASK]. Bad input is one
line `error: ...` (exit status 1; 2 for a usage error); --debug shows the traceback.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.cli_errors import ArgumentParser, add_debug_flag, run_cli  # noqa: E402
from pretrain.data.readers import TXT_MODES, iter_documents  # noqa: E402
from pretrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(prog="train_tokenizer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files (.jsonl/.json/.txt, optionally .gz, or .parquet) or directories")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--bert-special-tokens", action="store_true",
                   help="add [CLS], [SEP], [MASK] (needed for BERT data and models)")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="map unseen characters to <unk> instead of UTF-8 bytes")
    p.add_argument("--json-key", default="text", help="text field in jsonl / column in parquet")
    p.add_argument("--txt-mode", choices=TXT_MODES, default="document",
                   help="what a document is in .txt files")
    p.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on at most this many lines (the first ones)")
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # SystemExit("error: ..."): the tests and callers of main() read the message from it.
    run_cli(lambda: _run(args), debug=args.debug, raise_exit=True)


def _run(args):
    docs = (text for _, text in iter_documents(
        args.input, args.json_key, args.txt_mode, skip_empty=args.skip_empty))
    path = train_sentencepiece(
        docs,
        args.output_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        bert_special_tokens=args.bert_special_tokens,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        num_threads=args.threads,
    )
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, {args.model_type}, "
          f"bert tokens: {'yes' if tok.has_bert_tokens else 'no'}, sha256 {tok.sha256[:12]})")


if __name__ == "__main__":
    main()
