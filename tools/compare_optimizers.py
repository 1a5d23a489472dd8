#!/usr/bin/env python
"""The optimizer study: lr sweep per optimizer, 2-seed final runs at the tuned lr, zero-shot
evaluation, and a report with tables and plots under docs/results/.

    python tools/compare_optimizers.py                       # the full study (defaults below)
    python tools/compare_optimizers.py --plan --measure-steps 6   # measure tokens/s, print the plan and its predicted time
    python tools/compare_optimizers.py --optimizers adamw,adalomo,sgd --tasks gpt \\
        --gpt-override model.preset=tiny --budget-tokens 8192 --seeds 1234 --out /tmp/smoke --label "SMOKE RUN"

For each task (GPT on configs/gpt_demo.yaml; BERT MLM on configs/bert_tiny.yaml, the smaller
scale) and each optimizer: ``--lrs-per-optimizer`` log-spaced learning rates spanning
``--lr-span-decades`` decades around the optimizer's centre (pretrain/study/catalog.py) are
trained for ``--sweep-tokens`` with the first seed; the lr with the lowest final validation
loss is trained for ``--budget-tokens`` with every seed (the sweep run is reused when both
budgets are equal); each final GPT model is evaluated zero-shot on the local held-out tasks.
Each run is a separate process (``pretrain.study.worker``) so peak RSS is per run; finished runs
are reused when the command is repeated (the study resumes). Writes report.md, loss/memory/sweep
PNGs, results.json and raw/<task>/<run>/metrics.jsonl under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Sized for about an hour on the 2-core development machine when it is not shared; see
# docs/results/README.md for the measured tokens/s and the arithmetic.
DEFAULT_BUDGET_TOKENS = 24_576  # 24 steps of 8 x 128 tokens (demo GPT)
DEFAULT_BERT_BUDGET_TOKENS = 8_192  # 32 steps of 4 x 64 tokens (tiny BERT)


def parse_args(argv=None):
    from pretrain.study.catalog import DEFAULT_OPTIMIZERS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), help="comma list (default: all)")
    ap.add_argument("--tasks", default="gpt,bert", help="gpt, bert or both (default gpt,bert)")
    ap.add_argument("--budget-tokens", type=int, default=DEFAULT_BUDGET_TOKENS, help="GPT tokens per final run")
    ap.add_argument("--sweep-tokens", type=int, default=None, help="GPT tokens per sweep run (default: the budget)")
    ap.add_argument("--bert-budget-tokens", type=int, default=DEFAULT_BERT_BUDGET_TOKENS)
    ap.add_argument("--bert-sweep-tokens", type=int, default=None)
    ap.add_argument("--lrs-per-optimizer", type=int, default=3)
    ap.add_argument("--lr-span-decades", type=float, default=1.0, help="decades the lr grid covers (default 1)")
    ap.add_argument("--lr-center", action="append", default=[], metavar="KEY=LR",
                    help="move an optimizer's lr grid, e.g. came=1e-4 (repeatable; default: pretrain/study/catalog.py)")
    ap.add_argument("--seeds", default="1234,1235", help="comma list; the first one is the sweep seed")
    ap.add_argument("--evals-per-run", type=int, default=6, help="validation points per run (the loss curves)")
    ap.add_argument("--gpt-config", default=str(ROOT / "configs/gpt_demo.yaml"))
    ap.add_argument("--bert-config", default=str(ROOT / "configs/bert_tiny.yaml"))
    ap.add_argument("--gpt-override", action="append", default=[], help="extra dotted override for the GPT runs")
    ap.add_argument("--bert-override", action="append", default=[], help="extra dotted override for the BERT runs")
    ap.add_argument("--no-zeroshot", action="store_true", help="skip the zero-shot evaluation")
    ap.add_argument("--zeroshot-limit", type=int, default=None, help="documents per zero-shot task (default all)")
    ap.add_argument("--out", default=str(ROOT / "docs/results"), help="report directory")
    ap.add_argument("--work-dir", default=str(ROOT / "runs/optimizer_study"), help="run directories")
    ap.add_argument("--label", default=None,
                    help='printed at the top of the report; one starting with "SMOKE" also says its numbers are not results')
    ap.add_argument("--plan", action="store_true", help="print the plan and its predicted time; train nothing")
    ap.add_argument("--measure-steps", type=int, default=0,
                    help="with --plan: measure tokens/s per optimizer with runs of this many steps first")
    args = ap.parse_args(argv)
    if args.lrs_per_optimizer < 1:
        ap.error("--lrs-per-optimizer must be >= 1")
    return args


def parse_lr_centers(items: list[str], keys: list[str]) -> dict[str, float]:
    """{optimizer key: lr centre} from ``KEY=LR`` strings; the keys must be in the study."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --lr-center takes KEY=LR, got {item!r}")
        if key not in keys:
            raise SystemExit(f"error: --lr-center {key!r} is not one of the study's optimizers ({', '.join(keys)})")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if not math.isfinite(lr) or lr <= 0:
            raise SystemExit(f"error: --lr-center {key}: the lr must be a positive number, got {value!r}")
        out[key] = lr
    return out


def build_plan(args):
    from pretrain.study.catalog import resolve
    from pretrain.study.study import StudyPlan, TaskPlan

    tasks = []
    for task in [t for t in args.tasks.split(",") if t]:
        if task == "gpt":
            tasks.append(TaskPlan("gpt", args.gpt_config, args.budget_tokens, args.sweep_tokens or args.budget_tokens,
                                  list(args.gpt_override), zeroshot=not args.no_zeroshot))
        elif task == "bert":
            tasks.append(TaskPlan("bert", args.bert_config, args.bert_budget_tokens,
                                  args.bert_sweep_tokens or args.bert_budget_tokens, list(args.bert_override)))
        else:
            raise SystemExit(f"error: unknown task {task!r} (gpt, bert)")
    entries = resolve([k for k in args.optimizers.split(",") if k])
    centers = parse_lr_centers(args.lr_center, [e.key for e in entries])
    entries = [dataclasses.replace(e, lr_center=centers[e.key]) if e.key in centers else e for e in entries]
    return StudyPlan(tasks=tasks, entries=entries,
                     lrs_per_optimizer=args.lrs_per_optimizer, lr_span_decades=args.lr_span_decades,
                     seeds=tuple(int(s) for s in args.seeds.split(",") if s), evals_per_run=args.evals_per_run,
                     zeroshot_limit=args.zeroshot_limit, work_dir=args.work_dir)


def planned_runs(plan) -> list[dict]:
    """(task, key, train runs, tokens) of the plan."""
    rows = []
    for tp in plan.tasks:
        reuse = tp.sweep_tokens == tp.budget_tokens
        n_final = len(plan.seeds) - (1 if reuse else 0)
        for e in plan.entries:
            rows.append(dict(task=tp.task, key=e.key, label=e.label, runs=plan.lrs_per_optimizer + n_final,
                             tokens=plan.lrs_per_optimizer * tp.sweep_tokens + n_final * tp.budget_tokens))
    return rows


def timing(plan, study, speeds: dict | None = None) -> dict:
    """Predicted (tokens / tokens/s) and actual time per task and optimizer. Two speeds: the
    wall-clock tokens/s measured (which on a shared machine mostly measures the load), and the
    load-independent one, tokens per CPU-second x torch threads (what an otherwise idle machine
    gives at perfect thread scaling, so an optimistic bound)."""
    rows = []
    for row in planned_runs(plan):
        runs = []
        if study is not None:
            t = study["tasks"].get(row["task"], {})
            runs = [r for r in t.get("sweep", []) + t.get("final", []) if r["key"] == row["key"]]
        measured = (speeds or {}).get((row["task"], row["key"])) or {}
        tps = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        cps = [r["tokens_per_cpu_s"] * (r.get("torch_threads") or 1) for r in runs if r.get("tokens_per_cpu_s")]
        speed = statistics.median(tps) if tps else measured.get("tokens_per_s")
        idle = statistics.median(cps) if cps else measured.get("idle_tokens_per_s")
        actual = None
        if runs:
            seen, actual = set(), 0.0
            for r in runs:
                if r["name"] not in seen:
                    seen.add(r["name"])
                    actual += (r.get("process_wall_s") or r.get("wall_s") or 0)
                    actual += (r.get("zeroshot_wall_s") or 0) if r.get("reused_from_sweep") else 0
        rows.append(dict(row, tokens_per_s=speed, predicted_s=row["tokens"] / speed if speed else None,
                         idle_tokens_per_s=idle, predicted_idle_s=row["tokens"] / idle if idle else None, actual_s=actual))
    return dict(rows=rows, predicted_total_s=sum(r["predicted_s"] or 0 for r in rows),
                predicted_idle_total_s=sum(r["predicted_idle_s"] or 0 for r in rows),
                actual_total_s=study["wall_s"] if study is not None else 0.0)


def measure(plan, steps: int) -> dict:
    """tokens/s per (task, optimizer) from short runs at the centre lr (no zero-shot)."""
    from pretrain.study.study import StudyPlan, subprocess_run, tokens_per_step, train_spec

    speeds = {}
    mplan = StudyPlan(plan.tasks, plan.entries, evals_per_run=1, work_dir=str(Path(plan.work_dir) / "measure"))
    for tp in plan.tasks:
        per_step = tokens_per_step(tp.config, tp.model_overrides)[2]
        for e in plan.entries:
            r = subprocess_run(train_spec(mplan, tp, e, e.lr_center, plan.seeds[0], "measure", steps * per_step, False, False))
            idle = (r.get("tokens_per_cpu_s") or 0) * (r.get("torch_threads") or 1)
            speeds[(tp.task, e.key)] = dict(tokens_per_s=r.get("tokens_per_s"), idle_tokens_per_s=idle or None)
            print(f"measured {tp.task} {e.key}: {r.get('tokens_per_s') or 0:.0f} tokens/s wall, "
                  f"{idle:.0f} tokens/s at the CPU time's rate (run wall {r.get('wall_s') or 0:.0f} s)", flush=True)
    return speeds


def meta_for(plan, args, argv) -> dict:
    from pretrain.study.study import steps_for, tokens_per_step

    tasks = {}
    for tp in plan.tasks:
        mbs, seq, per_step = tokens_per_step(tp.config, tp.model_overrides)
        from pretrain.config import load_run_config

        cfg = load_run_config(tp.config, [f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}", *tp.model_overrides])
        tasks[tp.task] = dict(model=f"{cfg.model.kind} preset '{cfg.model.preset}' ({Path(tp.config).name}"
                              + (", " + ", ".join(tp.model_overrides) if tp.model_overrides else "") + f"), {mbs} x {seq} tokens per step",
                              budget_tokens=tp.budget_tokens, sweep_tokens=tp.sweep_tokens, tokens_per_step=per_step,
                              budget_steps=steps_for(tp.budget_tokens, per_step), seeds=list(plan.seeds),
                              zeroshot_limit=plan.zeroshot_limit)
    import torch

    cmd = "python tools/compare_optimizers.py" + "".join(" " + shlex.quote(a) for a in argv)
    return dict(command=cmd, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
                        f"load average at the start {os.getloadavg()[0]:.1f}",
                optimizers=[e.key for e in plan.entries], lr_grids={e.key: plan.lrs(e) for e in plan.entries},
                tasks=tasks)


def main(argv=None, run_fn=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from pretrain.study.report import write_report
    from pretrain.study.study import run_study, subprocess_run

    plan = build_plan(args)
    if args.plan:
        speeds = measure(plan, args.measure_steps) if args.measure_steps else None
        t = timing(plan, None, speeds)
        for r in t["rows"]:
            p = (f"{r['predicted_s'] / 60:.1f} min at the measured wall speed, {r['predicted_idle_s'] / 60:.1f} min idle"
                 if r["predicted_s"] and r["predicted_idle_s"] else "? (no tokens/s: add --measure-steps)")
            print(f"{r['task']:5s} {r['key']:14s} {r['runs']} runs, {r['tokens']:>9,} tokens, "
                  f"{r['tokens_per_s'] or 0:6.0f} tok/s wall, {r['idle_tokens_per_s'] or 0:6.0f} idle -> {p}")
        print(f"predicted training time: {t['predicted_total_s'] / 60:.1f} min at the measured wall speed, "
              f"{t['predicted_idle_total_s'] / 60:.1f} min on an idle machine (plus start-up, evaluation, zero-shot)")
        return 0
    meta = meta_for(plan, args, argv)
    study = run_study(plan, run_fn or subprocess_run)
    meta["timing"] = timing(plan, study)
    write_report(study, meta, Path(args.out), args.label)
    print(f"wrote {Path(args.out) / 'report.md'} ({study['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
