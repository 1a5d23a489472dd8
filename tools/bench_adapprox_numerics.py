"""Does Adapprox's sensitivity to round-off matter for training loss?

A 1-ulp perturbation of the gradients moves a 5-step Adapprox trajectory by 0.07-0.2% of its
movement (docs/adapprox.md). This trains the tiny GPT (configs/gpt_tiny.yaml, bundled corpus)
with Adapprox, one run per variant, all else equal (``VARIANTS``):

    base      as configured (train.seed=1234, sketch seed 0)
    ulp       every gradient element moved by 1 ulp (``torch.nextafter``) towards +inf or -inf,
              the sign drawn per element and step from a torch.Generator seeded with
              (1000003 * step + parameter index): deterministic, the global RNG is untouched
    ulp2      the same with another sequence of directions
    sketch2/3 Adapprox seed=1/2 (other random sketches, same init and data)
    seed2/3   train.seed=1235/1236 (another initialization and data order): the seed spread
    adamw_*   torch AdamW base / ulp / seed2: the control, since a perturbation grows in any
              nonlinear training run; the question is whether it grows further under Adapprox

and reports |loss(run) - loss(reference)| on the final validation loss and along the training
curve. The sensitivity matters for training only if |base - ulp| is not far below the seed
spread, or far above AdamW's |base - ulp|.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tools/bench_adapprox_numerics.py \
        --steps 400 --out docs/benchmarks/adapprox_numerics
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tools/bench_adapprox_numerics.py \
        --mechanism 768x768 --ranks 1,4,16,64,768 --out docs/benchmarks/adapprox_numerics_mechanism

The second is the mechanism on one matrix (``mechanism``): the relative change of Uhat after two
steps from a 1-ulp gradient perturbation, with every sketch product in fp32 and in fp64. Run it
first: the training report (its .md) includes its table when its JSON is there.

Resumable: each run's result is kept under --work (runs/adapprox_numerics/<variant>/result.json)
and a finished run is not repeated; --fresh reruns them all.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memopt import Adapprox, registry  # noqa: E402

def ulp_perturbed(cls: type, stream: int = 0) -> type:
    """``cls`` whose every step first moves each gradient element by 1 ulp, in a random
    direction (zeros stay zero: a subnormal would not be a relative perturbation). ``stream``
    selects another deterministic sequence of directions."""

    class UlpPerturbed(cls):
        def step(self, closure=None):
            calls = getattr(self, "perturbed_steps", 0)
            with torch.no_grad():
                index = 0
                for group in self.param_groups:
                    for p in group["params"]:
                        index += 1
                        if p.grad is None:
                            continue
                        gen = torch.Generator(device=p.grad.device)
                        gen.manual_seed(1000003 * calls + index + 7919 * stream)
                        up = torch.randint(0, 2, p.grad.shape, generator=gen, device=p.grad.device, dtype=torch.bool)
                        target = torch.where(up, math.inf, -math.inf).to(p.grad.dtype)
                        moved = torch.nextafter(p.grad, target)
                        p.grad.copy_(torch.where(p.grad == 0, p.grad, moved))
            self.perturbed_steps = calls + 1
            return super().step(closure)

    UlpPerturbed.__name__ = f"UlpPerturbed{cls.__name__}"
    return UlpPerturbed


# name -> (optimizer class, perturbation stream)
PERTURBED = {"adapprox_ulp": (Adapprox, 0), "adapprox_ulp2": (Adapprox, 1), "adamw_ulp": (torch.optim.AdamW, 0)}

# name -> (optimizer, train.seed, extra hyperparameters). The AdamW runs are the control: a
# 1-ulp perturbation grows in any nonlinear training run; the question is whether it grows
# faster or further under Adapprox.
VARIANTS = {
    "base": ("adapprox", 1234, {}),
    "ulp": ("adapprox_ulp", 1234, {}),
    "ulp2": ("adapprox_ulp2", 1234, {}),
    "sketch2": ("adapprox", 1234, {"seed": 1}),
    "sketch3": ("adapprox", 1234, {"seed": 2}),
    "seed2": ("adapprox", 1235, {}),
    "seed3": ("adapprox", 1236, {}),
    "adamw_base": ("adamw", 1234, {}),
    "adamw_ulp": ("adamw_ulp", 1234, {}),
    "adamw_seed2": ("adamw", 1235, {}),
}
# (run, reference) pairs the report compares.
PAIRS = [("ulp", "base"), ("ulp2", "base"), ("ulp2", "ulp"), ("sketch2", "base"), ("sketch3", "base"),
         ("sketch3", "sketch2"), ("seed2", "base"), ("seed3", "base"), ("seed3", "seed2"),
         ("adamw_ulp", "adamw_base"), ("adamw_seed2", "adamw_base")]


def spec_for(name: str, args) -> dict:
    optimizer, seed, extra = VARIANTS[name]
    out = Path(args.work) / name
    hparams = {**json.loads(args.hparams), **extra} if optimizer.startswith("adapprox") else {}
    overrides = [
        f"output_dir={out}", f"data.tokenizer={ROOT / 'data/tokenizer/spm_bpe_8k.model'}",
        f"data.cache_dir={ROOT / 'data/cache'}", f"optimizer.name={optimizer}",
        f"optimizer.lr={args.lr}", f"optimizer.hparams={json.dumps(hparams)}", f"train.steps={args.steps}",
        f"train.seed={seed}", f"train.eval_every={max(1, args.steps // 5)}", f"train.eval_iters={args.eval_iters}",
        f"train.log_every={args.log_every}", "train.progress_bar=false",
        f"schedule.warmup_steps={min(20, args.steps // 10)}", "checkpoint.every=0",
        "checkpoint.save_final=false", "checkpoint.resume=none", "engine.kind=single",
    ]
    return dict(kind="train", name=name, task="gpt", config=str(ROOT / "configs/gpt_tiny.yaml"),
                overrides=overrides, output_dir=str(out), optimizer=optimizer, seed=seed, hparams=hparams)


def run_variant(name: str, args) -> dict:
    from pretrain.study.study import inprocess_run

    done = Path(args.work) / name / "result.json"
    settings = dict(steps=args.steps, lr=args.lr, hparams=args.hparams, eval_iters=args.eval_iters)
    if done.is_file() and not args.fresh:
        result = json.loads(done.read_text())
        if result.get("settings") == settings and not result.get("failed"):
            return result
    t0 = time.perf_counter()
    result = inprocess_run(spec_for(name, args))
    result["settings"] = settings
    result["run_wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(result, indent=1, default=str))
    return result


def train_gaps(a: list, b: list, steps: int, checkpoints: list[int]) -> dict:
    """|training loss difference| at the logged steps nearest each checkpoint step (a and b
    are [tokens, loss] curves logged at the same steps)."""
    per_step = a[-1][0] / steps  # tokens per step: the last logged step is the last step
    bl = {tokens: loss for tokens, loss in b}
    gaps = {}
    for c in checkpoints:
        tokens, loss = min(a, key=lambda row: abs(row[0] / per_step - c))
        gaps[str(round(tokens / per_step))] = abs(loss - bl[tokens])
    return gaps


def summarize(results: dict, args) -> dict:
    checkpoints = sorted({max(1, round(args.steps * f)) for f in (0.025, 0.1, 0.25, 0.5, 1.0)})
    pairs = []
    for run, ref in PAIRS:
        a, b = results[run], results[ref]
        pairs.append(dict(run=run, reference=ref, final_val_gap=abs(a["final_val_loss"] - b["final_val_loss"]),
                          train_gaps=train_gaps(b["train_curve"], a["train_curve"], args.steps, checkpoints)))
    runs = {name: dict(optimizer=VARIANTS[name][0], train_seed=VARIANTS[name][1], extra=VARIANTS[name][2],
                       final_val_loss=r["final_val_loss"], final_train_loss=r["final_train_loss"],
                       adapprox_mean_rank=r.get("adapprox_mean_rank"), run_wall_s=r.get("run_wall_s"))
            for name, r in results.items()}
    return dict(command="tools/bench_adapprox_numerics.py " + " ".join(sys.argv[1:]), steps=args.steps, lr=args.lr,
                hparams=json.loads(args.hparams), eval_iters=args.eval_iters, config="configs/gpt_tiny.yaml",
                torch=torch.__version__, device="cpu",
                # The runs' own wall times (a resumed run's from when it ran), not this invocation's.
                wall_s=sum(r.get("run_wall_s", 0.0) for r in results.values()), runs=runs, pairs=pairs)


def markdown(s: dict) -> str:
    steps = list(s["pairs"][0]["train_gaps"])
    lines = [
        "# Adapprox: does its sensitivity to round-off change the training loss?", "",
        f"Tiny GPT (configs/gpt_tiny.yaml, bundled corpus, micro batch 4 x 64 tokens), lr={s['lr']} for "
        f"Adapprox and AdamW, {s['steps']} steps, engine single, CPU, torch {s['torch']}, validation on "
        f"{s['eval_iters']} batches. Wall time of the runs {s['wall_s']:.0f} s (2-core machine shared "
        "with other jobs).", "",
        "Command:", "", f"    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python {s['command']}", "",
        "Runs: `ulp` = every gradient element moved 1 ulp (torch.nextafter) in a random direction every "
        "step (`ulp2`: other directions); `sketchN` = Adapprox seed=N-1 (other sketches); `seedN` = another train.seed (init and data "
        "order); `adamw_*` = the same with torch AdamW (the control).", "",
        "| run | final val loss | mean Adapprox rank |", "|---|---|---|",
    ]
    for name, r in s["runs"].items():
        rank = f"{r['adapprox_mean_rank']:.2f}" if r["adapprox_mean_rank"] is not None else "-"
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {rank} |")
    lines += ["", "|loss(run) - loss(reference)|: final validation loss, and training loss at steps "
              + ", ".join(steps) + ":", "",
              "| run vs reference | final val | " + " | ".join(f"train @{k}" for k in steps) + " |",
              "|---|---|" + "---|" * len(steps)]
    for p in s["pairs"]:
        gaps = " | ".join(f"{p['train_gaps'][k]:.2e}" for k in steps)
        lines.append(f"| {p['run']} vs {p['reference']} | {p['final_val_gap']:.2e} | {gaps} |")
    return "\n".join(lines) + "\n"


# -- the mechanism on one matrix: does float64 arithmetic in the sketch remove the sensitivity? --
def structured_gradient(m: int, n: int, gen: torch.Generator, dtype) -> torch.Tensor:
    """A gradient whose G*G spans ~10 decades, like a real layer's: a rank-4 signal plus noise,
    rows and columns scaled log-uniformly over 1e-3..1 (so V's smallest entries sit far below
    the fp32 resolution of its largest)."""
    rows = torch.logspace(-3, 0, m, dtype=torch.float64)[torch.randperm(m, generator=gen)]
    cols = torch.logspace(-3, 0, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    g = torch.randn(m, 4, generator=gen, dtype=torch.float64) @ torch.randn(4, n, generator=gen, dtype=torch.float64)
    g = g + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return (g * rows[:, None] * cols[None, :]).to(torch.float32).to(dtype)


def two_steps_uhat(g1, g2, k: int, dtype, beta2: float = 0.999) -> torch.Tensor:
    """Uhat of the second of two Adapprox steps (cold S-RSI, 5 power iterations, the "grad"
    floor), all arithmetic in ``dtype``; the same Gaussian sketches whatever the dtype."""
    from memopt.adapprox_ops import uhat_
    from memopt.lowrank import s_rsi, second_moment_operator

    group = {"vhat_floor": "grad", "betas": (0.9, beta2)}
    m, n = g1.shape
    q = torch.zeros(1, m, 0, dtype=dtype)
    u = torch.zeros(1, n, 0, dtype=dtype)
    for step, g in enumerate((g1, g2)):
        gen = torch.Generator().manual_seed(step)
        omega = torch.randn(1, n, k + 5, generator=gen, dtype=torch.float64).to(dtype)
        s = (g * g)[None]
        q, u = s_rsi(*second_moment_operator(q, u, s, beta2), k, 5, omega=omega)
    return uhat_(torch.bmm(q, u.mT)[0], g2.clone(), group, 1e-8)


def mechanism(m: int, n: int, ranks: list[int]) -> list[dict]:
    """||Uhat(G + 1 ulp) - Uhat(G)|| / ||Uhat(G)|| (both steps' gradients perturbed) with the
    sketch in fp32 and in fp64, the fp32 sketch's distance from the fp64 one, and the wall time
    of the two steps in each precision."""
    gen = torch.Generator().manual_seed(0)
    g1, g2 = (structured_gradient(m, n, gen, torch.float32) for _ in range(2))
    pert = [torch.nextafter(g, torch.where(torch.rand(g.shape, generator=gen) < 0.5, math.inf, -math.inf))
            for g in (g1, g2)]
    rows = []
    for k in ranks:
        row = dict(m=m, n=n, k=k)
        ref = {}
        for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
            t0 = time.perf_counter()
            a = two_steps_uhat(g1.to(dtype), g2.to(dtype), k, dtype).double()
            row[f"two_steps_s_{name}"] = time.perf_counter() - t0  # CPU, 1 thread, shared machine
            b = two_steps_uhat(pert[0].to(dtype), pert[1].to(dtype), k, dtype).double()
            ref[name] = a
            row[f"ulp_change_{name}"] = float((a - b).norm() / a.norm())
            row[f"ulp_max_change_{name}"] = float((a - b).abs().max() / a.abs().max())
        row["fp32_vs_fp64"] = float((ref["fp32"] - ref["fp64"]).norm() / ref["fp64"].norm())
        rows.append(row)
        print(row, flush=True)
    return rows


def mechanism_markdown(path: Path) -> str:
    """The table of a ``--mechanism`` run's JSON, for the report."""
    data = json.loads(path.read_text())
    lines = ["", "## The mechanism on one matrix: fp32 against fp64 sketches", "",
             "Two Adapprox steps (cold S-RSI, 5 power iterations, the grad floor) on a structured gradient "
             "whose G*G spans ~10 decades; both gradients moved 1 ulp in random directions. Relative change "
             "of the second step's Uhat (Frobenius; and largest entry change / largest entry), all "
             "arithmetic in fp32 or in fp64, and the wall time of the two steps (CPU, 1 thread, shared).", "",
             "Command:", "", f"    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python {data['command']}", "",
             "| m x n | k | ulp change fp32 | ulp change fp64 | max-entry change fp32 | fp64 | fp32 vs fp64 | "
             "time fp32 (s) | time fp64 (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['m']} x {r['n']} | {r['k']} | {r['ulp_change_fp32']:.2e} | {r['ulp_change_fp64']:.2e} | "
                     f"{r['ulp_max_change_fp32']:.2e} | {r['ulp_max_change_fp64']:.2e} | {r['fp32_vs_fp64']:.2e} | "
                     f"{r['two_steps_s_fp32']:.3f} | {r['two_steps_s_fp64']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hparams", default="{}", help="Adapprox hyperparameters (JSON) for every Adapprox run")
    ap.add_argument("--eval-iters", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="a subset, comma-separated (no report)")
    ap.add_argument("--work", default=str(ROOT / "runs/adapprox_numerics"))
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--mechanism", default=None, metavar="MxN",
                    help="instead of training: the one-matrix fp32/fp64 experiment on an M x N matrix")
    ap.add_argument("--ranks", default="1,4,16,64")
    args = ap.parse_args(argv)
    if args.mechanism:
        m, n = (int(x) for x in args.mechanism.split("x"))
        rows = mechanism(m, n, [int(k) for k in args.ranks.split(",")])
        if args.out:
            Path(args.out + ".json").write_text(json.dumps(dict(command="tools/bench_adapprox_numerics.py "
                                                                + " ".join(sys.argv[1:]), rows=rows), indent=1))
        return
    for name, (cls, stream) in PERTURBED.items():
        registry.OPTIMIZERS[name] = ulp_perturbed(cls, stream)
    results = {}
    for name in args.variants.split(","):
        results[name] = r = run_variant(name, args)
        print(f"{name}: final val {r['final_val_loss']:.5f} train {r['final_train_loss']:.5f} "
              f"({r.get('run_wall_s', 0):.0f} s)", flush=True)
    if set(VARIANTS) <= set(results):
        s = summarize(results, args)
        print(markdown(s))
        if args.out:
            Path(args.out + ".json").write_text(json.dumps(s, indent=1))
            mech = Path(args.out + "_mechanism.json")  # a --mechanism run's output, if there is one
            Path(args.out + ".md").write_text(markdown(s) + (mechanism_markdown(mech) if mech.is_file() else ""))


if __name__ == "__main__":
    main()
