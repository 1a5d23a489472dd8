#!/usr/bin/env python
"""Zero-shot evaluation with lm-eval (0.4.x), on an HF export or a training checkpoint.

    python tools/eval_zeroshot.py --hf exports/gpt_tiny --output results.json
    python tools/eval_zeroshot.py --checkpoint runs/x/checkpoints/step_00000100 --limit 50
    python tools/eval_zeroshot.py --hf exports/x --tasks heldout_cloze,lambada_openai   # standard tasks need their data

Default tasks: the local held-out tasks shipped in pretrain/eval/tasks (heldout_cloze,
heldout_nextpassage, heldout_ppl). Any other task name goes to lm-eval as is. Prints lm-eval's
table; --output writes the results (and a flat {task: {metric: value}} summary) as JSON.
Bad input is one line `error: ...` (exit status 1; 2 for a usage error); --debug shows the traceback.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _task_list(text: str) -> list:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"no task names in {text!r} (comma-separated, e.g. heldout_cloze,heldout_ppl)")
    return tasks


def main(argv=None) -> int:
    from pretrain.cli_errors import ArgumentParser, add_debug_flag, run_cli

    ap = ArgumentParser(prog="eval_zeroshot.py", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="an export directory (lm-eval's `hf` model)")
    src.add_argument("--checkpoint", help="a training checkpoint (step_N dir of any engine), evaluated in memory")
    ap.add_argument("--tasks", type=_task_list, default="heldout_cloze,heldout_nextpassage,heldout_ppl")
    ap.add_argument("--limit", type=_positive_int, default=None, help="at most this many documents per task")
    ap.add_argument("--batch-size", type=_positive_int, default=8, help="in-memory route only (the hf route uses 1)")
    ap.add_argument("--run-config", help="--checkpoint: the run's config.json (default: found above it)")
    ap.add_argument("--tokenizer", help="--checkpoint: the run's tokenizer, sentencepiece or HF (default: the run's)")
    ap.add_argument("--include-path", help="extra lm-eval task YAML directory")
    ap.add_argument("--output", help="write results JSON here")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _check_output(path: str) -> None:
    # Before the evaluation, which can take long, rather than after it.
    from pretrain.cli_errors import CommandError

    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CommandError(f"--output {path}: is a directory")
    if not parent.is_dir():
        raise CommandError(f"--output {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CommandError(f"--output {path}: not writable")


def _run(args) -> int:
    from pretrain.cli_errors import CommandError
    from pretrain.eval.runner import evaluate, results_table, summary

    if args.output:
        _check_output(args.output)
    results = evaluate(args.tasks, hf=args.hf, checkpoint=args.checkpoint, run_config=args.run_config,
                       tokenizer=args.tokenizer, limit=args.limit, batch_size=args.batch_size,
                       include_path=args.include_path)
    if results is None:  # a non-zero rank of a distributed lm-eval run
        return 0
    print(results_table(results))
    if args.output:
        payload = {"source": args.hf or args.checkpoint, "route": "hf" if args.hf else "checkpoint",
                   "tasks": args.tasks, "limit": args.limit, "summary": summary(results),
                   "results": results.get("results", {}), "n-samples": results.get("n-samples", {}),
                   "versions": results.get("versions", {})}
        try:
            with open(args.output, "w") as f:
                json.dump(payload, f, indent=1, default=str)
        except OSError as e:
            raise CommandError(f"--output {args.output}: cannot write ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
