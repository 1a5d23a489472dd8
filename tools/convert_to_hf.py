#!/usr/bin/env python
"""Export a checkpoint of this framework to Hugging Face, or import a GPT2LMHeadModel back.

    python tools/convert_to_hf.py CKPT_DIR OUT_DIR            # any engine's step_N directory
    python tools/convert_to_hf.py --reverse HF_DIR OUT_DIR [--config configs/gpt_tiny.yaml] [key=value ...]

The export writes config.json, model.safetensors and the tokenizer (a sentencepiece run's:
tokenizer.json built from the model plus tokenizer.model; a GPT-2 BPE / Hugging Face tokenizer
run's: saved with save_pretrained; ids verified identical either way), then reloads it with
transformers and compares logits with the source model on a fixed batch: above --tol (max abs
diff, fp32, default 1e-4) it exits with status 3. Unreadable/corrupt inputs and bad run configs
exit with status 1 and one line `error: ...` (2 for a usage error); --debug shows the traceback.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    from pretrain.cli_errors import ArgumentParser, add_debug_flag, run_cli

    ap = ArgumentParser(prog="convert_to_hf.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint dir (step_N) or, with --reverse, a GPT2LMHeadModel dir")
    ap.add_argument("out", help="output dir")
    ap.add_argument("--reverse", action="store_true", help="HF GPT-2 -> checkpoint of this framework")
    ap.add_argument("--run-config", help="the run's config.json (default: found above the checkpoint)")
    ap.add_argument("--tokenizer", help="the run's tokenizer: a sentencepiece .model or a GPT-2 BPE / HF tokenizer directory "
                    "(default: the run config's data.tokenizer)")
    ap.add_argument("--config", help="--reverse: YAML run config the imported checkpoint will be trained with")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (fp32)")
    add_debug_flag(ap)
    ap.add_argument("overrides", nargs="*", help="--reverse: dotted run-config overrides")
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    from pretrain.cli_errors import CommandError
    from pretrain.export.hf import ValidationError, export, import_gpt2

    try:
        if args.reverse:
            res = import_gpt2(args.src, args.out, args.config, args.overrides, args.tokenizer, args.tol)
        else:
            res = export(args.src, args.out, args.run_config, args.tokenizer, args.tol).to_dict()
    except ValidationError as e:
        raise CommandError(f"validation failed: {e}", exit_code=3) from e
    print(json.dumps(res))
    print(f"ok: max abs logit diff {res['max_abs_diff']:.2e} <= {res['tol']:.0e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
