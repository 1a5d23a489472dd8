"""What the C++ factored kernel's speculated RMS(W) saves (cpu_kernels.cpp, factored_step).

Steps three copies of the GPT-2 124M weight matrices side by side, round by round in one process:
memopt Adafactor (fused=True) as it runs by default (lr_t from the row sums of W^2 it wrote
last step, checked while updating), the same with the speculation turned off (pass 1 reads W
too), and torch AdamW(fused). Reports median step times and their ratios per thread count, and
writes docs/benchmarks/weight_norm_speculation.md.

    python tools/bench_weight_norm_speculation.py --threads 2 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memopt  # noqa: E402
from memopt.kernels import cpu  # noqa: E402

SHAPES = [(50257, 768), (1024, 768)] + [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def model(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return ps


def measure(threads: int, warmup: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    speculating = memopt.Adafactor(model(), fused=True)
    reading_w = memopt.Adafactor(model(), fused=True)
    adamw = torch.optim.AdamW(model(), lr=1e-3, fused=True)
    cases = {"Adafactor, speculated RMS(W)": speculating, "Adafactor, RMS(W) read": reading_w,
             "torch AdamW(fused)": adamw}
    times = {k: [] for k in cases}
    repairs = cpu.repairs
    for round_ in range(warmup + steps):
        for name, opt in cases.items():
            cpu.SPECULATE_WEIGHT_NORM = opt is not reading_w  # off: the kernel reads W in pass 1
            t0 = time.perf_counter()
            opt.step()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    cpu.SPECULATE_WEIGHT_NORM = True
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(threads=threads, median_ms=med, repairs=cpu.repairs - repairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/weight_norm_speculation.md"))
    args = ap.parse_args(argv)
    rows = [measure(t, args.warmup, args.steps) for t in args.threads]
    n = sum(torch.Size(s).numel() for s in SHAPES)
    lines = [
        "# Speculated RMS(W) in the C++ factored kernel (CPU figures)", "",
        f"`python tools/bench_weight_norm_speculation.py --threads {' '.join(map(str, args.threads))} "
        f"--warmup {args.warmup} --steps {args.steps}`: the {len(SHAPES)} GPT-2 124M weight matrices "
        f"({n / 1e6:.1f}M parameters, fp32), three optimizers stepped round by round in one process, "
        f"median of {args.steps} rounds after {args.warmup}; torch {torch.__version__}.", "",
        "| threads | speculated (ms) | W read (ms) | AdamW fused (ms) | speculated / W read | speculated x AdamW | "
        "W read x AdamW | repairs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, w, a = (r["median_ms"][k] for k in ("Adafactor, speculated RMS(W)", "Adafactor, RMS(W) read",
                                                "torch AdamW(fused)"))
        lines.append(f"| {r['threads']} | {s:.1f} | {w:.1f} | {a:.1f} | {s / w:.2f} | {s / a:.2f} | {w / a:.2f} | "
                     f"{r['repairs']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
