"""Plan and execute the study: per task and optimizer, an lr sweep (seed 0), the best lr by
final validation loss, then the final runs at that lr for every seed, and zero-shot evaluation
of each final GPT model.

Every run gets the same seed-determined initialization and data order as the other optimizers'
runs of that seed (the trainer's ``train.seed`` fixes both). When the sweep budget equals the
final budget, the best sweep run *is* the first seed's final run (same config, same seed): it is
reused, not repeated, and only its zero-shot evaluation is added.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .catalog import Entry, lr_grid

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TaskPlan:
    task: str  # "gpt" or "bert"
    config: str
    budget_tokens: int
    sweep_tokens: int
    model_overrides: list[str] = field(default_factory=list)
    zeroshot: bool = False


@dataclass
class StudyPlan:
    tasks: list[TaskPlan]
    entries: list[Entry]
    lrs_per_optimizer: int = 3
    lr_span_decades: float = 1.0
    seeds: tuple[int, ...] = (1234, 1235)
    evals_per_run: int = 6
    zeroshot_limit: int | None = None
    work_dir: str = "runs/optimizer_study"

    def lrs(self, entry: Entry) -> list[float]:
        return lr_grid(entry.lr_center, self.lrs_per_optimizer, self.lr_span_decades)


def tokens_per_step(config: str, overrides: list[str]) -> tuple[int, int, int]:
    """(micro_batch_size, seq_length, tokens per optimizer step) of a config on one process."""
    from pretrain.checkpoint import model_config
    from pretrain.config import load_run_config

    cfg = load_run_config(config, [f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}", *overrides])
    seq = model_config(cfg).seq_length  # the vocabulary does not change the tokens per step
    mbs = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return mbs, seq, mbs * seq


def steps_for(tokens: int, per_step: int) -> int:
    return max(2, round(tokens / per_step))


def train_spec(plan: StudyPlan, tp: TaskPlan, entry: Entry, lr: float, seed: int, phase: str, tokens: int,
               keep_checkpoint: bool, zeroshot: bool) -> dict:
    _, _, per_step = tokens_per_step(tp.config, tp.model_overrides)
    steps = steps_for(tokens, per_step)
    name = f"{entry.key}_lr{lr:.3g}_s{seed}_{steps}steps"
    out = Path(plan.work_dir) / tp.task / name
    overrides = [
        f"output_dir={out}", f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}",
        f"data.cache_dir={ROOT / 'data/cache'}", f"optimizer.name={entry.optimizer}", f"optimizer.lr={lr}",
        f"optimizer.hparams={json.dumps(entry.hparams)}", f"train.steps={steps}", f"train.seed={seed}",
        f"train.eval_every={max(1, steps // plan.evals_per_run)}", f"train.log_every={max(1, steps // 50)}",
        "train.progress_bar=false", f"schedule.warmup_steps={min(20, steps // 10)}",
        "checkpoint.every=0", f"checkpoint.save_final={str(keep_checkpoint or zeroshot).lower()}",
        "checkpoint.resume=none", *tp.model_overrides,
    ]
    return dict(kind="train", name=name, task=tp.task, config=tp.config, overrides=overrides, output_dir=str(out),
                key=entry.key, label=entry.label, optimizer=entry.optimizer, hparams=entry.hparams, lr=lr,
                seed=seed, phase=phase, tokens_budget=tokens, steps=steps, tokens_per_step=per_step,
                run_zeroshot=zeroshot, zeroshot_limit=plan.zeroshot_limit, keep_checkpoint=keep_checkpoint)


def subprocess_run(spec: dict) -> dict:
    """The default run function: the worker in a fresh process; a finished result with the same
    spec is reused (so an interrupted study resumes where it stopped)."""
    out = Path(spec["output_dir"])
    done = out / ("result.json" if spec["kind"] == "train" else "eval_result.json")
    if done.is_file():
        old = json.loads(done.read_text())
        if all(old.get(k) == v for k, v in spec.items() if k != "keep_checkpoint"):
            return dict(old, reused=True)
    if spec["kind"] == "train" and out.exists():
        shutil.rmtree(out)  # a half-finished run: metrics.jsonl would be appended to
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / ("spec.json" if spec["kind"] == "train" else "eval_spec.json")
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    with open(out / f"{spec['kind']}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "pretrain.study.worker", str(spec_path)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not done.is_file():
        return dict(spec, failed=True, error=f"worker exited {proc.returncode}; see {out / (spec['kind'] + '.log')}",
                    final_val_loss=None, process_wall_s=time.perf_counter() - t0)
    result = json.loads(done.read_text())
    result["process_wall_s"] = time.perf_counter() - t0  # incl. interpreter start-up and imports
    done.write_text(json.dumps(result, indent=1, default=str))
    return result


def inprocess_run(spec: dict) -> dict:
    """Run the worker in this process (tests, quick checks). Peak RSS is then this process's
    peak so far, not the run's own: use ``subprocess_run`` for memory numbers."""
    from . import worker

    worker.register_optimizer(spec)
    if spec["kind"] == "train" and Path(spec["output_dir"]).exists():
        shutil.rmtree(spec["output_dir"])
    result = worker.run(spec) if spec["kind"] == "train" else worker.evaluate_only(spec)
    Path(spec["output_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["output_dir"]) / worker.result_file(spec)).write_text(json.dumps(result, indent=1, default=str))
    return json.loads(json.dumps(result, default=str))


def eval_spec(result: dict, limit: int | None) -> dict:
    return dict(kind="eval", name=result["name"], task=result["task"], output_dir=result["output_dir"],
                checkpoint_dir=str(Path(result["output_dir"]) / "checkpoints"), zeroshot_limit=limit)


def sweep_loss(result: dict) -> float:
    v = result.get("final_val_loss")
    return v if (v is not None and not result.get("failed") and math.isfinite(v)) else math.inf


def best_lr(sweep: list[dict]) -> float:
    """The lr whose sweep run ends at the lowest validation loss (failed/diverged runs never win;
    ties go to the smaller lr)."""
    ranked = sorted(sweep, key=lambda r: (sweep_loss(r), r["lr"]))
    if not ranked or not math.isfinite(sweep_loss(ranked[0])):
        raise RuntimeError("every sweep run failed")
    return ranked[0]["lr"]


def run_study(plan: StudyPlan, run_fn: Callable[[dict], dict] = subprocess_run, log=print) -> dict:
    """Execute ``plan``; returns {"tasks": {task: {"sweep": [...], "final": [...], "best_lr": {key: lr}}},
    "wall_s": ...}."""
    t0 = time.perf_counter()
    out: dict = {"tasks": {}}
    for tp in plan.tasks:
        reuse = tp.sweep_tokens == tp.budget_tokens
        task_out = out["tasks"][tp.task] = {"sweep": [], "final": [], "best_lr": {}, "failed_sweep": []}
        for entry in plan.entries:
            sweep = []
            for lr in plan.lrs(entry):
                spec = train_spec(plan, tp, entry, lr, plan.seeds[0], "sweep", tp.sweep_tokens,
                                  keep_checkpoint=reuse and tp.zeroshot, zeroshot=False)
                log(f"[{tp.task}] sweep {entry.key} lr={lr:.3g} ({spec['steps']} steps)")
                r = run_fn(spec)
                log(f"    -> val loss {r.get('final_val_loss')}" + (f"  FAILED: {r.get('error')}" if r.get("failed") else ""))
                sweep.append(r)
            task_out["sweep"].extend(sweep)
            try:
                lr = best_lr(sweep)
            except RuntimeError:
                task_out["failed_sweep"].append(entry.key)
                log(f"[{tp.task}] {entry.key}: every sweep run failed; no final runs")
                continue
            task_out["best_lr"][entry.key] = lr
            for seed in plan.seeds:
                if reuse and seed == plan.seeds[0]:
                    best = dict(next(r for r in sweep if r["lr"] == lr))
                    if tp.zeroshot:
                        z = run_fn(eval_spec(best, plan.zeroshot_limit))
                        best["zeroshot"] = z.get("zeroshot")
                        best["zeroshot_wall_s"] = z.get("process_wall_s") or z.get("zeroshot_wall_s")
                    best["reused_from_sweep"] = True
                    task_out["final"].append(best)
                    continue
                spec = train_spec(plan, tp, entry, lr, seed, "final", tp.budget_tokens,
                                  keep_checkpoint=False, zeroshot=tp.zeroshot)
                log(f"[{tp.task}] final {entry.key} lr={lr:.3g} seed={seed}")
                r = run_fn(spec)
                log(f"    -> val loss {r.get('final_val_loss')}")
                task_out["final"].append(r)
            for r in sweep:  # kept only for the zero-shot evaluation of the reused run
                ck = Path(r["output_dir"]) / "checkpoints"
                if ck.exists():
                    shutil.rmtree(ck, ignore_errors=True)
    out["wall_s"] = time.perf_counter() - t0
    return out
