"""Plan and execute the study: per task and optimizer, an lr sweep (seed 0), extended outward
while its best lr sits at an edge of the grid (``max_extensions``), the best lr by final
validation loss, then the final runs at that lr for every seed, and zero-shot evaluation of each
final GPT model. Optimizers run side by side in ``jobs`` threads (each run is its own process);
after ``deadline`` no new run starts, finished ones are still collected, and the study is
marked partial.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .catalog import Entry, lr_grid

ROOT = Path(__file__).resolve().parents[2]


DEFAULT_TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")


@dataclass
class TaskPlan:
    task: str  # the trainer's task: "gpt" or "bert"
    config: str
    budget_tokens: int
    sweep_tokens: int
    model_overrides: list[str] = field(default_factory=list)
    zeroshot: bool = False
    name: str = ""  # the study's name for it (report section, run directory); default: task
    tokenizer: str = DEFAULT_TOKENIZER
    cache_dir: str = str(ROOT / "data/cache")  # one per tokenizer: the prepared corpus is tokenizer-specific
    lr_centers: dict = field(default_factory=dict)  # {optimizer key: lr centre} for this task only
    hparams: dict = field(default_factory=dict)  # {optimizer key: {hparam: value}} for this task only
    warmup_fraction: float | None = None  # of the run's steps; None: min(20, steps / 10)

    def __post_init__(self):
        self.name = self.name or self.task


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
    max_extensions: int = 0  # grid points added outward while the best lr sits at an edge
    jobs: int = 1  # optimizers trained side by side
    deadline: float | None = None  # time.time() after which no new run starts

    def lrs(self, entry: Entry, tp: TaskPlan | None = None) -> list[float]:
        center = (tp.lr_centers.get(entry.key) if tp is not None else None) or entry.lr_center
        return lr_grid(center, self.lrs_per_optimizer, self.lr_span_decades)


def tokens_per_step(config: str, overrides: list[str]) -> tuple[int, int, int]:
    """(micro_batch_size, seq_length, tokens per optimizer step) of a config on one process."""
    from pretrain.checkpoint import model_config
    from pretrain.config import load_run_config

    cfg = load_run_config(config, [f"data.tokenizer={DEFAULT_TOKENIZER}", *overrides])
    seq = model_config(cfg).seq_length  # the vocabulary does not change the tokens per step
    mbs = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return mbs, seq, mbs * seq


def model_parameters(tp: TaskPlan) -> int:
    """Parameters of the task's model (tied embeddings counted once), built once on this process."""
    import torch.distributed as dist

    from pretrain.checkpoint import model_config
    from pretrain.config import load_run_config
    from pretrain.data.tokenizer import load_tokenizer
    from pretrain.models import build_bert, build_gpt, count_parameters, destroy_model_parallel, init_model_parallel

    cfg = load_run_config(tp.config, [f"data.tokenizer={tp.tokenizer}", *tp.model_overrides])
    mcfg = model_config(cfg, load_tokenizer(tp.tokenizer).vocab_size, kind=tp.task)
    had_group = dist.is_available() and dist.is_initialized()
    init_model_parallel(1)
    try:
        return count_parameters((build_gpt if tp.task == "gpt" else build_bert)(mcfg, seed=0))
    finally:
        destroy_model_parallel(destroy_process_group=not had_group)


def steps_for(tokens: int, per_step: int) -> int:
    return max(2, round(tokens / per_step))


def train_spec(plan: StudyPlan, tp: TaskPlan, entry: Entry, lr: float, seed: int, phase: str, tokens: int,
               keep_checkpoint: bool, zeroshot: bool) -> dict:
    _, _, per_step = tokens_per_step(tp.config, tp.model_overrides)
    steps = steps_for(tokens, per_step)
    name = f"{entry.key}_lr{lr:.3g}_s{seed}_{steps}steps"
    out = Path(plan.work_dir) / tp.name / name
    hparams = {**entry.hparams, **tp.hparams.get(entry.key, {})}
    warmup = min(20, steps // 10) if tp.warmup_fraction is None else round(tp.warmup_fraction * steps)
    overrides = [
        f"output_dir={out}", f"data.tokenizer={tp.tokenizer}",
        f"data.cache_dir={tp.cache_dir}", f"optimizer.name={entry.optimizer}", f"optimizer.lr={lr}",
        f"optimizer.hparams={json.dumps(hparams)}", f"train.steps={steps}", f"train.seed={seed}",
        f"train.eval_every={max(1, steps // plan.evals_per_run)}", f"train.log_every={max(1, steps // 50)}",
        "train.progress_bar=false", f"schedule.warmup_steps={warmup}",
        "checkpoint.every=0", f"checkpoint.save_final={str(keep_checkpoint or zeroshot).lower()}",
        "checkpoint.resume=none", *tp.model_overrides,
    ]
    return dict(kind="train", name=name, task=tp.task, config=tp.config, overrides=overrides, output_dir=str(out),
                key=entry.key, label=entry.label, optimizer=entry.optimizer, hparams=hparams, lr=lr,
                seed=seed, phase=phase, tokens_budget=tokens, steps=steps, tokens_per_step=per_step,
                run_zeroshot=zeroshot, zeroshot_limit=plan.zeroshot_limit, keep_checkpoint=keep_checkpoint,
                # runs side by side share the cores (not part of what is trained: see same_spec)
                **({"threads": max(1, (os.cpu_count() or 1) // plan.jobs)} if plan.jobs > 1 else {}))


def _spec_root(spec: dict) -> str:
    """The checkout a spec was made in: its config's grandparent (<root>/configs/x.yaml)."""
    return str(Path(spec.get("config") or ROOT / "configs" / "x").parent.parent)


def same_spec(old: dict, spec: dict) -> bool:
    """Whether a stored result was made from ``spec``, up to the checkout's location: a study
    run from another clone or worktree of the repository (absolute paths under another root)
    still finds its runs."""
    roots = sorted({_spec_root(old), _spec_root(spec), str(ROOT)}, key=len, reverse=True)

    def portable(value):
        if isinstance(value, list):  # where the run is written is not what it trains
            value = [v for v in value if not (isinstance(v, str) and v.startswith("output_dir="))]
        text = json.dumps(value, sort_keys=True)
        for root in roots:
            text = text.replace(root, "<root>")
        return text

    # keep_checkpoint, threads and the label do not change what is trained; nor does output_dir
    # (the result was found in it, and one sitting passes --work-dir relative, the next absolute)
    return all(portable(old.get(k)) == portable(v) for k, v in spec.items()
               if k not in ("keep_checkpoint", "threads", "label", "output_dir"))


def finished_result(spec: dict) -> dict | None:
    """The result an earlier invocation wrote for this very spec, or None."""
    done = Path(spec["output_dir"]) / ("result.json" if spec["kind"] == "train" else "eval_result.json")
    if done.is_file():
        old = json.loads(done.read_text())
        if same_spec(old, spec):
            return dict(old, reused=True, **({"label": spec["label"]} if "label" in spec else {}))
    return None


def subprocess_run(spec: dict) -> dict:
    """The default run function: the worker in a fresh process; a finished result with the same
    spec is reused (so an interrupted study resumes where it stopped)."""
    out = Path(spec["output_dir"])
    done = out / ("result.json" if spec["kind"] == "train" else "eval_result.json")
    old = finished_result(spec)
    if old is not None:
        return old
    if spec["kind"] == "train" and out.exists():
        shutil.rmtree(out)  # a half-finished run: metrics.jsonl would be appended to
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / ("spec.json" if spec["kind"] == "train" else "eval_spec.json")
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    if spec.get("threads"):  # runs side by side share the cores
        env["OMP_NUM_THREADS"] = str(spec["threads"])
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


def extend_grid(lrs: list[float], best: float) -> float | None:
    """The next lr beyond the edge where ``best`` sits (same log spacing), or None if it is interior."""
    lrs = sorted(lrs)
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    ratio = lrs[1] / lrs[0]
    return float(f"{(lrs[0] / ratio if best == lrs[0] else lrs[-1] * ratio):.3g}")


def _missing(spec: dict) -> dict:
    return dict(spec, missing=True, final_val_loss=None)


def run_entry(plan: StudyPlan, tp: TaskPlan, entry: Entry, run_fn: Callable[[dict], dict], log=print) -> dict:
    """One optimizer on one task: the sweep (extended at its edges), then the final runs.
    Returns {"sweep": [...], "final": [...], "best_lr": lr or None, "failed": bool, "complete": bool}."""
    reuse = tp.sweep_tokens == tp.budget_tokens
    out = dict(sweep=[], final=[], best_lr=None, failed=False, complete=False)

    def train(lr, seed, phase, tokens, keep, zeroshot):
        spec = train_spec(plan, tp, entry, lr, seed, phase, tokens, keep_checkpoint=keep, zeroshot=zeroshot)
        if plan.deadline is not None and time.time() > plan.deadline:
            return finished_result(spec) or _missing(spec)
        log(f"[{tp.name}] {phase} {entry.key} lr={lr:.3g} seed={seed} ({spec['steps']} steps)")
        r = run_fn(spec)
        log(f"[{tp.name}] {phase} {entry.key} lr={lr:.3g} seed={seed} -> val loss {r.get('final_val_loss')}"
            + (f"  FAILED: {r.get('error')}" if r.get("failed") else ""))
        return r

    keep = reuse and tp.zeroshot
    sweep = {lr: train(lr, plan.seeds[0], "sweep", tp.sweep_tokens, keep, False) for lr in plan.lrs(entry, tp)}
    for _ in range(plan.max_extensions):
        if any(r.get("missing") for r in sweep.values()):
            break
        try:
            new = extend_grid(list(sweep), best_lr(list(sweep.values())))
        except RuntimeError:
            break
        if new is None:
            break
        sweep[new] = train(new, plan.seeds[0], "sweep", tp.sweep_tokens, keep, False)
    out["sweep"] = [sweep[lr] for lr in sorted(sweep)]
    if any(r.get("missing") for r in out["sweep"]):
        return out
    try:
        lr = out["best_lr"] = best_lr(out["sweep"])
    except RuntimeError:
        out["failed"] = True
        log(f"[{tp.name}] {entry.key}: every sweep run failed; no final runs")
        return out
    for seed in plan.seeds:
        if reuse and seed == plan.seeds[0]:
            best = dict(sweep[lr])
            if tp.zeroshot:
                z = run_fn(eval_spec(best, plan.zeroshot_limit))
                best["zeroshot"] = z.get("zeroshot")
                best["zeroshot_wall_s"] = z.get("process_wall_s") or z.get("zeroshot_wall_s")
            best["reused_from_sweep"] = True
            out["final"].append(best)
            continue
        out["final"].append(train(lr, seed, "final", tp.budget_tokens, False, tp.zeroshot))
    for r in out["sweep"]:  # kept only for the zero-shot evaluation of the reused run
        ck = Path(r["output_dir"]) / "checkpoints"
        if ck.exists():
            shutil.rmtree(ck, ignore_errors=True)
    out["complete"] = not any(r.get("missing") for r in out["final"])
    out["final"] = [r for r in out["final"] if not r.get("missing")]
    return out


def run_study(plan: StudyPlan, run_fn: Callable[[dict], dict] = subprocess_run, log=print) -> dict:
    """Execute ``plan``; returns {"tasks": {name: {"task", "sweep", "final", "best_lr": {key: lr},
    "failed_sweep", "incomplete"}}, "partial": bool, "wall_s": ...}. Runs not started before the
    deadline appear in "sweep" with ``missing=True``."""
    t0 = time.perf_counter()
    out: dict = {"tasks": {tp.name: {"task": tp.task, "sweep": [], "final": [], "best_lr": {}, "failed_sweep": [],
                                     "incomplete": []} for tp in plan.tasks}}
    # the cheapest tasks first, so that a sitting cut by the deadline leaves whole tasks finished
    jobs = [(tp, e) for tp in sorted(plan.tasks, key=lambda t: t.budget_tokens) for e in plan.entries]
    with ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        results = list(pool.map(lambda job: run_entry(plan, job[0], job[1], run_fn, log), jobs))
    for (tp, entry), r in zip(jobs, results):
        t = out["tasks"][tp.name]
        t["sweep"].extend(x for x in r["sweep"] if not x.get("missing"))
        t["final"].extend(r["final"])
        if r["failed"]:
            t["failed_sweep"].append(entry.key)
        elif not r["complete"]:
            t["incomplete"].append(entry.key)
        if r["best_lr"] is not None:
            t["best_lr"][entry.key] = r["best_lr"]
    out["partial"] = any(t["incomplete"] for t in out["tasks"].values())
    out["wall_s"] = time.perf_counter() - t0
    return out
