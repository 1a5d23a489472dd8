#!/usr/bin/env python
"""Peak memory of a training step: GPT with GPT-2 124M shapes, fp32, CPU, batch 1 x seq.

Every case runs in a fresh Python process (``--case NAME --seq N``, the internal mode), so no
case inherits another's heap. In that process:

1. import torch / megatron / memopt and set up megatron's (1-rank) model-parallel state;
2. ``gc.collect()`` + ``malloc_trim(0)``, then reset the kernel's RSS high-water mark to the
   current RSS (``echo 5 > /proc/self/clear_refs``; it resets ``getrusage().ru_maxrss`` too).
   That RSS is the **baseline**: everything the process holds before the model exists;
3. build the model (and optimizer), then run ``--steps`` training steps on random tokens. The
   high-water mark is read (``VmHWM`` in /proc/self/status) and reset at the end of every stage
   (forward, backward, optimizer step) so the report says *where* the peak is;
4. print one JSON line. **peak** = the highest stage high-water mark of the training steps minus
   the baseline (the model build's own transient is reported apart as ``build_peak``).

The RSS counts pages really touched, so what glibc keeps after ``free`` would count too. The
driver therefore runs every case with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation of
64 KiB or more is its own mmap, returned to the kernel on free) and ``MALLOC_ARENA_MAX=2``, and
``OMP_NUM_THREADS=1``: the RSS then follows the bytes torch really holds, up to small-object
heap. ``--allocator default`` measures with glibc's defaults instead (dynamic mmap threshold).

Floor terms (``--case`` probes, same process recipe):

* weights: the sum of the parameter bytes (tied embedding counted once); cross-checked by the
  RSS growth of building the model (probe ``weights``).
* activations: the peak of a forward + backward of the real training graph (parameters require
  grad, so every saved tensor is the training one) in which *no parameter gradient is ever
  formed*: the backward is ``torch.autograd.grad(loss, embedding_output)`` (autograd then never
  runs the weight-gradient branches of torch ops, nor AccumulateGrad), and megatron's linear
  backward is patched, in this probe only, to skip the weight gradient it would compute and
  throw away. Minus weights (probe ``activations``).
* largest single gradient: the bytes of the largest parameter, the tied word embedding
  (50304 x 768 fp32 with Megatron's vocab padding).

    python tools/bench_memory.py                         # all cases, seq 128 and 512, writes docs
    python tools/bench_memory.py --seqs 128 --cases adamw adalomo_fused --out /tmp/mem
    python tools/bench_memory.py --case adalomo_fused --seq 128      # one case, JSON on stdout

Exit status 1 when AdaLomo (fused) misses a bar at the required sequence length (128):
<= 0.4 x AdamW and <= 1.15 x its floor.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6

# The optimizer cases of the table, in order; the probes measure floor terms and diagnostics.
CASES = {
    "adamw": "AdamW (torch, default impl.)",
    "adamw_foreach": "AdamW (torch, foreach=True)",
    "adafactor": "Adafactor",
    "adalomo_step": "AdaLomo (backward + step)",
    "adalomo_fused": "AdaLomo (fused backward)",
    "adapprox": "Adapprox",
    "adalomo_fused_clip": "AdaLomo (fused, clip_grad_norm=1: two passes, recomputed forward)",
}
PROBES = {
    "weights": "model only (weights)",
    "activations": "forward + backward, no parameter gradient formed",
    "fwdbwd_free": "forward + backward, every gradient freed by its post-accumulate hook",
    "fwdbwd_free_tied": "as fwdbwd_free, tied embedding gradient built in place (proposed model fix)",
    "adalomo_fused_tied": "AdaLomo (fused), tied embedding gradient built in place (proposed model fix)",
}
REQUIRED_SEQ = 128
BAR_VS_ADAMW = 0.40
BAR_VS_FLOOR = 1.15

ALLOCATOR_ENV = {
    "fixed": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"},
    "default": {},
}


# -- measuring -------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss() -> int:
    """Current resident set size, bytes."""
    return _status_kb("VmRSS") * 1024


def hwm() -> int:
    """Resident set high-water mark since the last ``reset_hwm``, bytes."""
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> None:
    """Reset the RSS high-water mark (VmHWM and ru_maxrss) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class Meter:
    """Stage peaks above a baseline, from the kernel's RSS high-water mark."""

    def __init__(self):
        trim()
        reset_hwm()
        self.baseline = rss()
        self.ru_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.stages: list[dict] = []

    @contextlib.contextmanager
    def stage(self, name: str, step: int | None = None):
        reset_hwm()
        self._t0 = time.perf_counter()
        self._step = step
        yield
        self._record(name)

    def split(self, name: str) -> None:
        """Close the part of the current stage so far as its own row ``name``; the rest goes on."""
        self._record(name)
        reset_hwm()
        self._t0 = time.perf_counter()

    def _record(self, name: str) -> None:
        self.stages.append(dict(
            stage=name, step=self._step, peak=hwm() - self.baseline, after=rss() - self.baseline,
            seconds=round(time.perf_counter() - self._t0, 3),
        ))

    def peak(self, names=None, min_step: int = 0) -> dict:
        rows = [s for s in self.stages if (names is None or s["stage"] in names) and (s["step"] or 0) >= min_step]
        return max(rows, key=lambda s: s["peak"])


# -- the model ---------------------------------------------------------------------------------
def _setup():
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT))
    import torch

    import memopt  # noqa: F401
    from pretrain.models import init_model_parallel

    init_model_parallel(tensor_parallel_size=1)
    torch.manual_seed(0)
    return torch


def _build(torch):
    from pretrain.models import build_gpt, get_preset

    cfg = get_preset("gpt2-124m", "gpt", hidden_dropout=0.0, attention_dropout=0.0)
    model = build_gpt(cfg, seed=1234)
    model.train()
    return model, cfg


def _batch(torch, cfg, seq: int, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(1, seq, dtype=torch.float32),
    }


def _make_optimizer(torch, name: str, params):
    import memopt

    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "adafactor":
        return memopt.Adafactor(params)
    if name == "adalomo_fused_clip":
        return memopt.AdaLomo(params, lr=1e-3, clip_grad_norm=1.0)
    if name.startswith("adalomo"):
        return memopt.AdaLomo(params, lr=1e-3)
    if name == "adapprox":
        return memopt.Adapprox(params, lr=1e-4)
    raise ValueError(name)


def tie_gradient_in_place(torch, model):
    """Make the tied word embedding's gradient ONE tensor, built in place (TP = 1 only).

    Stock autograd gives the tied weight two dense vocab x hidden gradients, one from the output
    layer (early in backward) and one from the lookup (``embedding_dense_backward`` at the end),
    and sums them: at the end of backward two such tensors are alive at once. Here the output
    layer's backward keeps its weight gradient aside instead of returning it, and the lookup's
    backward adds its rows into that same tensor (``index_add_``) and returns it as the only
    gradient of the weight. The post-accumulate hook (fused update) then sees the full gradient,
    once, and no second vocab x hidden tensor is ever made. Used by the ``*_tied`` probes to
    measure the fix proposed for ``pretrain/models/gpt.py``; ``tests/test_bench_memory.py``
    checks that the gradients are unchanged.
    """
    import torch.nn.functional as F

    class Holder:
        grad = None

    holder = Holder()

    class OutputLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return torch.matmul(x, weight.t())

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            holder.grad = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
            return g.matmul(weight), None

    class Lookup(torch.autograd.Function):
        @staticmethod
        def forward(ctx, ids, weight):
            ctx.save_for_backward(ids)
            ctx.shape = weight.shape
            return F.embedding(ids, weight)

        @staticmethod
        def backward(ctx, g):
            (ids,) = ctx.saved_tensors
            acc, holder.grad = holder.grad, None
            if acc is None:
                acc = g.new_zeros(ctx.shape)
            acc.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
            return None, acc

    emb = model.embedding.word_embeddings
    out = model.output_layer
    emb.forward = lambda input_: Lookup.apply(input_, emb.weight)
    out.forward = lambda input_, weight=None, runtime_gather_output=None, **kw: (
        OutputLayer.apply(input_, out.weight if weight is None else weight), None)


@contextlib.contextmanager
def _linear_without_wgrad():
    """Megatron's linear backward without its weight/bias gradients (activations probe only)."""
    from megatron.core.tensor_parallel import layers

    fn = layers.LinearWithGradAccumulationAndAsyncCommunication
    saved = fn.backward

    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        assert not ctx.sequence_parallel and not ctx.allreduce_dgrad  # TP = 1
        return (grad_output.matmul(weight),) + (None,) * 8

    fn.backward = staticmethod(backward)
    try:
        yield
    finally:
        fn.backward = saved


def measure(case: str, seq: int, steps: int) -> dict:
    torch = _setup()
    from pretrain.models import gpt_loss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    meter = Meter()
    with meter.stage("build"):
        model, cfg = _build(torch)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    largest = max(params, key=lambda p: p.numel())
    out = dict(
        case=case, seq=seq, steps=steps, baseline=meter.baseline, weights=weights,
        largest_param=dict(shape=list(largest.shape), bytes=largest.numel() * largest.element_size()),
        n_params=sum(p.numel() for p in params), threads=torch.get_num_threads(),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        build_peak=meter.stages[0]["peak"], after_build=meter.stages[0]["after"],
    )
    if case.endswith("_tied"):
        tie_gradient_in_place(torch, model)

    if case == "weights":
        out.update(peak=meter.stages[0]["after"], stages=meter.stages)
        return out

    opt = None
    if case in CASES or case == "adalomo_fused_tied":
        with meter.stage("optimizer"):
            opt = _make_optimizer(torch, case, params)

    def drop(p):
        p.grad = None

    first_train_stage = len(meter.stages)
    for step in range(steps):
        batch = _batch(torch, cfg, seq, step)
        if case == "activations":
            captured = {}
            h = model.embedding.register_forward_hook(lambda m, i, o: captured.setdefault("emb", o))
            with meter.stage("forward", step):
                loss, _ = gpt_loss(model, batch)
            h.remove()
            with meter.stage("backward", step), _linear_without_wgrad():
                (gin,) = torch.autograd.grad(loss, captured["emb"])
            assert all(p.grad is None for p in params)
            del gin, captured, loss
            continue
        # Split every backward where the gradient reaches the embedding output: the first part is
        # the transformer (and, fused, the updates of its parameters), the second the embedding
        # lookup's backward, the tied weight's gradient accumulation (and its update).
        hook = model.embedding.register_forward_hook(
            lambda m, i, o: o.register_hook(lambda g: meter.split("backward: output layer + blocks")) and None)
        with meter.stage("forward", step):
            loss, _ = gpt_loss(model, batch)
        hook.remove()
        if case in ("fwdbwd_free", "fwdbwd_free_tied"):
            hs = [p.register_post_accumulate_grad_hook(drop) for p in params]
            with meter.stage("backward: lookup + embedding", step):
                loss.backward()
            for h in hs:
                h.remove()
        elif case.startswith("adalomo_fused"):
            if case == "adalomo_fused_clip":
                with meter.stage("rest of pass 1, recomputed forward, pass 2", step):
                    opt.fused_backward(loss, recompute_loss=lambda: gpt_loss(model, batch)[0])
            else:
                with meter.stage("backward: lookup + embedding", step):
                    opt.fused_backward(loss)
        else:
            with meter.stage("backward: lookup + embedding", step):
                loss.backward()
            with meter.stage("step", step):
                opt.step()
                opt.zero_grad(set_to_none=True)
        out.setdefault("losses", []).append(float(loss.detach()))
        del loss
        assert all(p.grad is None for p in params)

    train = meter.stages[first_train_stage:]
    top = max(train, key=lambda s: s["peak"])
    out.update(
        peak=top["peak"], peak_stage=f"{top['stage']} (step {top['step'] + 1})",
        held_after=meter.stages[-1]["after"],
        state_bytes=_state_bytes(opt) if opt is not None else 0,
        stages=meter.stages,
    )
    return out


def _state_bytes(opt) -> int:
    from memopt.base import optimizer_state_bytes

    return optimizer_state_bytes(opt)


# -- driver ---------------------------------------------------------------------------------------
def run_case(case: str, seq: int, steps: int, allocator: str) -> dict:
    env = dict(os.environ)
    for k in ALLOCATOR_ENV["fixed"]:
        env.pop(k, None)
    env.update(ALLOCATOR_ENV[allocator])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--seq", str(seq), "--steps", str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} seq {seq} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def floor_terms(results: dict, seq: int) -> dict:
    w = results[("weights", seq)]
    a = results[("activations", seq)]
    weights = w["weights"]
    activations = a["peak"] - weights
    largest = w["largest_param"]["bytes"]
    return dict(
        weights=weights, weights_rss=w["peak"], activations=activations,
        activations_stage=a["peak_stage"], largest_grad=largest,
        floor=weights + activations + largest,
    )


def _mb(x: float) -> str:
    return f"{x / MB:,.0f}"


def summarize(results: dict, seqs: list[int], cases: list[str]) -> dict:
    summary = {}
    for seq in seqs:
        fl = floor_terms(results, seq)
        ref = results.get(("adamw", seq))
        rows = []
        for case in cases + [p for p in PROBES if p not in ("weights", "activations")]:
            r = results.get((case, seq))
            if r is None:
                continue
            rows.append(dict(
                case=case, label=CASES.get(case) or PROBES[case], peak=r["peak"], peak_stage=r["peak_stage"],
                x_adamw=r["peak"] / ref["peak"] if ref else None, x_floor=r["peak"] / fl["floor"],
                held_after=r["held_after"], state_bytes=r["state_bytes"], probe=case in PROBES,
            ))
        summary[seq] = dict(floor=fl, rows=rows)
    return summary


def check_bars(summary: dict) -> dict:
    s = summary.get(REQUIRED_SEQ)
    if s is None:
        return {}
    row = next((r for r in s["rows"] if r["case"] == "adalomo_fused"), None)
    if row is None or row["x_adamw"] is None:
        return {}
    return dict(
        x_adamw=row["x_adamw"], pass_adamw=row["x_adamw"] <= BAR_VS_ADAMW,
        x_floor=row["x_floor"], pass_floor=row["x_floor"] <= BAR_VS_FLOOR,
    )


def write_markdown(path: Path, summary: dict, bars: dict, meta: dict) -> None:
    lines = [
        "# Peak memory of a training step (GPT-2 124M shapes, fp32, CPU)",
        "",
        "Generated by `tools/bench_memory.py`; do not edit by hand (see the text under the tables",
        "for the analysis). Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Machine: {meta['machine']}. torch {meta['torch']}, megatron-core {meta['megatron']}. "
        f"{meta['steps']} training steps per case, each case in a fresh process, "
        f"OMP_NUM_THREADS={meta['threads']}, glibc malloc with `{meta['malloc']}`.",
        "",
        "**peak** = highest RSS high-water mark during the training steps minus the baseline RSS "
        "(after imports and megatron's parallel-state setup, before the model exists). "
        "MB = 10^6 bytes. `peak at` names the stage whose high-water mark is the peak.",
        "",
    ]
    for seq, s in summary.items():
        fl = s["floor"]
        lines += [
            f"## batch 1 x {seq}",
            "",
            f"Floor = weights {_mb(fl['weights'])} MB + activations {_mb(fl['activations'])} MB "
            f"+ largest single gradient {_mb(fl['largest_grad'])} MB = **{_mb(fl['floor'])} MB** "
            f"(weights as RSS of the built model: {_mb(fl['weights_rss'])} MB).",
            "",
            "| case | peak above baseline (MB) | x AdamW | x floor | peak at | held after step (MB) | optimizer state (MB) |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for r in s["rows"]:
            label = r["label"] if not r["probe"] else f"*{r['label']}*"
            xa = f"{r['x_adamw']:.3f}" if r["x_adamw"] is not None else "-"
            lines.append(
                f"| {label} | {_mb(r['peak'])} | {xa} | {r['x_floor']:.3f} | {r['peak_stage']} | "
                f"{_mb(r['held_after'])} | {_mb(r['state_bytes'])} |"
            )
        lines.append("")
    if bars:
        lines += [
            f"Bars at batch 1 x {REQUIRED_SEQ}: AdaLomo (fused) = {bars['x_adamw']:.3f} x AdamW "
            f"(bar <= {BAR_VS_ADAMW}: {'PASS' if bars['pass_adamw'] else 'FAIL'}), "
            f"{bars['x_floor']:.3f} x floor (bar <= {BAR_VS_FLOOR}: {'PASS' if bars['pass_floor'] else 'FAIL'}).",
            "",
        ]
    path.write_text("\n".join(lines) + "\n" + meta.get("notes", ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", help="internal: measure one case in this process and print JSON")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (>= 2: state is lazy)")
    ap.add_argument("--allocator", choices=list(ALLOCATOR_ENV), default="fixed")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--notes", default=None, help="markdown file appended under the generated tables")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (optimizer state is created at the first step)")

    if args.case:
        print(json.dumps(measure(args.case, args.seq, args.steps)))
        return 0

    import torch
    from importlib.metadata import version

    results = {}
    order = ["weights", "activations"] + args.cases + [p for p in PROBES if p not in ("weights", "activations")]
    for seq in args.seqs:
        for case in order:
            res = run_case(case, seq, args.steps, args.allocator)
            results[(case, seq)] = res
            print(f"seq {seq:4d}  {case:22s} peak {res['peak'] / MB:8.1f} MB  at {res.get('peak_stage', '-'):20s} "
                  f"({res['wall_seconds']} s)", flush=True)
    summary = summarize(results, args.seqs, args.cases)
    bars = check_bars(summary)
    cmd = "python tools/bench_memory.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    meta = dict(
        command=cmd, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        torch=torch.__version__, megatron=version("megatron-core"), steps=args.steps,
        threads=os.environ.get("OMP_NUM_THREADS", "1"),
        malloc=" ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV[args.allocator].items()) or "defaults",
        notes=Path(args.notes).read_text() if args.notes else "",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / "memory.md", summary, bars, meta)
    payload = dict(
        meta={k: v for k, v in meta.items() if k != "notes"}, bars=bars,
        summary={str(k): v for k, v in summary.items()},
        runs=[v for v in results.values()],
    )
    (out / "memory.json").write_text(json.dumps(payload, indent=1) + "\n")
    for seq, s in summary.items():
        print(f"seq {seq}: floor {s['floor']['floor'] / MB:.1f} MB")
    if bars:
        print(f"AdaLomo fused: {bars['x_adamw']:.3f} x AdamW, {bars['x_floor']:.3f} x floor")
        return 0 if bars["pass_adamw"] and bars["pass_floor"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
