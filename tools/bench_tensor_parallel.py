"""Extra communication of memopt's optimizer step under tensor parallelism (GPT 1.3B shapes).

A tensor-parallel weight is a slice of its matrix, so factored statistics (column sums of a
column-parallel weight, row sums of a row-parallel one, the RMS of every split tensor) are
all-reduced over the TP group. This tool builds TP rank 0's local pieces of every parameter as
megatron-core splits them (word embeddings, QKV and fc1 by rows with their biases; the attention
projection and fc2 by columns; layer norms, position embeddings and the row-parallel biases
replicated), lays them out with ``memopt.sharding.tensor_parallel_layout`` (DP = 1: each slice
whole), binds them to the optimizer and runs real optimizer steps in one process, counting the
payload of every all-reduce the optimizer issues (tools/bench_sharding.py's counter: without a
process group the reducer counts its buffers and skips the call).

The payload is a sum over parameters, so a 24-layer model's is (embeddings + final norm) + 24 x
(one layer); both terms are measured (models of 1 and 2 layers) and the decomposition is checked
to be exact. Compared with the fp32 gradient bytes of the rank's slice (what a data-parallel
engine would all-reduce for it).

    python tools/bench_tensor_parallel.py --out docs/benchmarks
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sharding import OPTIMIZERS, run_bound  # noqa: E402
from gpt2_shapes import gpt2_shapes  # noqa: E402
from memopt.sharding import Layout, TensorParallelSplit, tensor_parallel_layout  # noqa: E402

# GPT 1.3B (GPT-3 XL / Megatron's 1.3B): 24 layers, hidden 2048, 2048 positions; the vocabulary
# padded to a multiple of 128 so every TP size up to 8 divides it.
HIDDEN, LAYERS, POSITIONS, PADDED_VOCAB = 2048, 24, 2048, 50304


def split_dim(name: str) -> int | None:
    """How megatron-core splits a parameter over TP: 0 (rows), 1 (columns) or None (replicated)."""
    if name.endswith("word_embeddings.weight") or ".linear_qkv." in name or ".linear_fc1." in name:
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_layouts(shapes, tp: int, rank: int = 0):
    out = []
    for name, shape in shapes:
        d = split_dim(name) if tp > 1 else None
        if d is None:
            out.append((name, Layout.whole(shape)))
            continue
        local = list(shape)
        local[d] //= tp
        out.append((name, tensor_parallel_layout(Layout.whole(local), TensorParallelSplit(d, rank, tp, group=None))))
    return out


def measure(name: str, shapes, tp: int, steps: int = 2) -> dict:
    # The reference path: the payload is the same on every path, and this one is the exact one.
    _, per_step, n_local = run_bound(name, tp_layouts(shapes, tp), steps, foreach=False, fused=False)
    return dict(bytes=per_step[-1][0], calls=per_step[-1][1], first_bytes=per_step[0][0], first_calls=per_step[0][1],
                local_elements=n_local)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="2,4,8")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    shapes = {k: gpt2_shapes(layers=k, hidden=HIDDEN, vocab=PADDED_VOCAB, positions=POSITIONS) for k in (1, 2)}
    full_shapes = gpt2_shapes(layers=LAYERS, hidden=HIDDEN, vocab=PADDED_VOCAB, positions=POSITIONS)
    params = sum(math.prod(s) for _, s in full_shapes)
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        for name in args.optimizers.split(","):
            m1, m2 = measure(name, shapes[1], tp), measure(name, shapes[2], tp)
            per_layer = {k: m2[k] - m1[k] for k in ("bytes", "first_bytes", "local_elements")}
            total = {k: m1[k] + (LAYERS - 1) * per_layer[k] for k in per_layer}
            # The calls do not grow with depth (one all-reduce per phase): check it.
            assert m1["calls"] == m2["calls"], (name, tp, m1, m2)
            grad_bytes = total["local_elements"] * 4
            rows.append(dict(optimizer=name, tp=tp, allreduces_per_step=m1["calls"], extra_bytes=total["bytes"],
                             first_step_allreduces=m1["first_calls"], first_step_bytes=total["first_bytes"],
                             local_grad_bytes=grad_bytes, per_layer_bytes=per_layer["bytes"]))
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(command="python tools/bench_tensor_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                parameters=params, layers=LAYERS, hidden=HIDDEN, torch=torch.__version__)
    with open(os.path.join(args.out, "tensor_parallel_comm.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [
        "# memopt under tensor parallelism: extra communication per step (GPT 1.3B shapes)",
        "",
        f"Command: `{meta['command']}`. {params:,} parameters ({LAYERS} layers, hidden {HIDDEN}, "
        f"{POSITIONS} positions, vocabulary padded to {PADDED_VOCAB}), fp32, TP rank 0's slices, DP = 1, torch "
        f"{torch.__version__}. Measured on the optimizers' own sharded code path (see the tool's docstring):",
        "the payload of the all-reduces over the TP group that the optimizer issues per step, against the",
        "fp32 gradient bytes of the rank's slices (what a data-parallel all-reduce of them would carry).",
        "The number of all-reduces does not depend on the depth; the first step differs for Adapprox only",
        "(a cold sketch). Under TP x DP sharding the same statistics go over the TP x DP group instead, with the",
        "same payload (docs/sharding.md).",
        "",
        "| optimizer | TP | all-reduces/step | extra bytes/step | % of slice gradient bytes | per layer | first step: all-reduces, % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = 100.0 * r["extra_bytes"] / r["local_grad_bytes"]
        first = 100.0 * r["first_step_bytes"] / r["local_grad_bytes"]
        lines.append(f"| {r['optimizer']} | {r['tp']} | {r['allreduces_per_step']} | {r['extra_bytes']:,} | {pct:.4f}% "
                     f"| {r['per_layer_bytes']:,} | {r['first_step_allreduces']}, {first:.4f}% |")
    with open(os.path.join(args.out, "tensor_parallel_comm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
