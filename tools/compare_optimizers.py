#!/usr/bin/env python
"""The optimizer study: lr sweep per optimizer, 2-seed final runs at the tuned lr, zero-shot
evaluation, and a report with tables and plots under docs/results/.

    python tools/compare_optimizers.py                       # the full study (defaults below)
    python tools/compare_optimizers.py --plan --measure-steps 6   # measure tokens/s, print the plan and its predicted time
    python tools/compare_optimizers.py --optimizers adamw,adalomo,sgd --tasks gpt \\
        --gpt-override model.preset=tiny --budget-tokens 8192 --seeds 1234 --out /tmp/smoke --label "SMOKE RUN"
    python tools/compare_optimizers.py --long --plan --measure-steps 40   # the long study's plan and predicted time
    python tools/compare_optimizers.py --long --jobs 2 --deadline-min 140  # one sitting of it (repeat to resume)

``--long`` is the long, fair study (docs/results/long/): GPT at the sizes of ``--sizes`` and BERT
at ``--bert-sizes`` (pretrain/study/catalog.py SIZES, the 1k tokenizer), 2,000 steps of >= 20
tokens per parameter, warm-up (5%) + cosine, 4 learning rates half a decade apart around each
optimizer's long-study centre, extended outward (up to 3 times) while the best sits at an edge,
3 seeds at the best lr, no zero-shot evaluation (a 1k-vocabulary model of 0.2M parameters scores
at chance). It takes many hours on 2 cores: run it in sittings with ``--deadline-min``; each
sitting reuses the finished runs and writes a report marked PARTIAL until every run is done.

For each task (GPT on configs/gpt_demo.yaml; BERT MLM on configs/bert_tiny.yaml, the smaller
scale) and each optimizer: ``--lrs-per-optimizer`` log-spaced learning rates spanning
``--lr-span-decades`` decades around the optimizer's centre (pretrain/study/catalog.py) are
trained for ``--sweep-tokens`` with the first seed; the lr with the lowest final validation
loss is trained for ``--budget-tokens`` with every seed (the sweep run is reused when both
budgets are equal); each final GPT model is evaluated zero-shot on the local held-out tasks.
Each run is a separate process (``pretrain.study.worker``) so peak RSS is per run; finished runs
are reused when the command is repeated (the study resumes), also from a fresh clone: the runs the
committed ``--out``/results.json holds are restored into ``--work-dir`` first. Writes report.md, loss/memory/sweep
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
import time
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
    ap.add_argument("--long", action="store_true", help="the long fair study's settings (see above); "
                    "options given explicitly still win")
    ap.add_argument("--sizes", default=None, help="GPT model sizes (pretrain/study/catalog.py SIZES), e.g. s,m; "
                    "replaces --gpt-config's model")
    ap.add_argument("--bert-sizes", default=None, help="BERT model sizes, e.g. s")
    ap.add_argument("--steps", type=int, default=2000, help="steps per run with --sizes (default 2000)")
    ap.add_argument("--min-tokens-per-param", type=float, default=20.0,
                    help="with --sizes: refuse a size whose budget gives fewer tokens per parameter")
    ap.add_argument("--tokenizer", default=None, help="sentencepiece model for --sizes runs (default: the 1k one)")
    ap.add_argument("--warmup-fraction", type=float, default=None, help="warm-up steps as a fraction of each run")
    ap.add_argument("--max-extensions", type=int, default=0,
                    help="lr points added outward while the best lr sits at an edge of the grid")
    ap.add_argument("--jobs", type=int, default=1, help="optimizers trained side by side (each with cores/jobs threads)")
    ap.add_argument("--deadline-min", type=float, default=None,
                    help="start no run after this many minutes; the report is then marked PARTIAL")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the report from the runs finished so far (= --deadline-min 0)")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.long:
        given = {a.split("=")[0] for a in raw if a.startswith("--")}
        for opt, value in LONG_DEFAULTS.items():
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), value)
    if args.lrs_per_optimizer < 1:
        ap.error("--lrs-per-optimizer must be >= 1")
    if args.report_only:
        args.deadline_min = 0.0
    if args.jobs < 1 or args.max_extensions < 0 or args.steps < 2:
        ap.error("--jobs must be >= 1, --max-extensions >= 0 and --steps >= 2")
    return args


def _long_defaults() -> dict:
    from pretrain.study.catalog import LONG_OPTIMIZERS

    return {"--optimizers": ",".join(LONG_OPTIMIZERS), "--tasks": "gpt,bert", "--sizes": "s,m", "--bert-sizes": "s",
            "--lrs-per-optimizer": 4, "--lr-span-decades": 1.5, "--max-extensions": 3,
            "--seeds": "1234,1235,1236", "--evals-per-run": 10, "--warmup-fraction": 0.05, "--no-zeroshot": True,
            "--out": str(ROOT / "docs/results/long"), "--work-dir": str(ROOT / "runs/long_study"),
            "--jobs": max(1, min(4, os.cpu_count() or 1))}  # one thread per run: small models scale poorly


LONG_DEFAULTS = _long_defaults()


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


def sized_tasks(args, task: str, sizes: str, config: str, extra: list[str]) -> list:
    """One TaskPlan per model size: ``steps`` steps of the size's batch, the long-study lr centres."""
    from pretrain.study.catalog import LONG_LR_CENTERS, LONG_TOKENIZER, SIZES, size_hparams
    from pretrain.study.study import TaskPlan

    tokenizer = args.tokenizer or str(ROOT / LONG_TOKENIZER)
    out = []
    for name in [x for x in sizes.split(",") if x]:
        if name not in SIZES:
            raise SystemExit(f"error: unknown model size {name!r}; choices: {', '.join(SIZES)}")
        size = SIZES[name]
        tokens = args.steps * size.micro_batch * 128
        out.append(TaskPlan(task, config, tokens, tokens, [*size.overrides(), *extra], zeroshot=False,
                            name=f"{task}_{name}", tokenizer=tokenizer,
                            cache_dir=str(ROOT / "data/cache" / Path(tokenizer).stem),
                            lr_centers=LONG_LR_CENTERS[task], hparams=size_hparams(size),
                            warmup_fraction=args.warmup_fraction))
    return out


def build_plan(args):
    from pretrain.study.catalog import resolve
    from pretrain.study.study import StudyPlan, TaskPlan

    tasks = []
    for task in [t for t in args.tasks.split(",") if t]:
        if task == "gpt" and args.sizes:
            tasks += sized_tasks(args, "gpt", args.sizes, str(ROOT / "configs/gpt_tiny.yaml"), list(args.gpt_override))
        elif task == "bert" and args.bert_sizes:
            tasks += sized_tasks(args, "bert", args.bert_sizes, str(ROOT / "configs/bert_tiny.yaml"), list(args.bert_override))
        elif task == "gpt":
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
    for tp in tasks:  # --lr-center wins over a task's own centres too
        tp.lr_centers = {k: v for k, v in tp.lr_centers.items() if k not in centers}
    deadline = None if args.deadline_min is None else time.time() + 60 * args.deadline_min
    return StudyPlan(tasks=tasks, entries=entries,
                     lrs_per_optimizer=args.lrs_per_optimizer, lr_span_decades=args.lr_span_decades,
                     seeds=tuple(int(s) for s in args.seeds.split(",") if s), evals_per_run=args.evals_per_run,
                     zeroshot_limit=args.zeroshot_limit, work_dir=args.work_dir, max_extensions=args.max_extensions,
                     jobs=args.jobs, deadline=deadline)


def check_token_budgets(plan, min_tokens_per_param: float) -> dict:
    """{task name: parameters} for the sized tasks; exits with one line when a budget is too small."""
    from pretrain.study.study import model_parameters

    params = {}
    for tp in plan.tasks:
        if tp.name == tp.task:
            continue
        n = params[tp.name] = model_parameters(tp)
        if tp.budget_tokens < min_tokens_per_param * n:
            raise SystemExit(f"error: {tp.name}: {tp.budget_tokens:,} tokens is {tp.budget_tokens / n:.1f} per parameter "
                             f"({n:,} parameters), below --min-tokens-per-param {min_tokens_per_param:g}; "
                             "raise --steps or the size's micro_batch")
    return params


def planned_runs(plan) -> list[dict]:
    """(task, key, train runs, tokens) of the plan, without grid extensions (each adds one sweep run)."""
    rows = []
    for tp in plan.tasks:
        reuse = tp.sweep_tokens == tp.budget_tokens
        n_final = len(plan.seeds) - (1 if reuse else 0)
        for e in plan.entries:
            rows.append(dict(task=tp.name, key=e.key, label=e.label, runs=plan.lrs_per_optimizer + n_final,
                             tokens=plan.lrs_per_optimizer * tp.sweep_tokens + n_final * tp.budget_tokens))
    return rows


def timing(plan, study, speeds: dict | None = None, params: dict | None = None) -> dict:
    """Predicted (tokens / tokens/s), actual and remaining time per task and optimizer. Two speeds:
    the wall-clock tokens/s measured (which on a shared machine mostly measures the load), and the
    load-independent one, tokens per CPU-second x torch threads (what an otherwise idle machine
    gives at perfect thread scaling, so an optimistic bound). A task with no run of an optimizer
    yet takes that optimizer's speed on another size of the same model, scaled by the parameter
    ratio (compute per token ~ parameters), marked ``extrapolated``."""
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
        actual, done_tokens, done_runs = None, 0, 0
        if runs:
            seen, actual = set(), 0.0
            for r in runs:
                if r["name"] not in seen:
                    seen.add(r["name"])
                    done_runs += 1
                    done_tokens += r.get("tokens_budget") or 0
                    actual += (r.get("process_wall_s") or r.get("wall_s") or 0)
                    actual += (r.get("zeroshot_wall_s") or 0) if r.get("reused_from_sweep") else 0
        rows.append(dict(row, tokens_per_s=speed, idle_tokens_per_s=idle, actual_s=actual, extrapolated=False,
                         done_runs=done_runs, remaining_tokens=max(0, row["tokens"] - done_tokens)))
    kind = {tp.name: tp.task for tp in plan.tasks}
    for row in rows:
        if row["tokens_per_s"] is None and params and params.get(row["task"]):
            peers = [r for r in rows if r["key"] == row["key"] and r["task"] != row["task"] and r["tokens_per_s"]
                     and kind[r["task"]] == kind[row["task"]] and params.get(r["task"])]
            if peers:
                ratio = params[peers[0]["task"]] / params[row["task"]]
                row.update(tokens_per_s=peers[0]["tokens_per_s"] * ratio, extrapolated=True,
                           idle_tokens_per_s=(peers[0]["idle_tokens_per_s"] or 0) * ratio or None)
    for row in rows:
        speed, idle = row["tokens_per_s"], row["idle_tokens_per_s"]
        row.update(predicted_s=row["tokens"] / speed if speed else None,
                   predicted_idle_s=row["tokens"] / idle if idle else None,
                   remaining_s=row["remaining_tokens"] / speed if speed else None)
    return dict(rows=rows, predicted_total_s=sum(r["predicted_s"] or 0 for r in rows),
                predicted_idle_total_s=sum(r["predicted_idle_s"] or 0 for r in rows),
                remaining_total_s=sum(r["remaining_s"] or 0 for r in rows),
                remaining_runs=sum(max(0, r["runs"] - r["done_runs"]) for r in rows),
                unknown_speed=[f"{r['task']}/{r['key']}" for r in rows if r["tokens_per_s"] is None],
                actual_total_s=study["wall_s"] if study is not None else 0.0, jobs=plan.jobs)


def measure(plan, steps: int) -> dict:
    """tokens/s per (task, optimizer) from short runs at the centre lr (no zero-shot)."""
    from pretrain.study.study import StudyPlan, subprocess_run, tokens_per_step, train_spec

    speeds = {}
    mplan = StudyPlan(plan.tasks, plan.entries, evals_per_run=1, work_dir=str(Path(plan.work_dir) / "measure"),
                      jobs=plan.jobs)
    for tp in plan.tasks:
        per_step = tokens_per_step(tp.config, tp.model_overrides)[2]
        for e in plan.entries:
            r = subprocess_run(train_spec(mplan, tp, e, plan.lrs(e, tp)[0], plan.seeds[0], "measure", steps * per_step,
                                          False, False))
            idle = (r.get("tokens_per_cpu_s") or 0) * (r.get("torch_threads") or 1)
            speeds[(tp.name, e.key)] = dict(tokens_per_s=r.get("tokens_per_s"), idle_tokens_per_s=idle or None)
            print(f"measured {tp.name} {e.key}: {r.get('tokens_per_s') or 0:.0f} tokens/s wall, "
                  f"{idle:.0f} tokens/s at the CPU time's rate (run wall {r.get('wall_s') or 0:.0f} s)", flush=True)
    return speeds


def meta_for(plan, args, argv, params: dict) -> dict:
    from pretrain.study.study import steps_for, tokens_per_step

    tasks = {}
    for tp in plan.tasks:
        mbs, seq, per_step = tokens_per_step(tp.config, tp.model_overrides)
        from pretrain.config import load_run_config

        cfg = load_run_config(tp.config, [f"data.tokenizer={tp.tokenizer}", *tp.model_overrides])
        n = params.get(tp.name)
        tasks[tp.name] = dict(model=f"{cfg.model.kind} preset '{cfg.model.preset}' ({Path(tp.config).name}"
                              + (", " + ", ".join(tp.model_overrides) if tp.model_overrides else "") + f"), {mbs} x {seq} tokens per step"
                              + (f", {n:,} parameters, tokenizer {Path(tp.tokenizer).name}" if n else ""),
                              kind=tp.task, parameters=n, tokens_per_param=tp.budget_tokens / n if n else None,
                              warmup_fraction=tp.warmup_fraction, hparams=tp.hparams,
                              budget_tokens=tp.budget_tokens, sweep_tokens=tp.sweep_tokens, tokens_per_step=per_step,
                              budget_steps=steps_for(tp.budget_tokens, per_step), seeds=list(plan.seeds),
                              zeroshot_limit=plan.zeroshot_limit, lr_grids={e.key: plan.lrs(e, tp) for e in plan.entries})
    import torch

    cmd = "python tools/compare_optimizers.py" + "".join(" " + shlex.quote(a) for a in argv)
    return dict(command=cmd, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
                        f"load average at the start {os.getloadavg()[0]:.1f}",
                optimizers=[e.key for e in plan.entries], max_extensions=plan.max_extensions,
                # the setup table's grid: the first task's (each task's sweep table has its own)
                lr_grids={e.key: plan.lrs(e, plan.tasks[0] if plan.tasks else None) for e in plan.entries},
                tasks=tasks)


def main(argv=None, run_fn=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from pretrain.study.report import write_report
    from pretrain.study.restore import restore_runs
    from pretrain.study.study import run_study, subprocess_run

    plan = build_plan(args)
    params = check_token_budgets(plan, args.min_tokens_per_param)
    for name, n in params.items():
        tp = next(t for t in plan.tasks if t.name == name)
        print(f"{name}: {n:,} parameters, {tp.budget_tokens:,} tokens per run = {tp.budget_tokens / n:.1f} per parameter")
    if args.plan:
        speeds = measure(plan, args.measure_steps) if args.measure_steps else None
        t = timing(plan, None, speeds, params)
        for r in t["rows"]:
            p = (f"{r['predicted_s'] / 60:.1f} min at the measured wall speed, {r['predicted_idle_s'] / 60:.1f} min idle"
                 + (" (extrapolated from another size)" if r["extrapolated"] else "")
                 if r["predicted_s"] and r["predicted_idle_s"] else "? (no tokens/s: add --measure-steps)")
            print(f"{r['task']:5s} {r['key']:14s} {r['runs']} runs, {r['tokens']:>9,} tokens, "
                  f"{r['tokens_per_s'] or 0:6.0f} tok/s wall, {r['idle_tokens_per_s'] or 0:6.0f} idle -> {p}")
        print(f"predicted training time: {t['predicted_total_s'] / 60:.1f} min at the measured wall speed, "
              f"{t['predicted_idle_total_s'] / 60:.1f} min on an idle machine (plus start-up, evaluation, zero-shot)")
        return 0
    meta = meta_for(plan, args, argv, params)
    from pretrain.data import bundled

    for tokenizer, cache in sorted({(tp.tokenizer, tp.cache_dir) for tp in plan.tasks}):
        bundled.prepare(cache, tokenizer)  # once, before runs side by side would each start preparing it
    restored = restore_runs(Path(args.out), Path(args.work_dir))
    if restored:
        print(f"restored {restored} finished runs from {Path(args.out) / 'results.json'} into {args.work_dir} "
              "(each is reused only if its spec matches this plan's)")
    study = run_study(plan, run_fn or subprocess_run)
    meta["timing"] = timing(plan, study, params=params)
    label = args.label or ("PARTIAL: the study is not finished; repeat the command to resume it" if study["partial"] else None)
    write_report(study, meta, Path(args.out), label)
    print(f"wrote {Path(args.out) / 'report.md'} ({study['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
