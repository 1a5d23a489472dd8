#!/usr/bin/env python
"""Adapprox's amortized sketch (``resketch_every=K``): what it costs in approximation error and
in training loss, and what it saves in step time.

Accuracy: a 256-512-128 MLP fit by least squares (minibatch 256, lr 3e-3, k_max 16), trained
with K = 1, 2, 4, 8. At every step the optimizer's own second-moment operator
V_t = beta2 Q_{t-1} U_{t-1}^T + (1 - beta2) G*G of its 512 x 256 weight is formed explicitly in
float64 and the error ||V_t - Q_t U_t^T||_F / ||V_t||_F of the new factors is divided by the
optimal rank-k error (truncated SVD of V_t, k the rank used): 1.0 means as good as any rank-k
factorization (steps 2-10, then every 5th). Also the training loss at the end (mean of the last 10 steps), per K and seed.

Step time: GPT-2 124M shapes, fp32, one fixed random gradient per parameter, torch
AdamW(fused=True) and Adapprox at each K interleaved round by round in one process; the mean of
the timed steps, over a whole number of K-step cycles, because sketch and projection steps differ.
Adapprox runs its torch ops (fused=False) at every K and, where the C++ kernels build, its fused
kernels at K = 1 and 8 both ways: with V, the residual and Vhat formed per row block inside the
kernels (the default, ``memopt.kernels.cpu_adapprox.LOWRANK_PASSES``) and with them taken from
torch GEMMs through the m x n buffer (the path before).

    python tools/bench_adapprox_resketch.py --out docs/benchmarks
    python tools/bench_adapprox_resketch.py --part accuracy --steps 50 --out /tmp/r   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memopt.adapprox import Adapprox  # noqa: E402
from memopt.kernels import cpu_adapprox  # noqa: E402

KS = (1, 2, 4, 8)


def _mlp_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(512, 256, generator=gen) / 16, torch.randn(128, 512, generator=gen) / 22]
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 128))
    torch.manual_seed(seed)
    for layer in (model[0], model[2]):
        layer.reset_parameters()

    def batch(step):
        g = torch.Generator().manual_seed(seed * 100_000 + step)
        x = torch.randn(256, 256, generator=g)
        return x, torch.tanh(x @ teacher[0].T) @ teacher[1].T

    return model, batch


def accuracy(k_every: int, seed: int, steps: int) -> dict:
    model, batch = _mlp_problem(seed)
    opt = Adapprox(model.parameters(), lr=3e-3, resketch_every=k_every, foreach=False)
    w = model[0].weight
    beta2 = opt.param_groups[0]["betas"][1]
    ratios, losses = [], []
    for step in range(steps):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        st = opt.state.get(w, {})
        q_prev = st.get("Q")
        v = (1 - beta2) * w.grad.double() ** 2
        if q_prev is not None and q_prev.shape[-1]:
            v = v + beta2 * q_prev.double() @ st["U"].double().T
        opt.step()
        losses.append(float(loss.detach()))
        if step >= 10 and step % 5:  # the float64 SVD costs more than the step: every 5th step
            continue
        q, u = opt.state[w]["Q"].double(), opt.state[w]["U"].double()
        k = q.shape[-1]
        err = float(torch.linalg.norm(v - q @ u.T) / torch.linalg.norm(v))
        sv = torch.linalg.svdvals(v)
        best = float(sv[k:].square().sum().sqrt() / sv.square().sum().sqrt())
        if step >= 1 and best > 0:
            ratios.append(err / best)
    return dict(K=k_every, seed=seed, mean_ratio=statistics.fmean(ratios), worst_ratio=max(ratios),
                final_loss=statistics.fmean(losses[-10:]), first_loss=losses[0])


def step_time(steps: int, warmup: int, kernels_only: bool = False) -> list[dict]:
    from gpt2_shapes import gpt2_shapes

    shapes = [s for _, s in gpt2_shapes()]
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).mul_(1e-3) for s in shapes]
    init = [torch.randn(s, generator=gen).mul_(0.02) for s in shapes]
    # label -> (build, cpu_adapprox.LOWRANK_PASSES for its steps, or None: not a kernel case)
    cases = {"torch AdamW(fused=True)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None)}
    for k in () if kernels_only else KS:
        cases[f"Adapprox resketch_every={k}, torch ops"] = (
            lambda ps, k=k: Adapprox(ps, resketch_every=k, fused=False), None)
    if cpu_adapprox.ready():
        for k in (1, max(KS)):
            for on in (False, True):
                how = "V, residual and Vhat per row block" if on else "GEMMs through the buffer"
                cases[f"Adapprox resketch_every={k}, fused kernels, {how}"] = (
                    lambda ps, k=k: Adapprox(ps, resketch_every=k, fused=True), on)
    steppers = []
    for make, _ in cases.values():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        steppers.append(make(params))
    times = [[] for _ in cases]
    for rnd in range(warmup + steps):
        for i, (opt, (_, lowrank)) in enumerate(zip(steppers, cases.values())):
            if lowrank is not None:
                cpu_adapprox.LOWRANK_PASSES = lowrank
            t0 = time.perf_counter()
            opt.step()
            if rnd >= warmup:
                times[i].append((time.perf_counter() - t0) * 1e3)
    cpu_adapprox.LOWRANK_PASSES = True
    base = statistics.fmean(times[0])
    return [dict(case=label, mean_ms=statistics.fmean(ts), x_adamw_fused=statistics.fmean(ts) / base,
                 all_ms=[round(t) for t in ts]) for label, ts in zip(cases, times)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("accuracy", "time", "both"), default="both")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the accuracy runs")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--time-steps", type=int, default=8, help="timed rounds (a multiple of every K)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kernels-only", action="store_true",
                    help="time AdamW and the fused-kernel cases only (not the torch-op path at every K)")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    if args.time_steps % max(KS):
        ap.error(f"--time-steps must be a multiple of {max(KS)} (whole sketch cycles)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = dict(command="python tools/bench_adapprox_resketch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               torch=torch.__version__, threads=torch.get_num_threads())
    if args.part in ("accuracy", "both"):
        out["accuracy"] = [accuracy(k, int(s), args.steps) for k in KS for s in args.seeds.split(",")]
        for r in out["accuracy"]:
            print(r, flush=True)
    if args.part in ("time", "both"):
        out["time"] = step_time(args.time_steps, args.warmup, args.kernels_only)
        for r in out["time"]:
            print(r, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "adapprox_resketch.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# Adapprox: amortized sketches (`resketch_every`)", "",
             f"Command: `{out['command']}` (torch {out['torch']}, {out['threads']} threads, CPU). See the tool's docstring.", ""]
    if "accuracy" in out:
        lines += [f"Accuracy, MLP 256-512-128 least squares, {args.steps} steps, 512 x 256 weight, k_max 16; error of "
                  "the factors / optimal rank-k error of the same V_t (1.0 = optimal):", "",
                  "| K | seed | mean error ratio | worst | loss at step 1 | final loss (last 10 steps) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['K']} | {r['seed']} | {r['mean_ratio']:.4f} | {r['worst_ratio']:.3f} | {r['first_loss']:.4g} "
                  f"| {r['final_loss']:.4g} |" for r in out["accuracy"]]
        lines.append("")
    if "time" in out:
        lines += [f"Step time, GPT-2 124M shapes, fp32, mean of {args.time_steps} interleaved steps after {args.warmup} "
                  "warm-up (compare ratios, not absolute times: the machine is shared):", "",
                  "| optimizer | mean step (ms) | x AdamW fused |", "|---|---:|---:|"]
        lines += [f"| {r['case']} | {r['mean_ms']:.0f} | {r['x_adamw_fused']:.2f} |" for r in out["time"]]
    with open(os.path.join(args.out, "adapprox_resketch.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
