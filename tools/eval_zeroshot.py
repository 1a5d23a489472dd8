#!/usr/bin/env python
"""Zero-shot evaluation with lm-eval (0.4.x), on an HF export or a training checkpoint.

    python tools/eval_zeroshot.py --hf exports/gpt_tiny --output results.json
    python tools/eval_zeroshot.py --checkpoint runs/x/checkpoints/step_00000100 --limit 50
    python tools/eval_zeroshot.py --hf exports/x --tasks heldout_cloze,lambada_openai   # standard tasks need their data

Default tasks: the local held-out tasks shipped in pretrain/eval/tasks (heldout_cloze,
heldout_nextpassage, heldout_ppl). Any other task name goes to lm-eval as is. Prints lm-eval's
table; --output writes the results (and a flat {task: {metric: value}} summary) as JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="an export directory (lm-eval's `hf` model)")
    src.add_argument("--checkpoint", help="a training checkpoint (step_N dir of any engine), evaluated in memory")
    ap.add_argument("--tasks", default="heldout_cloze,heldout_nextpassage,heldout_ppl")
    ap.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    ap.add_argument("--batch-size", type=int, default=8, help="in-memory route only (the hf route uses 1)")
    ap.add_argument("--run-config", help="--checkpoint: the run's config.json (default: found above it)")
    ap.add_argument("--tokenizer", help="--checkpoint: sentencepiece model (default: the run's)")
    ap.add_argument("--include-path", help="extra lm-eval task YAML directory")
    ap.add_argument("--output", help="write results JSON here")
    args = ap.parse_args(argv)

    from pretrain.eval.runner import evaluate, results_table, summary
    from pretrain.export.errors import ExportError

    tasks = [t for t in args.tasks.split(",") if t]
    try:
        results = evaluate(tasks, hf=args.hf, checkpoint=args.checkpoint, run_config=args.run_config,
                           tokenizer=args.tokenizer, limit=args.limit, batch_size=args.batch_size,
                           include_path=args.include_path)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if results is None:
        return 0
    print(results_table(results))
    if args.output:
        payload = {"source": args.hf or args.checkpoint, "route": "hf" if args.hf else "checkpoint",
                   "tasks": tasks, "limit": args.limit, "summary": summary(results),
                   "results": results.get("results", {}), "n-samples": results.get("n-samples", {}),
                   "versions": results.get("versions", {})}
        with open(args.output, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
