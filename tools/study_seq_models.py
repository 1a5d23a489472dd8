#!/usr/bin/env python
"""Seed 000's experiments: AdaLomo vs Adam vs SGD (plus Adafactor) on a word-level LSTM language
model and an LSTM encoder-decoder, on the bundled corpus (tools/seq_tasks.py says what the tasks
are). Writes docs/results/seq_models/{runs.jsonl,report.md,*.png}.

    python tools/study_seq_models.py                    # the full study (resumes; see --plan)
    python tools/study_seq_models.py --plan             # the runs and a predicted wall time
    python tools/study_seq_models.py --tasks lstm_lm --optimizers adam,adalomo --steps 20 \\
        --seeds 1 --out /tmp/smoke --tiny              # a pipeline check

Per task and optimizer: the lr grid (4 log-spaced points, half a decade apart) is trained with
the first seed; when the best final validation loss sits at an edge of the grid, the grid is
extended by one point on that side (up to --max-extensions times), so the optimum is interior.
The best lr is then trained with every other seed. The runs are trained one after another in one
worker process (``Worker``) and appended to runs.jsonl as they finish; a rerun skips finished runs.
Memory per run: the optimizer state really held (memopt.base.optimizer_state_bytes) and the peak
RSS of the training steps above the RSS before the first step (weights and data included in the
baseline; gradients, optimizer state and activations in the peak), measured as
tools/bench_memory.py does (kernel high-water mark, every allocation >= 64 KiB its own mmap).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

HALF_DECADE = 10 ** 0.5
# key: (label, lr grid centre (the grid is centre x 10^{-0.75, -0.25, 0.25, 0.75}), notes)
OPTIMIZERS = {
    "sgd": ("SGD", 3.0, "torch.optim.SGD, no momentum; global grad-norm clip 1.0"),
    "adam": ("Adam", 3e-3, "torch.optim.Adam, betas (0.9, 0.999), eps 1e-8; global grad-norm clip 1.0"),
    "adafactor": ("Adafactor", 3e-2, "memopt.Adafactor, beta1=None, relative_step=False; global grad-norm clip 1.0"),
    "adalomo": ("AdaLomo (fused)", 3e-2, "memopt.AdaLomo, fused backward, no global clip (grouped update normalization)"),
}
SEEDS = (1, 2, 3)
DEFAULT_STEPS = {"lstm_lm": 200, "seq2seq_reverse": 100}


def lr_grid(center: float, n: int = 4) -> list[float]:
    """``n`` lrs half a decade apart, centred geometrically on ``center``."""
    return [float(f"{center * HALF_DECADE ** (i - (n - 1) / 2):.3g}") for i in range(n)]


def lr_multiplier(step: int, total: int) -> float:
    """5% linear warm-up, then cosine to 10% of the base lr."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(key: str, params, lr: float):
    import torch

    import memopt

    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr)
    if key == "adafactor":
        return memopt.create_optimizer("adafactor", params, lr=lr, relative_step=False)
    if key == "adalomo":
        return memopt.create_optimizer("adalomo", params, lr=lr, clip_grad_norm=None)
    raise ValueError(f"unknown optimizer {key!r}; choices: {', '.join(OPTIMIZERS)}")


def task_for(spec: dict):
    import seq_tasks

    cls = seq_tasks.TASKS[spec["task"]]
    return cls(dataclasses.replace(cls.default_size, **spec.get("size", {})))


# -- one run (in the worker process) -------------------------------------------------------------
def update(opt, loss, params, fused: bool) -> None:
    """One optimizer update from ``loss``: inside the backward for fused-backward optimizers,
    else backward, global grad-norm clip at 1.0, step."""
    import torch

    if fused:
        opt.fused_backward(loss)
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def train_run(spec: dict) -> dict:
    import warnings

    import torch

    import bench_memory
    from memopt.base import optimizer_state_bytes

    # fused_backward updates inside backward, so LambdaLR never sees optimizer.step() and warns
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    task = task_for(spec)
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    model = task.model()
    params = list(model.parameters())
    opt = build_optimizer(spec["optimizer"], params, spec["lr"])
    fused = hasattr(opt, "fused_backward")
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, steps))
    eval_at = {round(steps * (i + 1) / spec["evals"]) for i in range(spec["evals"])}
    curve, train_curve, peak = [], [], 0
    bench_memory.trim()
    bench_memory.reset_hwm()
    baseline = bench_memory.rss()
    cpu0, wall0, failed = time.process_time(), time.perf_counter(), False
    for step in range(1, steps + 1):
        loss = task.train_loss(model, rng)
        if not torch.isfinite(loss):
            failed = True
            break
        update(opt, loss, params, fused)
        sched.step()
        train_curve.append([step, loss.item()])
        if step in eval_at:
            peak = max(peak, bench_memory.hwm() - baseline)  # the steps' peak, before evaluation
            curve.append(dict(step=step, **task.evaluate(model)))
            bench_memory.reset_hwm()
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    final = curve[-1]["val_loss"] if curve and not failed else None
    return dict(
        spec, failed=failed or final is None or not math.isfinite(final),
        final_val_loss=final if final is not None and math.isfinite(final) else None,
        final=curve[-1] if curve else None, val_curve=curve, train_curve=train_curve[:: max(1, steps // 100)],
        optimizer_state_bytes=optimizer_state_bytes(opt), param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params), peak_train_rss_bytes=peak,
        baseline_rss_bytes=baseline, fused_backward=fused, train_wall_s=train_wall, train_cpu_s=train_cpu,
        run_wall_s=time.perf_counter() - t_start,
    )


# -- the study -------------------------------------------------------------------------------------
KEY_FIELDS = ("task", "optimizer", "lr", "seed", "steps", "size")  # what makes two runs the same run


def run_key(spec: dict, fields=KEY_FIELDS) -> str:
    return json.dumps({k: spec[k] for k in fields}, sort_keys=True)


class Worker:
    """One long-lived worker process that trains the runs one after another (``--serve``: a spec
    per stdin line, a ``RESULT {...}`` line back): torch's import costs more than a small run on
    a loaded machine. Each run's peak is still its own: the high-water mark is reset to the
    current RSS before its first step, and with every allocation >= 64 KiB its own mmap the
    previous runs' freed tensors are back with the kernel. A worker that dies is restarted."""

    ENV = dict(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")

    def __init__(self, script: str = __file__):
        self.script, self.proc = script, None

    def __call__(self, spec: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, self.script, "--serve"], env=dict(os.environ, **self.ENV),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.proc = None
        return dict(spec, failed=True, final_val_loss=None, error="the worker process died (see its stderr)")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def missing_run(spec: dict) -> dict:
    """The run function of --report-only: a run not in runs.jsonl is reported as missing."""
    return dict(spec, failed=True, missing=True, final_val_loss=None)


def serve(train_fn=None) -> None:
    """The worker's loop: a spec per stdin line, ``train_fn(spec)``'s result back as a line."""
    for line in sys.stdin:
        spec = json.loads(line)
        try:
            result = (train_fn or train_run)(spec)
        except Exception as e:  # a crash is a failed run; the study goes on
            result = dict(spec, failed=True, final_val_loss=None, error=f"{type(e).__name__}: {e}")
        print("RESULT " + json.dumps(result), flush=True)


class Study:
    """Runs specs once each: results live in ``runs.jsonl``, one line per finished run."""

    def __init__(self, out: Path, run_fn, log=print, key_fields=KEY_FIELDS):
        self.path = out / "runs.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.key_fields = key_fields
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.is_file() else []
        self.results = {run_key(r, key_fields): r for r in rows}
        self.run_fn, self.log = run_fn, log

    def get(self, spec: dict) -> dict:
        key = run_key(spec, self.key_fields)
        if key not in self.results:
            t0 = time.perf_counter()
            result = self.run_fn(spec)
            if result.get("missing"):  # --report-only: not trained, not recorded
                return result
            result["wall_s"] = time.perf_counter() - t0
            with self.path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            self.results[key] = result
            loss = result.get("final_val_loss")
            self.log(f"{spec.get('task', '')} {spec['optimizer']} lr={spec['lr']:.3g} seed={spec['seed']}: "
                     f"val {loss if loss is None else round(loss, 4)} ({result['wall_s']:.0f} s)", flush=True)
        return self.results[key]


def score(result: dict) -> float:
    loss = result.get("final_val_loss")
    return loss if loss is not None and not result.get("failed") else math.inf


def sweep(study: Study, base: dict, key: str, center: float, max_extensions: int,
          points: int = 4) -> tuple[float, list[dict]]:
    """The lr sweep of one optimizer: the grid, extended outward while the best is at an edge."""
    lrs = lr_grid(center, points)
    runs = {lr: study.get(dict(base, optimizer=key, lr=lr)) for lr in lrs}
    for _ in range(max_extensions):
        best = min(lrs, key=lambda lr: score(runs[lr]))
        if lrs[0] < best < lrs[-1] or runs[best].get("missing"):
            break
        new = float(f"{(lrs[0] / HALF_DECADE if best == lrs[0] else lrs[-1] * HALF_DECADE):.3g}")
        lrs = sorted(lrs + [new])
        runs[new] = study.get(dict(base, optimizer=key, lr=new))
    best = min(lrs, key=lambda lr: score(runs[lr]))
    return best, [runs[lr] for lr in lrs]


def base_spec(args, task: str) -> dict:
    steps = args.steps or DEFAULT_STEPS[task]
    return dict(task=task, steps=steps, evals=args.evals, seed=args.seeds[0],
                size=TINY_SIZE[task] if args.tiny else {})


TINY_SIZE = {"lstm_lm": dict(vocab=300, embed=16, hidden=16, batch=4, bptt=8, train_words=3000, val=600),
             "seq2seq_reverse": dict(vocab=300, embed=16, hidden=16, batch=8, train_words=3000, val=40)}


def run_study(args, study: Study) -> dict:
    out = {}
    for task in args.tasks:
        base = base_spec(args, task)
        out[task] = {}
        for key in args.optimizers:
            best, sweep_runs = sweep(study, base, key, OPTIMIZERS[key][1], args.max_extensions)
            finals = [study.get(dict(base, optimizer=key, lr=best, seed=s)) for s in args.seeds]
            out[task][key] = dict(best_lr=best, sweep=sweep_runs, finals=finals)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="lstm_lm,seq2seq_reverse")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="the first one is the sweep seed")
    ap.add_argument("--steps", type=int, default=None, help=f"steps per run (default {DEFAULT_STEPS})")
    ap.add_argument("--evals", type=int, default=8, help="validation points per run")
    ap.add_argument("--max-extensions", type=int, default=3, help="grid points added when the best lr is at an edge")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data (tests, pipeline checks)")
    ap.add_argument("--out", default=str(ROOT / "docs/results/seq_models"))
    ap.add_argument("--label", default=None, help='printed at the top of the report, e.g. "PARTIAL"')
    ap.add_argument("--plan", action="store_true", help="print the runs and a predicted time (one timed run per task)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the finished runs; train nothing (runs not yet done show as missing)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    for t in args.tasks:
        if t not in DEFAULT_STEPS:
            ap.error(f"unknown task {t!r}; choices: {', '.join(DEFAULT_STEPS)}")
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}; choices: {', '.join(OPTIMIZERS)}")
    if not args.seeds:
        ap.error("--seeds needs at least one seed")
    return args


def plan(args, worker) -> None:
    """One timed run per task (Adam, centre lr, 1/10 of the steps) and the arithmetic."""
    total = 0.0
    for task in args.tasks:
        base = base_spec(args, task)
        probe = dict(base, optimizer="adam", lr=1e-3, steps=max(2, base["steps"] // 10), evals=1)
        r = worker(probe)
        per_step = r["train_wall_s"] / probe["steps"]
        runs = len(args.optimizers) * (4 + len(args.seeds) - 1)
        est = runs * (base["steps"] * per_step + (r["run_wall_s"] - r["train_wall_s"]))
        total += est
        print(f"{task}: {runs} runs (without grid extensions) x {base['steps']} steps, {per_step * 1000:.0f} ms/step "
              f"measured now -> about {est / 60:.1f} min")
    print(f"predicted: about {total / 60:.1f} min (each grid extension adds one run)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve()
        return 0
    worker = Worker()
    if args.plan:
        plan(args, worker)
        worker.close()
        return 0
    from seq_models_report import write_report

    t0 = time.perf_counter()
    study = Study(Path(args.out), missing_run if args.report_only else worker)
    try:
        results = run_study(args, study)
    finally:
        worker.close()
    cmd = "python tools/study_seq_models.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_report(results, Path(args.out), dict(command=cmd, label=args.label, sitting_wall_s=time.perf_counter() - t0,
                                               optimizers={k: OPTIMIZERS[k] for k in args.optimizers}))
    print(f"wrote {Path(args.out) / 'report.md'} ({(time.perf_counter() - t0) / 60:.1f} min this sitting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
