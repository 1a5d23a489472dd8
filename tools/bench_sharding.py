"""Communication and memory of memopt's sharded optimizer step on GPT-2 124M shapes.

For each optimizer, layout (FSDP2 row shards, DeepSpeed ZeRO flat partitions) and world size W,
this builds rank 0's local pieces of every GPT-2 parameter exactly as FSDP2 (Shard(0), chunks of
ceil(d0/W) rows) and ZeRO-1/2 (one flat buffer of all parameters, padded to a multiple of W,
rank r holds [r*P, (r+1)*P)) lay them out, binds them to the optimizer
(``MemoptOptimizer.bind_fragments``) and runs real optimizer steps in one process. What it reports
is measured on that code path, not estimated:

* ``allreduce_bytes``: the bytes of the flat buffers the optimizer all-reduces per step (the
  payload of its constant number of all-reduces; identical on every rank by construction),
  next to the gradient bytes the data-parallel engine itself reduces per step (fp32).
* ``state_bytes``: the optimizer state tensors really held by rank 0 (for FSDP2 rank 0 holds the
  largest row chunks; under ZeRO it holds the first 1/W of the flattened model, embeddings included).

No process group is needed: with no group, the reducer counts its buffers and skips the call.

    python tools/bench_sharding.py --out docs/benchmarks            # full GPT-2 124M
    python tools/bench_sharding.py --layers 1 --out /tmp/s          # quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import memopt  # noqa: E402
from memopt import sharding  # noqa: E402
from memopt.sharding import Layout  # noqa: E402
from gpt2_shapes import gpt2_shapes  # noqa: E402

OPTIMIZERS = {
    "adafactor": dict(),
    "came": dict(lr=1e-4),
    "adalomo": dict(lr=1e-3),
    "lomo": dict(lr=1e-3),
    "adapprox": dict(lr=1e-3),  # k_max 16; its first step is a cold sketch (more rounds, see first_step_*)
}


def row_layouts(shapes, world, rank=0):
    out = []
    for name, shape in shapes:
        d0 = shape[0]
        chunk = math.ceil(d0 / world)
        start = min(rank * chunk, d0)
        stop = min(start + chunk, d0)
        out.append((name, Layout.row_shard(shape, start, stop, None)))
    return out


def flat_layouts(shapes, world, rank=0):
    total = sum(math.prod(s) for _, s in shapes)
    part = math.ceil(total / world)
    lo, hi = rank * part, min((rank + 1) * part, total)
    out, off = [], 0
    for name, shape in shapes:
        numel = math.prod(shape)
        a, b = max(lo, off), min(hi, off + numel)
        out.append((name, Layout.flat(shape, a - off, max(0, b - a), None)))
        off += numel
    return out


class ReducerCounter:
    """Counts the all-reduce payload of every memopt Reducer run inside it (bytes and calls)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._orig = sharding.Reducer.run

    def __enter__(self):
        counter = self

        def run(red):
            if red.parts:
                counter.calls += 1
                counter.bytes += sum(p.numel() for p in red.parts) * 4
            counter._orig(red)

        sharding.Reducer.run = run
        return self

    def __exit__(self, *exc):
        sharding.Reducer.run = self._orig


def measure(name, shapes, kind, world, steps=2):
    gen = torch.Generator().manual_seed(0)
    if kind == "single":
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for _, s in shapes]
        opt = memopt.create_optimizer(name, params, **OPTIMIZERS[name])
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        return dict(state_bytes=opt.state_bytes(), allreduce_bytes=0, allreduces_per_step=0,
                    first_step_allreduce_bytes=0, first_step_allreduces=0,
                    local_elements=sum(p.numel() for p in params))
    layouts = row_layouts(shapes, world) if kind == "row" else flat_layouts(shapes, world)
    opt, per_step, n_local = run_bound(name, layouts, steps)
    # The last step is the steady state; the first one can differ (Adapprox's cold sketch).
    return dict(state_bytes=opt.state_bytes(), allreduce_bytes=per_step[-1][0], allreduces_per_step=per_step[-1][1],
                first_step_allreduce_bytes=per_step[0][0], first_step_allreduces=per_step[0][1],
                local_elements=n_local)


def run_bound(name: str, layouts, steps: int, **opt_kwargs):
    """Bind one rank's local pieces (``[(name, Layout)]``) to optimizer ``name`` as one flat
    partition and run ``steps`` steps on random gradients; returns (optimizer, [(all-reduce bytes,
    all-reduce calls)] per step, local elements)."""
    gen = torch.Generator().manual_seed(0)
    n_local = sum(L.length for _, L in layouts)
    flat = torch.nn.Parameter(torch.randn(n_local, generator=gen) * 0.02)
    opt = memopt.create_optimizer(name, [flat], **OPTIMIZERS[name], **opt_kwargs)
    frags, off = [], 0
    for pname, L in layouts:
        frags.append((pname, off, L))
        off += L.length
    opt.bind_fragments(flat, frags)
    per_step = []
    for _ in range(steps):
        flat.grad = torch.randn(n_local, generator=gen) * 1e-3
        with ReducerCounter() as c:
            opt.step()
        per_step.append((c.bytes, c.calls))
    return opt, per_step, n_local


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    shapes = gpt2_shapes(layers=args.layers)
    numel = sum(math.prod(s) for _, s in shapes)
    grad_bytes = numel * 4
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for name in args.optimizers.split(","):
        single = measure(name, shapes, "single", 1)
        rows.append(dict(optimizer=name, layout="single", world=1, **single, grad_bytes=grad_bytes))
        print(rows[-1], flush=True)
        for kind in ("row", "flat"):
            for w in worlds:
                if w == 1:
                    continue
                t = time.time()
                r = measure(name, shapes, kind, w)
                rows.append(dict(optimizer=name, layout={"row": "fsdp2-row", "flat": "zero-flat"}[kind], world=w, **r,
                                 grad_bytes=grad_bytes, seconds=round(time.time() - t, 1)))
                print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(command="python tools/bench_sharding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                parameters=numel, layers=args.layers, torch=torch.__version__)
    with open(os.path.join(args.out, "sharding_comm_memory.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [
        "# Sharded memopt: communication and memory per rank (GPT-2 124M shapes)",
        "",
        f"Command: `{meta['command']}` ({numel:,} parameters, fp32 states, torch {torch.__version__}).",
        "Measured on the optimizers' own sharded code path (rank 0's pieces bound with",
        "`bind_fragments`); see the tool's docstring. `fsdp2-row`: FSDP2 Shard(0) chunks;",
        "`zero-flat`: ZeRO-1/2 flat partitions of all parameters. Extra all-reduce payload per step",
        "vs the fp32 gradient bytes the engine reduces per step (a ring all-reduce moves",
        "2(W-1)/W x payload per rank for either; a ZeRO/FSDP2 reduce-scatter of the gradients moves",
        "(W-1)/W x, so against reduce-scatter traffic the wire ratio is twice the payload ratio).",
        "Steady-state steps; the first step is the same except for Adapprox (a cold sketch: more",
        "rounds), listed in the last column. Adapprox's state at W=1 and in FSDP2 includes Q at the",
        "rank the run reached (k <= 16), so its ratio also reflects the rank the random gradients need.",
        "",
        "| optimizer | layout | W | all-reduces/step | extra bytes/step | % of grad bytes | state bytes rank 0 | state MB | vs W=1 | first step: all-reduces, % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["optimizer"]: r["state_bytes"] for r in rows if r["layout"] == "single"}
    for r in rows:
        pct = 100.0 * r["allreduce_bytes"] / r["grad_bytes"]
        ratio = r["state_bytes"] / base[r["optimizer"]] if base[r["optimizer"]] else float("nan")
        lines.append(
            f"| {r['optimizer']} | {r['layout']} | {r['world']} | {r['allreduces_per_step']} | {r['allreduce_bytes']:,} "
            f"| {pct:.4f}% | {r['state_bytes']:,} | {r['state_bytes'] / 2**20:.2f} | {ratio:.3f} "
            f"| {r['first_step_allreduces']}, {100.0 * r['first_step_allreduce_bytes'] / r['grad_bytes']:.4f}% |"
        )
    with open(os.path.join(args.out, "sharding_comm_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
