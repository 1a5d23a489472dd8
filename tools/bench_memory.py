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
heap. ``--allocator default`` measures with glibc's defaults instead (dynamic mmap threshold);
a full run also repeats AdamW and AdaLomo (fused) that way and reports both.

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

Diagnostic probes: ``fwdbwd_free`` (forward + backward, every gradient dropped by its
post-accumulate hook, no optimizer: what any fused update costs at best with this model), and
the ``*_stock`` probes, which put megatron's own forwards back
(``pretrain.models.tied_embedding.use_megatron_forward``: two dense gradients for the tied
embedding in backward, what the model did before it built that gradient in place), and
``adalomo_fused_notrim``: AdaLomo (fused) without the framework's heap trims (``memopt.heap``:
``build_gpt(release_init_memory=False)``, ``heap_trim_every=None``), what they buy with glibc's
default malloc.

The tables and the analysis under them are written by ``tools/bench_memory_report.py``.

    python tools/bench_memory.py                         # all cases, seq 128 and 512, writes docs
    python tools/bench_memory.py --seqs 128 --cases adamw adalomo_fused --out /tmp/mem
    python tools/bench_memory.py --case fwdbwd_free --seq 512         # a probe
    python tools/bench_memory.py --case adalomo_fused --seq 128      # one case, JSON on stdout

Exit status 1 when AdaLomo (fused) misses a bar at the required sequence length (128):
<= 0.4 x AdamW and <= 1.1 x its floor, with the fixed mmap threshold and in every run with
glibc's default malloc.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory_report import CASES, MB, PROBES, render, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

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
        self.hwm_before = hwm()  # imports' transients: not counted (the baseline is the RSS now)
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


def _build(torch, release_init_memory: bool = True):
    from pretrain.models import build_gpt, get_preset

    cfg = get_preset("gpt2-124m", "gpt", hidden_dropout=0.0, attention_dropout=0.0)
    model = build_gpt(cfg, seed=1234, release_init_memory=release_init_memory)
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


# Each optimizer case as (memopt registry name, hyperparameters): built the way a training run
# builds its optimizer, so the memory measured is that of the optimizer a run would get.
OPTIMIZER_OF = {
    "adamw": ("adamw", dict(lr=1e-4)),
    "adamw_foreach": ("adamw", dict(lr=1e-4, foreach=True)),
    "adafactor": ("adafactor", {}),  # relative step size: no lr
    "adalomo_step": ("adalomo", dict(lr=1e-3)),
    "adalomo_fused": ("adalomo", dict(lr=1e-3)),
    "adalomo_fused_stock": ("adalomo", dict(lr=1e-3)),
    "adalomo_fused_clip": ("adalomo", dict(lr=1e-3, clip_grad_norm=1.0)),
    "adalomo_fused_notrim": ("adalomo", dict(lr=1e-3, heap_trim_every=None)),
    "adapprox": ("adapprox", dict(lr=1e-4)),
}


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
    # Imported before the baseline, like everything the process holds before the model exists.
    from memopt import create_optimizer
    from pretrain.models import gpt_loss
    from pretrain.models.tied_embedding import use_megatron_forward

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    meter = Meter()
    with meter.stage("build"):
        # The notrim probe is the framework without its heap trims (memopt.heap): none after
        # the build, none in fused backward.
        model, cfg = _build(torch, release_init_memory=case != "adalomo_fused_notrim")
    params = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    largest = max(params, key=lambda p: p.numel())
    out = dict(
        case=case, seq=seq, steps=steps, baseline=meter.baseline, hwm_before_baseline=meter.hwm_before,
        weights=weights,
        largest_param=dict(shape=list(largest.shape), bytes=largest.numel() * largest.element_size()),
        n_params=sum(p.numel() for p in params), threads=torch.get_num_threads(),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        build_peak=meter.stages[0]["peak"], after_build=meter.stages[0]["after"],
    )
    if case.endswith("_stock") or case == "activations":
        # activations: megatron's linear backward is patched below to skip its weight gradient;
        # the in-place tied output layer would still form the tied weight's.
        use_megatron_forward(model)

    if case == "weights":
        out.update(peak=meter.stages[0]["after"], stages=meter.stages)
        return out

    opt = None
    if case in OPTIMIZER_OF:
        with meter.stage("optimizer"):
            name, hparams = OPTIMIZER_OF[case]
            opt = create_optimizer(name, params, **hparams)

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
        if case in ("fwdbwd_free", "fwdbwd_free_stock"):
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
    trimmer = getattr(opt, "heap_trimmer", None)
    if trimmer is not None:  # fused backward's malloc_trim calls over all steps, and their time
        out.update(heap_trims=trimmer.calls, heap_trim_seconds=round(trimmer.seconds, 4))
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


def _source() -> str:
    """The commit measured, and whether memopt/ or pretrain/ differ from it."""
    def git(*a):
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "memopt", "pretrain")
    return commit + (" + uncommitted changes in memopt/ or pretrain/" if dirty else " (clean memopt/, pretrain/)")


def run_all(cases, seqs, steps, allocator, probes=True) -> dict:
    results = {}
    order = ["weights", "activations"] + [c for c in cases if c not in ("weights", "activations")]
    if probes:
        order += [p for p in PROBES if p not in order]
    for seq in seqs:
        for case in order:
            res = run_case(case, seq, steps, allocator)
            results[(case, seq)] = res
            print(f"[{allocator}] seq {seq:4d}  {case:22s} peak {res['peak'] / MB:8.1f} MB  at "
                  f"{res.get('peak_stage', '-'):36s} ({res['wall_seconds']} s)", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", help="internal: measure one case in this process and print JSON")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (>= 2: state is lazy)")
    ap.add_argument("--allocator", choices=list(ALLOCATOR_ENV), default="fixed")
    ap.add_argument("--no-allocator-check", action="store_true",
                    help="skip the AdamW / AdaLomo (fused) rerun with glibc's default malloc")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--render", metavar="JSON", help="rewrite memory.md in --out from a memory.json, no runs")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (optimizer state is created at the first step)")

    if args.case:
        print(json.dumps(measure(args.case, args.seq, args.steps)))
        return 0

    if args.render:
        return render(Path(args.render), Path(args.out))

    from importlib.metadata import version

    results = run_all(args.cases, args.seqs, args.steps, args.allocator)
    default_runs = []
    if args.allocator == "fixed" and not args.no_allocator_check:
        cases = [c for c in ("adamw", "adalomo_fused") if c in args.cases] + ["adalomo_fused_stock", "adalomo_fused_notrim"]
        default_runs = [run_all(cases, args.seqs[:1], args.steps, "default", probes=False) for _ in range(3)]
    given = sys.argv[1:] if argv is None else list(argv)
    meta = dict(
        source=_source(),
        command=" ".join(["python tools/bench_memory.py"] + given),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        torch=torch.__version__, megatron=version("megatron-core"), steps=args.steps,
        threads=os.environ.get("OMP_NUM_THREADS", "1"),
        malloc=" ".join(f"{k}={v}" for k, v in ALLOCATOR_ENV[args.allocator].items()) or "defaults",
    )
    meta.update(seqs=args.seqs, cases=args.cases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(
        meta=meta, runs=list(results.values()),
        runs_glibc_default_malloc=[list(r.values()) for r in default_runs],
    )
    summary, bars = write_outputs(payload, results, default_runs, out)
    for seq, s in summary.items():
        print(f"seq {seq}: floor {s['floor']['floor'] / MB:.1f} MB")
    if bars:
        print(f"AdaLomo fused at 1 x {bars['seq']}: {bars['x_adamw']:.3f} x AdamW, {bars['x_floor']:.3f} x floor")
        for run in bars["glibc_default_runs"]:
            print(f"  glibc default malloc: {run['x_adamw']:.3f} x AdamW, {run['x_floor']:.3f} x floor")
        return 0 if bars["pass"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
