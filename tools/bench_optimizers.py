#!/usr/bin/env python
"""Optimizer step time and state memory on GPT-2 124M parameter shapes (CPU or CUDA, fp32 or bf16).

Every memopt optimizer runs side by side with the peer implementations of the same algorithm
(torch, transformers, came_pytorch, lomo_optim) and with torch AdamW (foreach and fused). The
cases are *interleaved*: each round steps every optimizer once, and each case reports the median
of its timed rounds, so load from other processes on a shared machine hits all cases alike and
the ratios stay meaningful.

A "floor" case times ``W += G`` over all parameters: any optimizer must at least read G and
read and write W, so that is the physical lower bound of a step on this machine.

    python tools/bench_optimizers.py                      # full run, writes docs/benchmarks/
    python tools/bench_optimizers.py --layers 2 --steps 3 --out /tmp/bench   # quick look
    python tools/bench_optimizers.py --paths both --name optimizers_foreach   # memopt's two paths
    python tools/bench_optimizers.py --device cuda --dtype bfloat16 --paths both --name gpu_bf16
    python tools/bench_optimizers.py --paths fused --only adamw adafactor came adalomo lomo --name optimizers_fused

``--paths``: "default" runs each memopt optimizer as constructed by default (foreach=None,
fused=None: the fused C++ kernel on CPU when it builds, the sync-free path on an accelerator);
"both" runs foreach=False and foreach=True side by side; "fused" runs foreach=False and
fused=True (memopt.kernels) side by side for the optimizers that have fused kernels, with
DeepSpeed's CPU Adam (what ZeRO-Offload runs) among the AdamW rows when its op builds, and
leaves torch AdamW (foreach) out: every case holds its own copy of the 124M parameters and state,
and the fewer rows fit a shared machine's memory.

Exit status 1 when a memopt optimizer is slower than a peer implementation of its algorithm.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memopt  # noqa: E402
from gpt2_shapes import gpt2_shapes  # noqa: E402
from memopt.base import optimizer_state_bytes  # noqa: E402


@dataclass
class Case:
    label: str
    algorithm: str  # cases with the same algorithm are compared
    implementation: str  # "memopt" or the peer's package
    build: Callable[[list[torch.Tensor]], Callable[[], None]]  # params -> one step
    state_bytes: Callable[[], int] | None = None
    # False for a peer that skips work memopt must do, so speed is not comparable like for like
    # (lomo_optim's LOMO writes non-finite gradients into the weights unchecked).
    comparable: bool = True
    # Steps of one cycle of a periodic cost (Adapprox's resketch_every): such a row is judged by its
    # mean over the timed steps, which hold whole cycles, not by a median that never sees a sketch.
    cycle: int = 1


def _optimizer_case(label, algorithm, implementation, make, cycle=1):
    holder = {}

    def build(params):
        opt = make(params)
        holder["opt"] = opt
        return opt.step

    return Case(label, algorithm, implementation, build, lambda: optimizer_state_bytes(holder["opt"]), cycle=cycle)


@contextlib.contextmanager
def _cuda_is_a_noop():
    """lomo_optim puts its state on ``.cuda()``; on a CPU machine keep it where it is."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def _lomo_optim_case(label, algorithm, cls_name, comparable=True, **kw):
    """lomo_optim updates from its backward hook; calling that hook function is its 'step'."""
    holder = {}

    def build(params):
        import lomo_optim

        module = torch.nn.Module()
        module.ps = torch.nn.ParameterList([torch.nn.Parameter(p) for p in params])
        with _cuda_is_a_noop():
            opt = getattr(lomo_optim, cls_name)(module, **kw)
        holder["opt"] = opt
        grads = None

        def step():
            nonlocal grads
            if grads is None:
                grads = [p.grad for p in module.ps]
            for p, g in zip(module.ps, grads):
                p.grad = g  # the hook sets p.grad = None after each update
            if hasattr(opt, "step_num"):
                opt.step_num += 1
            opt.grad_func(0)

        # The parameters the harness fills with gradients are the module's own.
        build.params = list(module.ps)
        return step

    def state_bytes():
        opt = holder["opt"]
        return sum(
            t.numel() * t.element_size()
            for d in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
            for t in getattr(opt, d, {}).values()
        )

    return Case(label, algorithm, "lomo_optim", build, state_bytes, comparable)


def _floor_case():
    def build(params):
        grads = None

        def step():
            nonlocal grads
            if grads is None:
                grads = [p.grad for p in params]
            torch._foreach_add_(params, grads, alpha=-1e-9)

        return step

    return Case("floor: W -= eps*G (read G, read+write W)", "floor", "torch", build, lambda: 0)


def _memopt_cases(paths: str, adapprox_resketch: tuple[int, ...] = (1,)) -> list[Case]:
    """The memopt rows: the default constructor, or both paths side by side; Adapprox once per
    ``resketch_every`` in ``adapprox_resketch`` (1, its default, keeps the plain label)."""
    adapprox = [
        ("memopt Adapprox" + ("" if k == 1 else f" (resketch_every={k})"), "adapprox",
         lambda ps, k=k, **f: memopt.Adapprox(ps, lr=1e-4, resketch_every=k, **f), k)
        for k in adapprox_resketch
    ]
    specs = [
        ("memopt Adafactor", "adafactor", lambda ps, **f: memopt.Adafactor(ps, **f), 1),
        ("memopt CAME", "came", lambda ps, **f: memopt.CAME(ps, lr=2e-4, **f), 1),
        ("memopt AdaLomo (step)", "adalomo", lambda ps, **f: memopt.AdaLomo(ps, lr=1e-3, **f), 1),
        ("memopt LOMO (step)", "lomo", lambda ps, **f: memopt.Lomo(ps, lr=1e-3, **f), 1),
        *adapprox,
    ]
    variants = [("", {})] if paths == "default" else [(" [foreach=False]", dict(foreach=False)),
                                                     (" [foreach=True]", dict(foreach=True))]
    if paths == "fused":
        variants[1] = (" [fused=True]", dict(fused=True))
    return [
        _optimizer_case(label + suffix, algorithm, "memopt", lambda ps, make=make, kw=kw: make(ps, **kw), cycle=cycle)
        for label, algorithm, make, cycle in specs for suffix, kw in variants
    ]


def _deepspeed_cpu_adam_case():
    """DeepSpeed's CPU Adam (AdamW mode), the optimizer ZeRO-Offload steps on the host; its op is
    JIT-built on first use, and a machine where it cannot build leaves the row out."""
    def make(ps):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(ps, lr=1e-4, adamw_mode=True)

    return _optimizer_case("DeepSpeedCPUAdam (adamw_mode)", "adamw", "deepspeed", make)


def all_cases(paths: str = "default", adapprox_resketch: tuple[int, ...] = (1,)) -> list[Case]:
    from came_pytorch import CAME as PeerCAME
    from transformers.optimization import Adafactor as HFAdafactor

    ours = {c.algorithm: [] for c in _memopt_cases(paths, adapprox_resketch)}
    for c in _memopt_cases(paths, adapprox_resketch):
        ours[c.algorithm].append(c)
    return [
        _floor_case(),
        _optimizer_case("torch AdamW (fused)", "adamw", "torch", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        *([_deepspeed_cpu_adam_case()] if paths == "fused" else [_optimizer_case(
            "torch AdamW (foreach)", "adamw", "torch", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True))]),
        *ours["adafactor"],
        _optimizer_case("torch.optim.Adafactor", "adafactor", "torch", lambda ps: torch.optim.Adafactor(ps, lr=1e-2)),
        _optimizer_case("transformers Adafactor", "adafactor", "transformers", lambda ps: HFAdafactor(ps, beta1=None)),
        *ours["came"],
        _optimizer_case("came_pytorch CAME", "came", "came_pytorch", lambda ps: PeerCAME(ps, lr=2e-4)),
        *ours["adalomo"],
        _optimizer_case(
            "transformers Adafactor (AdaLomo rule)", "adalomo", "transformers",
            lambda ps: HFAdafactor(ps, lr=1e-3, scale_parameter=True, relative_step=False, beta1=None),
        ),
        _lomo_optim_case("lomo_optim AdaLomo (update hook)", "adalomo", "AdaLomo", lr=1e-3, loss_scale=None),
        *ours["lomo"],
        _lomo_optim_case("lomo_optim LOMO (update hook, no non-finite check)", "lomo", "Lomo", comparable=False, lr=1e-3),
        *ours["adapprox"],
    ]


def run(layers: int, warmup: int, steps: int, only: list[str] | None, device: str = "cpu",
        dtype: str = "float32", paths: str = "default", hidden: int = 768, peers: bool = True,
        adapprox_resketch: tuple[int, ...] = (1,)) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    dt_ = getattr(torch, dtype)
    shapes = [s for _, s in gpt2_shapes(layers=layers, hidden=hidden)]
    n_params = sum(math.prod(s) for s in shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device=dev, dtype=dt_) for s in shapes]
    init = [torch.randn(s, generator=gen).mul_(0.02).to(device=dev, dtype=dt_) for s in shapes]
    cases = [c for c in all_cases(paths, adapprox_resketch) if not only or c.algorithm in only or c.algorithm == "floor"]
    if not peers:  # memopt rows and the AdamW references only (each case holds a copy of the model)
        cases = [c for c in cases if c.implementation == "memopt" or c.algorithm in ("floor", "adamw")]
    # On an accelerator a step only queues work: time it to the end of the device's queue.
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    steppers, kept, failed = [], [], []
    for case in cases:
        params = [p.clone() for p in init]
        try:
            step = case.build(params)
            params = getattr(case.build, "params", params)
            for p, g in zip(params, grads):
                p.grad = g  # shared, read-only: no optimizer here writes its gradient
            step()  # a peer may not support this device or dtype: leave it out, and say so
            sync()
        except Exception as exc:  # noqa: BLE001 - any failure of a peer drops that row only
            if case.implementation == "memopt":
                raise
            failed.append(f"{case.label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        steppers.append(step)
        kept.append(case)
    cases = kept

    checksum = [float(g.float().sum()) for g in grads[:4]]
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(warmup + steps):
        for i, step in enumerate(steppers):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            dt = time.perf_counter() - t0
            if round_ >= warmup:
                times[i].append(dt * 1e3)
        print(f"round {round_ + 1}/{warmup + steps} done", file=sys.stderr, flush=True)
    if [float(g.float().sum()) for g in grads[:4]] != checksum:
        raise RuntimeError("a benchmarked optimizer modified its gradients in place; timings are invalid")

    results = []
    for case, ts in zip(cases, times):
        results.append(
            dict(
                label=case.label, algorithm=case.algorithm, implementation=case.implementation,
                median_ms=statistics.median(ts), min_ms=min(ts), times_ms=ts,
                **({"cycle": case.cycle, "cycle_mean_ms": statistics.mean(ts)} if case.cycle > 1 else {}),
                state_bytes=case.state_bytes() if case.state_bytes else None, comparable=case.comparable,
            )
        )
    return dict(
        params=n_params, layers=layers, hidden=hidden, warmup=warmup, timed_steps=steps, dtype=dtype, device=device,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, paths=paths,
        torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
        cpus=os.cpu_count(), load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None, results=results,
        left_out=failed,
    )


def step_ms(r: dict) -> float:
    """The step time a row is judged by: its median, or for a row with a periodic cost (a
    ``cycle``, e.g. Adapprox resketch_every=K) its mean over the timed steps, whole cycles."""
    return r.get("cycle_mean_ms", r["median_ms"])


def check(report: dict) -> list[str]:
    """Lines 'PASS|FAIL: memopt X (a ms) vs peer Y (b ms)' for every algorithm with peers; peers
    that skip required work are reported as 'NOTE' lines and do not decide the exit status."""
    lines = []
    res = report["results"]
    for ours in (r for r in res if r["implementation"] == "memopt"):
        for peer in (r for r in res if r["algorithm"] == ours["algorithm"] and r["implementation"] != "memopt"):
            ours_ms, peer_ms = step_ms(ours), step_ms(peer)
            verdict = ("PASS" if ours_ms < peer_ms else "FAIL") if peer.get("comparable", True) else "NOTE"
            lines.append(
                f"{verdict}: {ours['label']} {fmt_ms(ours_ms)} ms vs "
                f"{peer['label']} {fmt_ms(peer_ms)} ms ({peer_ms / ours_ms:.1f}x)"
            )
    return lines


# Bytes per parameter a step of each algorithm must move at least (fp32): the floor case reads G
# and reads+writes W (12). AdamW also reads+writes M and V (28). A factored step needs the whole
# matrix's row and column sums before W moves, so it reads G twice; RMS(W) can come from the row
# sums of W^2 taken while the last step wrote W (memopt's fused kernel speculates so and checks
# it while updating), so W is read and written once: 16. CAME adds M read+write in its second
# pass and M read in its third: 28. LOMO is the floor.
# Adapprox: U = V^T Q needs all of G*G before any Vhat is known, and the RMS clip all of Uhat
# before M moves, so G is read three times (U, RMS, update; Q U^T recomputed, never stored) and M,
# W read and written once: 28. (memopt's step between sketches moves 32: Uhat goes through an
# m x n buffer instead of being formed twice; a sketch step adds its products' reads of G*G.)
BYTES_PER_PARAM = {"floor": 12, "adamw": 28, "adafactor": 16, "adalomo": 16, "came": 28, "lomo": 12, "adapprox": 28}

# Issue 16 part 4: a memopt step's time at most this multiple of torch AdamW(fused)'s.
TARGET_X_ADAMW_FUSED = {"adafactor": 1.0, "adalomo": 1.0, "came": 1.5, "lomo": 1.0, "adapprox": 3.0}


def byte_floor_ms(r: dict, floor: dict) -> float | None:
    """The floor case's time scaled to the bytes ``r``'s algorithm must move (None if unknown)."""
    b = BYTES_PER_PARAM.get(r["algorithm"])
    return None if b is None else floor["median_ms"] * b / BYTES_PER_PARAM["floor"]


def target_lines(report: dict) -> list[str]:
    """'MET|MISSED: <memopt row> a x AdamW fused (target t)' for every memopt row with a target."""
    res = report["results"]
    fused = next((r for r in res if r["label"] == "torch AdamW (fused)"), None)
    if fused is None:
        return []
    lines = []
    for r in res:
        target = TARGET_X_ADAMW_FUSED.get(r["algorithm"])
        if r["implementation"] != "memopt" or target is None:
            continue
        x = step_ms(r) / fused["median_ms"]
        lines.append(f"{'MET' if x <= target else 'MISSED'}: {r['label']} {x:.2f}x AdamW fused (target <= {target:.1f}x)")
    return lines


def fmt_ms(ms: float) -> str:
    """A step time for the tables: whole ms on CPU, two decimals for the sub-10 ms steps of a GPU."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


def markdown(report: dict, command: str, checks: list[str]) -> str:
    res = report["results"]
    by_label = {r["label"]: r for r in res}
    fused = by_label.get("torch AdamW (fused)")
    floor = next(r for r in res if r["algorithm"] == "floor")
    device = report.get("device", "cpu")
    where = "CPU" if device == "cpu" else f"{device} ({report.get('device_name')})"
    out = [
        f"# Optimizer step time and state memory: GPT-2 shapes ({report['params'] / 1e6:.0f}M), "
        f"{report.get('dtype', 'float32')}, {where}",
        "",
        f"Command: `{command}`",
        "",
        f"{report['params'] / 1e6:.1f}M parameters ({report['layers']} layers), {report['cpus']} CPUs, "
        f"{report['threads']} torch threads, torch {report['torch']}"
        + (f", load average {', '.join(f'{x:.1f}' for x in report['load_avg'])} at the end"
           if report.get("load_avg") else "")
        + f". Median of {report['timed_steps']} timed "
        f"steps after {report['warmup']} warm-up steps (a resketch_every=K row: the mean of its timed steps, "
        "whole K-step cycles of one sketch and K-1 projection steps, marked 'mean'); all cases interleaved "
        "round by round in one process, so compare ratios, not absolute times.",
        "",
        "| optimizer | algorithm | step (ms) | x AdamW fused | x floor | bytes/param | x its byte floor | state (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res:
        sb = "" if r["state_bytes"] is None else f"{r['state_bytes'] / 1e6:.1f}"
        ms = step_ms(r)
        rel = f"{ms / fused['median_ms']:.2f}" if fused else ""
        own = byte_floor_ms(r, floor)
        nbytes = BYTES_PER_PARAM.get(r["algorithm"], "")
        x_own = "" if own is None else f"{ms / own:.2f}"
        shown = fmt_ms(ms) + (f" mean (median {fmt_ms(r['median_ms'])})" if "cycle_mean_ms" in r else "")
        out.append(
            f"| {r['label']} | {r['algorithm']} | {shown} | {rel} | "
            f"{ms / floor['median_ms']:.2f} | {nbytes} | {x_own} | {sb} |"
        )
    if report.get("left_out"):
        out += ["", "Left out (the peer does not run on this device or dtype):", ""]
        out += [f"- {line}" for line in report["left_out"]]
    targets = target_lines(report)
    if targets:
        out += ["", "## Targets (issue 16 part 4: x torch AdamW fused)", ""]
        out += [f"- {line}" for line in targets]
    out += ["", "## memopt vs peer implementations of the same algorithm", ""]
    out += [f"- {line}" for line in checks]
    out += [
        "",
        "NOTE lines are not like-for-like: lomo_optim's LOMO applies W -= lr*G without looking at G, so "
        "a non-finite gradient silently turns the weights into inf/nan. memopt's LOMO first checks each "
        "gradient block (a dot product on a cache-resident block, then the update), skipping and counting "
        "non-finite parameters; that check is the difference between the two rows, and both sit within "
        "2x of the floor.",
    ]
    out += [
        "",
        "## Distance from the floor",
        "",
        "The floor row reads G and reads and writes W once (12 bytes per parameter), the least any "
        "step can move. A factored step (Adafactor, AdaLomo) needs the full-matrix row and column "
        "statistics before the first element of W can be updated, so it reads G twice and W twice "
        "(once for RMS(W), once to update): about 20 bytes per parameter, 1.7x the floor's traffic, "
        "in two cache-blocked passes (memopt/factored.py). The 'x floor' column is the measured "
        "ratio. What remains above 1.7x is, on the reference path (foreach=False), per-operation "
        "overhead of running the passes as separate torch kernels on cache-sized row blocks; on the "
        "fused kernels (fused=True, one loop per pass) it is mostly that the first pass only reads, "
        "and a read-only stream moves fewer bytes per second here than the floor's read-and-write "
        "one (docs/foreach.md). 'bytes/param' "
        "is that least traffic for each algorithm (tools/bench_optimizers.py BYTES_PER_PARAM) and "
        "'x its byte floor' the measured time over the floor row scaled to those bytes: 1.0 would be "
        "a step that only moves its bytes at this machine's W += G speed.",
    ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="transformer layers (12 = GPT-2 124M)")
    ap.add_argument("--hidden", type=int, default=768,
                    help="hidden size (768 = GPT-2 124M; --layers 24 --hidden 2048 = 1.3B, GPT-3 XL's shapes)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per optimizer (>= 5 for the report)")
    ap.add_argument("--only", nargs="*", help="algorithms to run (adamw adafactor came adalomo lomo adapprox)")
    ap.add_argument("--out", default="docs/benchmarks", help="folder for <name>.json and <name>.md")
    ap.add_argument("--name", default="optimizers", help="file stem of the report (default: optimizers)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and gradient dtype")
    ap.add_argument("--paths", default="default", choices=["default", "both", "fused"],
                    help="memopt rows: the default constructor; foreach=False and foreach=True side by side; "
                         "or foreach=False and fused=True side by side (+ DeepSpeedCPUAdam)")
    ap.add_argument("--adapprox-resketch", type=int, nargs="+", default=[1], metavar="K",
                    help="Adapprox rows, one per resketch_every K (default: 1, its default)")
    ap.add_argument("--no-peers", action="store_true",
                    help="leave out the peer implementations (memopt, AdamW and floor rows only: less memory)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.layers < 1 or args.hidden < 1 or min(args.adapprox_resketch) < 1:
        ap.error("--steps, --layers, --hidden and --adapprox-resketch must be >= 1 and --warmup >= 0")
    uneven = [k for k in args.adapprox_resketch if args.steps % k]
    if uneven:
        ap.error(f"--steps {args.steps} must be a multiple of every --adapprox-resketch K (not of {uneven}): "
                 "a resketch row is timed over whole cycles")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")

    report = run(args.layers, args.warmup, args.steps, args.only, args.device, args.dtype, args.paths, args.hidden,
                 peers=not args.no_peers, adapprox_resketch=tuple(args.adapprox_resketch))
    checks = check(report)
    command = "python tools/bench_optimizers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(dict(report, command=command.strip(), checks=checks), indent=1))
    md = markdown(report, command.strip(), checks)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 1 if any(line.startswith("FAIL") for line in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
