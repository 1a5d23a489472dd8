#!/usr/bin/env python
"""The four precisions of AdaLomo on the tiny GPT, same data and seed: validation loss curves and
peak memory (CPU; see docs/benchmarks/precision.md).

    fp32            fp32 weights and compute
    bf16            bf16 compute (autocast) over fp32 master weights   train.precision=bf16
    bf16_pure       bf16 weights, updates rounded to nearest           train.precision=bf16_pure
    bf16_pure_sr    bf16 weights, updates rounded stochastically       + optimizer.hparams.stochastic_rounding

Every mode trains in a fresh Python process (``--mode NAME``, the internal mode), with the RSS
recipe of tools/bench_memory.py (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_ARENA_MAX=2``,
``OMP_NUM_THREADS=1``; the high-water mark is reset after the imports, that RSS is the baseline).
It reports **peak** = the RSS high-water mark of the whole run (model build, data, training,
validation) minus that baseline, and **weights + state** = the bytes of the parameters and of the
optimizer state (the tensors themselves, no allocator).

    nice -n 15 python tools/bench_precision.py                  # all four, writes docs/benchmarks/precision.*
    python tools/bench_precision.py --mode bf16_pure_sr --steps 20   # one mode, JSON on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

MODES = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16_pure": ["train.precision=bf16_pure"],
    "bf16_pure_sr": ["train.precision=bf16_pure", "optimizer.hparams={stochastic_rounding: true}"],
}
LABELS = {
    "fp32": "fp32",
    "bf16": "bf16 compute + fp32 masters",
    "bf16_pure": "pure bf16 (round to nearest)",
    "bf16_pure_sr": "pure bf16 + stochastic rounding",
}
ENV = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1",
           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
MB = 2**20
# What the report says about a run; saved with its numbers, so --render needs no flags.
SETTINGS = ("config", "steps", "eval_every", "eval_iters", "lrs", "memory_config", "memory_steps")


def run_overrides(args, out_dir: str, mode: str) -> list[str]:
    # The memory runs (--memory-config) train a few steps without validation.
    return [
        f"output_dir={out_dir}", f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        f"train.eval_iters={args.eval_iters}", f"train.log_every={args.log_every}", "train.progress_bar=false",
        f"optimizer.lr={args.lr}", "optimizer.name=adalomo", "engine.kind=single",
        "checkpoint.every=0", "checkpoint.save_final=false", *MODES[mode],
    ]


def measure(args) -> dict:
    """One mode in this process (started by ``main`` with the ENV recipe)."""
    from bench_memory import Meter, hwm

    from pretrain.config import load_run_config
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_run_config(str(ROOT / args.config), run_overrides(args, out_dir, args.mode))
        meter = Meter()
        trainer = Trainer(cfg, GPT)
        t0 = time.perf_counter()
        summary = trainer.fit()
        wall = time.perf_counter() - t0
        peak = hwm() - meter.baseline
        rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    params = list(trainer.engine.module.parameters())
    return dict(
        mode=args.mode, steps=summary["steps"], wall_seconds=round(wall, 1), peak_bytes=peak,
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        state_bytes=trainer.engine.optimizer.state_bytes(), num_params=sum(p.numel() for p in params),
        weight_dtype=str(params[0].dtype).removeprefix("torch."),
        val_loss={r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
        train_loss={r["step"]: r["loss"] for r in rows if "loss" in r},
    )


def start_mode(args, mode: str, lr: float, memory: bool = False) -> subprocess.Popen:
    config, steps, every = (args.memory_config, args.memory_steps, 0) if memory else (args.config, args.steps,
                                                                                         args.eval_every)
    cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(steps), "--eval-every", str(every),
           "--eval-iters", str(args.eval_iters), "--log-every", str(args.log_every), "--lr", str(lr),
           "--config", config]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ENV),
                            cwd=ROOT)


def run_modes(args, lr: float, memory: bool = False) -> dict:
    """Every mode in its own process: all at once with --parallel (wall times then share the CPU)."""
    results, running = {}, []
    for mode in args.modes:
        running.append((mode, start_mode(args, mode, lr, memory)))
        if not args.parallel:
            results.update(_collect([running.pop()], memory))
    results.update(_collect(running, memory))
    return {mode: results[mode] for mode in args.modes}


def _collect(running, memory: bool) -> dict:
    out = {}
    for mode, proc in running:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{stderr[-3000:]}")
        out[mode] = res = json.loads(stdout.strip().splitlines()[-1])
        val = f"final val {_final(res):.4f}  " if res["val_loss"] else ""
        print(f"{mode:14s} {'memory run ' if memory else ''}{val}peak {res['peak_bytes'] / MB:7.1f} MiB  weights+state "
              f"{(res['weight_bytes'] + res['state_bytes']) / MB:6.2f} MiB  ({res['wall_seconds']} s)", flush=True)
    return out


def _final(res: dict) -> float:
    return res["val_loss"][max(res["val_loss"], key=int)]


def plot(curves: dict, path: Path) -> None:
    """One panel per learning rate: ``curves`` is {lr: {mode: result}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.2), squeeze=False)
    for ax, (lr, results) in zip(axes[0], curves.items()):
        for mode, res in results.items():
            steps = sorted(res["val_loss"], key=int)
            ax.plot([int(s) for s in steps], [res["val_loss"][s] for s in steps], marker="o", ms=3, label=LABELS[mode])
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"AdaLomo, tiny GPT, lr {lr} (CPU)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def memory_table(results: dict, args) -> list[str]:
    ref = results["fp32"]
    lines = [
        "", f"## Memory on the GPT of `{args.memory_config}`", "",
        f"{ref['num_params'] / 1e6:.2f}M parameters, {args.memory_steps} training steps per mode at lr "
        f"{args.lrs[0]} (no validation), same recipe: the weights' share of the peak is large enough here to see "
        "what each mode saves.", "",
        "| mode | weights | weights + optimizer state | peak RSS above baseline | wall / step (set-up included) |",
        "|---|---|---|---|---|",
    ]
    for mode, res in results.items():
        lines.append(f"| {LABELS[mode]} | {res['weight_dtype']} | {(res['weight_bytes'] + res['state_bytes']) / MB:.1f} MiB | "
                     f"{res['peak_bytes'] / MB:.1f} MiB | {res['wall_seconds'] / res['steps']:.2f} |")
    return lines


def markdown(curves: dict, args, command: str, memory: dict | None = None) -> str:
    ref = next(iter(curves.values()))["fp32"]
    lines = [
        "# Precision: fp32, bf16 + fp32 masters, pure bf16, pure bf16 + stochastic rounding (CPU)",
        "",
        f"AdaLomo (cosine schedule to 0.1 x lr, fused backward) on the GPT of `{args.config}` "
        f"({ref['num_params'] / 1e6:.2f}M parameters), {args.steps} steps, the same data, seed and "
        f"validation samples ({args.eval_iters} micro-batches every {args.eval_every} steps) in every mode, "
        f"one process each, at lr {' and '.join(str(lr) for lr in curves)}. **Measured on CPU** (no GPU here): "
        "the losses are what they are on any device, the memory is the process RSS on CPU.",
        "",
        "![validation loss by precision](precision.png)",
        "",
        "Why pure bf16 needs the rounding: AdaLomo's update is about lr x RMS(W) per element, i.e. about lr "
        "of a typical weight, while half a bf16 step is 2^-9 to 2^-8 (0.2-0.4%) of it. At lr 1e-3 (and the "
        "cosine tail of any lr) most updates round back to the old weight when rounded to nearest; rounded "
        "stochastically they survive in expectation (memopt/stochastic_rounding.py, docs/ALGORITHMS.md).",
    ]
    for lr, results in curves.items():
        lines += curve_tables(lr, results)
    lines += memory_table(memory, args) if memory else []
    lines += [
        "",
        "*weights + optimizer state* are the tensors' own bytes; *peak RSS* is the high-water mark of "
        "the whole run (build, data, training, validation) above the process after its imports, so it also "
        "holds activations (bf16 under autocast and in pure bf16), gradients being consumed, the data loader "
        "and allocator slack. *wall* is the whole run, set-up included, with the modes' processes running at "
        "the same time on a shared machine.",
        "",
        f"Versions: torch {_torch_version()}, Python {platform.python_version()}; CPU: {_cpu()}; "
        f"load average {getattr(args, 'load_average', None) or f'{os.getloadavg()[0]:.1f}'} at the end of the runs "
        "(shared machine: wall times are noisy). "
        "Raw numbers: `precision.json`.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
    ]
    return "\n".join(lines)


def curve_tables(lr, results: dict) -> list[str]:
    lines = [
        "", f"## lr {lr}", "",
        "| mode | weights | final val loss | best val loss | weights + optimizer state | peak RSS above baseline | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    fp32 = _final(results["fp32"])
    for mode, res in results.items():
        best = min(res["val_loss"].values())
        lines.append(
            f"| {LABELS[mode]} | {res['weight_dtype']} | {_final(res):.4f} | {best:.4f} | "
            f"{(res['weight_bytes'] + res['state_bytes']) / MB:.2f} MiB | {res['peak_bytes'] / MB:.1f} MiB | "
            f"{res['wall_seconds']:.0f} s |")
    lines += ["", "Validation loss at every evaluation:", "",
              "| step | " + " | ".join(LABELS[m] for m in results) + " |",
              "|---|" + "---|" * len(results)]
    for step in sorted(results["fp32"]["val_loss"], key=int):
        lines.append(f"| {step} | " + " | ".join(f"{results[m]['val_loss'][step]:.4f}" for m in results) + " |")
    gaps = ", ".join(f"{LABELS[m]} {_final(results[m]) - fp32:+.4f}" for m in results if m != "fp32")
    return lines + ["", f"Final validation loss minus fp32's: {gaps}."]


def _torch_version() -> str:
    import torch

    return torch.__version__


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), help="run one mode in this process, print JSON (internal)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--config", default="configs/gpt_tiny.yaml")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-iters", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="one curve panel per lr")
    ap.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)  # of one --mode run
    ap.add_argument("--memory-config", default="configs/gpt_demo.yaml", help="the larger model of the memory table")
    ap.add_argument("--memory-steps", type=int, default=4, help="0: no memory table")
    ap.add_argument("--parallel", action="store_true", help="run the modes' processes at the same time")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks"), help="where precision.{md,json,png} go")
    ap.add_argument("--render", action="store_true", help="rewrite precision.md/png from precision.json, no runs")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads((Path(args.out) / "precision.json").read_text())
        vars(args).update(saved["settings"])  # the run's own settings, whatever this command line says
        return write_report(saved["curves"], saved["memory"], args, saved["command"])
    if args.mode:
        print(json.dumps(measure(args)))
        return 0
    curves = {}
    for lr in args.lrs:
        print(f"-- lr {lr}", flush=True)
        curves[str(lr)] = run_modes(args, lr)
    memory = run_modes(args, args.lrs[0], memory=True) if args.memory_steps else {}
    command = "nice -n 15 python tools/bench_precision.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict({k: getattr(args, k) for k in SETTINGS}, load_average=f"{os.getloadavg()[0]:.1f}")
    (out / "precision.json").write_text(json.dumps(dict(curves=curves, memory=memory, command=command.strip(),
                                                        settings=settings), indent=1))
    return write_report(curves, memory, args, command.strip())


def write_report(curves: dict, memory: dict, args, command: str) -> int:
    out = Path(args.out)
    if all("fp32" in results for results in curves.values()):
        plot(curves, out / "precision.png")
        (out / "precision.md").write_text(markdown(curves, args, command, memory if "fp32" in memory else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
