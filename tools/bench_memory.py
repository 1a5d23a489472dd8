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
the ``*_tied`` probes, which build the tied embedding's gradient in place
(``tie_gradient_in_place``, the fix proposed for ``pretrain/models/gpt.py``).

    python tools/bench_memory.py                         # all cases, seq 128 and 512, writes docs
    python tools/bench_memory.py --seqs 128 --cases adamw adalomo_fused --out /tmp/mem
    python tools/bench_memory.py --case fwdbwd_free --seq 512         # a probe
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

import torch

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


class _TiedGrad:
    """The output layer's part of the tied weight's gradient, for the lookup of the same forward."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward returns the tied weight's WHOLE gradient:
    the output layer's part (left in ``holder`` by ``_TiedOutput``) plus its rows, added in place."""

    @staticmethod
    def forward(ctx, ids, weight, holder):
        ctx.save_for_backward(ids)
        ctx.holder, ctx.shape = holder, weight.shape
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        acc, ctx.holder.grad = ctx.holder.grad, None
        if acc is None:  # no output layer in this backward (or it ran on another graph)
            acc = g.new_zeros(ctx.shape)
        acc.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return None, acc, None


class _TiedOutput(torch.autograd.Function):
    """``x @ weight.T`` whose backward keeps its weight gradient in ``holder`` (accumulated in
    place) instead of returning it: autograd then never holds two vocab x hidden gradients."""

    @staticmethod
    def forward(ctx, x, weight, holder):
        ctx.save_for_backward(x, weight)
        ctx.holder = holder
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.holder.grad is None:
            ctx.holder.grad = g2.t().matmul(x2)
        else:  # the same forward's output used twice: still in place
            ctx.holder.grad.addmm_(g2.t(), x2)
        return g.matmul(weight), None, None


def _tied_lookup_forward(self, input_):
    holder = _TiedGrad()
    self.weight._tied_grad_holder = holder  # picked up by the output layer of this forward
    return _TiedLookup.apply(input_, self.weight, holder)


def _tied_output_forward(self, input_, weight=None, runtime_gather_output=None):
    weight = self.weight if weight is None else weight
    holder = getattr(weight, "_tied_grad_holder", None)
    if holder is None:  # not preceded by a tied lookup: plain linear, ordinary gradient
        return torch.matmul(input_, weight.t()), None
    weight._tied_grad_holder = None
    return _TiedOutput.apply(input_, weight, holder), None


def tie_gradient_in_place(model) -> None:
    """Give the tied word embedding ONE gradient tensor, built in place (TP = 1 only).

    Stock autograd gives the tied weight two dense vocab x hidden gradients, the output layer's
    (early in backward) and the lookup's (``embedding_dense_backward``, at the very end), and
    sums them: at the end of backward two such tensors are alive at once, 155 MB more than one.
    Here the output layer's backward leaves its weight gradient in a holder made by the lookup of
    the same forward, and the lookup's backward adds its rows into it (``index_add_``) and
    returns it as the weight's only gradient. The post-accumulate hook (the fused update) sees
    the full gradient once; no second vocab x hidden tensor is made. One holder per forward, so
    several forwards in one graph, retained graphs and gradient accumulation stay exact.
    Measured by the ``*_tied`` probes as the fix proposed for ``pretrain/models/gpt.py``;
    ``tests/test_bench_memory.py`` checks that the gradients are unchanged.
    """
    import types

    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("tie_gradient_in_place: TP = 1 only")
    emb, out = model.embedding.word_embeddings, model.output_layer
    if getattr(out, "bias", None) is not None or getattr(emb, "reduce_scatter_embeddings", False):
        raise ValueError("tie_gradient_in_place: output layer without bias, no sequence parallelism")
    emb.forward = types.MethodType(_tied_lookup_forward, emb)
    out.forward = types.MethodType(_tied_output_forward, out)


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
        case=case, seq=seq, steps=steps, baseline=meter.baseline, hwm_before_baseline=meter.hwm_before,
        weights=weights,
        largest_param=dict(shape=list(largest.shape), bytes=largest.numel() * largest.element_size()),
        n_params=sum(p.numel() for p in params), threads=torch.get_num_threads(),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        build_peak=meter.stages[0]["peak"], after_build=meter.stages[0]["after"],
    )
    if case.endswith("_tied"):
        tie_gradient_in_place(model)

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
        activations_stage=a["peak_stage"], largest_grad=largest, largest_shape=w["largest_param"]["shape"],
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
        seq=REQUIRED_SEQ, x_adamw=row["x_adamw"], pass_adamw=row["x_adamw"] <= BAR_VS_ADAMW,
        x_floor=row["x_floor"], pass_floor=row["x_floor"] <= BAR_VS_FLOOR,
    )


def _stage(res: dict, name: str, step: int) -> dict:
    return next(s for s in res["stages"] if s["stage"] == name and s["step"] == step)


def analysis(results: dict, summary: dict, steps: int) -> str:
    """The paragraphs under the tables, with this run's numbers."""
    last = steps - 1
    head, tail = "backward: output layer + blocks", "backward: lookup + embedding"
    L = ["## Where the peaks are", ""]
    for seq, s in summary.items():
        fl = s["floor"]
        big = fl["largest_grad"]
        fused = results.get(("adalomo_fused", seq))
        free = results.get(("fwdbwd_free", seq))
        tied = results.get(("adalomo_fused_tied", seq))
        if not (fused and free):
            continue
        h, t = _stage(fused, head, last), _stage(fused, tail, last)
        extra = fused["peak"] - free["peak"]
        where = (
            "The tail is the step's peak." if t["peak"] >= h["peak"] else
            "Here the head is the step's peak (activations outweigh the tail's extra gradient)."
        )
        L += [
            f"**AdaLomo (fused), batch 1 x {seq}: {_mb(fused['peak'])} MB = "
            f"{fused['peak'] / fl['floor']:.3f} x floor.** Backward is split where the gradient "
            f"reaches the embedding output. The head (output layer, all blocks, and the fused "
            f"updates of their parameters) peaks at {_mb(h['peak'])} MB: weights + the activations "
            f"still saved + the tied weight's output-layer gradient ({_mb(big)} MB), which autograd "
            f"holds until the lookup's gradient arrives; RSS at the split {_mb(h['after'])} MB. "
            f"The tail (embedding lookup backward, the tied weight's gradient sum, its update) peaks "
            f"at {_mb(t['peak'])} MB, {_mb(t['peak'] - h['after'])} MB above the split: "
            f"`embedding_dense_backward` makes a second dense {fl['largest_shape'][0]} x "
            f"{fl['largest_shape'][1]} gradient, alive next to the held one until autograd adds "
            f"them. {where} The optimizer is not the cause: forward + backward with every gradient "
            f"dropped by its hook and no update at all peaks at {_mb(free['peak'])} MB; the fused "
            f"update adds {extra / MB:.1f} MB (its row-block scratch, 2 MiB per matrix in flight, "
            f"and {fused['state_bytes'] / MB:.1f} MB of factored state).",
            "",
        ]
        if tied:
            tl = _stage(tied, tail, last)
            L += [
                f"With the tied gradient built in place (`tie_gradient_in_place`, below) the tail "
                f"peaks at {_mb(tl['peak'])} MB and the step at {_mb(tied['peak'])} MB = "
                f"{tied['peak'] / fl['floor']:.3f} x floor"
                + (f", {tied['peak'] / results[('adamw', seq)]['peak']:.3f} x AdamW" if ("adamw", seq) in results else "")
                + ".",
                "",
            ]
    L += [
        "**AdamW** (torch's default on CPU is the single-tensor loop; `foreach=True` is shown too) "
        "peaks in `step()`: weights + gradients + two moments (4 x weights) + the temporaries of the "
        "embedding's denominator (`exp_avg_sq.sqrt()` then `/ sqrt(bias_correction2)`: two "
        "vocab x hidden tensors). `foreach` makes such temporaries for all parameters at once.",
        "",
        "**Adafactor / AdaLomo (backward + step)** peak at the end of backward: weights + all "
        "gradients (the full set exists before `step()`) + the tied embedding's second gradient.",
        "",
        "**Adapprox** keeps a dense first moment (beta1 = 0.9: as large as the weights) and its "
        "low-rank factors; its peak is in `step()` with all gradients resident.",
        "",
    ]
    clip = [(seq, results[("adalomo_fused_clip", seq)]["peak"] - results[("adalomo_fused", seq)]["peak"])
            for seq in summary if ("adalomo_fused_clip", seq) in results and ("adalomo_fused", seq) in results]
    if clip:
        L += [
            "**Two-pass clipping** (AdaLomo fused with `clip_grad_norm`, graph recomputed with "
            "`recompute_loss`, the mode megatron's in-place cross-entropy backward needs) costs one more "
            "forward + backward in time and "
            + ", ".join(f"{d / MB:+.1f} MB at 1 x {q}" for q, d in clip)
            + " in memory: the first pass frees every gradient at once and the graph is not retained.",
            "",
        ]
    return "\n".join(L)


METHOD = """## How each number is measured

* **Process and baseline.** Each case is a fresh `python tools/bench_memory.py --case NAME
  --seq N` process. After imports and megatron's parallel-state setup it runs `gc.collect()`
  and `malloc_trim(0)` and resets the kernel's RSS high-water mark to the current RSS
  (`echo 5 > /proc/self/clear_refs`, which resets `VmHWM` and `getrusage().ru_maxrss`). That
  RSS is the baseline; the imports' own transient high-water mark is not counted
  (`hwm_before_baseline` in the JSON).
* **Peak.** The high-water mark is read and reset at the end of every stage (model build,
  forward, backward, optimizer step); the peak of a case is the highest stage mark over the
  training steps (not the build) minus the baseline. Resetting never lowers a later mark below
  the true maximum, so the highest stage mark is the process's high-water mark over the steps.
  Training steps: random tokens (batch 1 x seq, next-token labels), GPT-2 124M preset of
  `pretrain.models` (12 x 768, vocab 50257 padded to 50304, tied embeddings), fp32, dropout 0.
  `--steps` (>= 2) steps, so every optimizer's lazily created state exists in the measured steps.
* **Allocator.** RSS counts pages that are touched and not given back. With glibc's dynamic mmap
  threshold, freed blocks up to 32 MiB may stay in the heap, so RSS would include freed memory.
  Every case therefore runs with `MALLOC_MMAP_THRESHOLD_=65536` (each allocation of 64 KiB or
  more is its own mmap and is unmapped on free), `MALLOC_TRIM_THRESHOLD_=131072`,
  `MALLOC_ARENA_MAX=2`, `OMP_NUM_THREADS=1`; RSS then follows the tensors torch really holds.
  `--allocator default` repeats a run with glibc's defaults (table below).
* **weights** = the sum of parameter bytes (`numel * element_size`, the tied embedding once).
  Cross-check: RSS growth of building the model (probe `weights`), a few MB more (modules,
  megatron bookkeeping).
* **activations** = the peak of a forward + backward of the real training graph (parameters
  require grad, so every saved tensor is the training one, megatron's cross-entropy with its
  seq x 50304 logits included) in which no parameter gradient is ever formed, minus weights
  (probe `activations`). The backward is `torch.autograd.grad(loss, embedding_output)`, so
  autograd skips the weight-gradient branches of torch ops and every AccumulateGrad; megatron's
  linear backward, which computes its weight gradient unconditionally, is patched in that probe
  only to skip it.
* **largest single gradient** = the bytes of the largest parameter: the tied word embedding,
  50304 x 768 fp32.
* **held after step** = RSS after the last stage of the last step, minus the baseline:
  weights + optimizer state + whatever survives between steps.
* **optimizer state** = bytes of the tensors in `optimizer.state` (`memopt.base.optimizer_state_bytes`).

## Fix for the tied embedding's second gradient (proposed for `pretrain/models/gpt.py`)

`tools/bench_memory.py: tie_gradient_in_place(model)` (TP = 1; tested in
`tests/test_bench_memory.py`: same gradients for one forward, two forwards in one graph and
accumulated micro-batches; same AdaLomo fused steps). The word-embedding lookup and the output
layer become two small autograd functions sharing a per-forward holder: the output layer's
backward leaves its weight gradient in the holder instead of returning it; the lookup's
backward adds its rows into that tensor (`index_add_`) and returns it as the weight's only
gradient. Autograd then never holds two vocab x hidden gradients, and the post-accumulate hook
still sees the complete gradient exactly once. A sparse lookup gradient
(`F.embedding(..., sparse=True)`) does not help on torch 2.13: autograd's input buffer counts
sparse tensors as "subclass-like" and adds dense + sparse out of place, which makes the same
second dense tensor (measured once with an earlier version of this tool at 1 x 128: forward +
backward peaks at 829.9 MB with the sparse lookup, 829.3 MB without). memopt itself
needs no change: its fused update works in row blocks and adds a few MB.
"""


def write_markdown(path: Path, summary: dict, bars: dict, meta: dict, notes: str) -> None:
    lines = [
        "# Peak memory of a training step (GPT-2 124M shapes, fp32, CPU)",
        "",
        "Generated by `tools/bench_memory.py` (tables and numbers in the text come from the run). Command:",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"Source: commit {meta['source']}. Machine: {meta['machine']}. torch {meta['torch']}, megatron-core {meta['megatron']}. "
        f"{meta['steps']} training steps per case, each case in a fresh process, "
        f"OMP_NUM_THREADS={meta['threads']}, glibc malloc with `{meta['malloc']}`.",
        "",
        "**peak** = highest RSS high-water mark during the training steps minus the baseline RSS "
        "(after imports and megatron's parallel-state setup, before the model exists). "
        "MB = 10^6 bytes. *Italic* rows are probes (diagnostics, not optimizers). "
        "`peak at` names the stage whose high-water mark is the peak.",
        "",
    ]
    if bars:
        lines += [
            f"**Bars at batch 1 x {bars['seq']}: AdaLomo (fused) = {bars['x_adamw']:.3f} x AdamW "
            f"(bar <= {BAR_VS_ADAMW}: {'PASS' if bars['pass_adamw'] else 'FAIL'}), "
            f"{bars['x_floor']:.3f} x floor (bar <= {BAR_VS_FLOOR}: {'PASS' if bars['pass_floor'] else 'FAIL'}).**",
            "",
        ]
    for seq, s in summary.items():
        fl = s["floor"]
        lines += [
            f"## batch 1 x {seq}",
            "",
            f"Floor = weights {_mb(fl['weights'])} MB + activations {_mb(fl['activations'])} MB "
            f"+ largest single gradient {_mb(fl['largest_grad'])} MB = **{_mb(fl['floor'])} MB** "
            f"(RSS of the built model: {_mb(fl['weights_rss'])} MB).",
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
    lines.append(notes)
    path.write_text("\n".join(lines).rstrip() + "\n")


def allocator_table(default_runs: list[dict], results: dict, seq: int) -> str:
    """Fixed mmap threshold vs glibc defaults, each default run repeated (its numbers vary)."""
    cases = ("weights", "activations", "adamw", "adalomo_fused", "adalomo_fused_tied")
    rows = [
        f"## glibc's default malloc vs the fixed mmap threshold (batch 1 x {seq})",
        "",
        "The same cases with glibc's default malloc settings (dynamic mmap threshold: after a large "
        "block is freed, blocks up to that size come from the heap, and freed heap memory may stay "
        f"resident), {len(default_runs)} fresh processes each; x floor against the floor of the main "
        "table (the bytes really held):",
        "",
        "| case | peak, fixed threshold (MB) | peak, glibc defaults (MB), each run | glibc defaults, x floor |",
        "|---|---:|---:|---:|",
    ]
    floor = floor_terms(results, seq)["floor"]  # the bytes really held: measured with the fixed threshold
    for case in cases:
        a = results.get((case, seq))
        bs = [r.get((case, seq)) for r in default_runs]
        if not a or not all(bs):
            continue
        xf = "-" if case in ("weights", "activations") else ", ".join(
            f"{b['peak'] / floor:.3f}" for b in bs)
        rows.append(f"| {case} | {_mb(a['peak'])} | {', '.join(_mb(b['peak']) for b in bs)} | {xf} |")
    def ratios(case):
        return ", ".join(f"{r[(case, seq)]['peak'] / r[('adamw', seq)]['peak']:.3f}" for r in default_runs
                         if (case, seq) in r and ("adamw", seq) in r)

    kept = [r["after_build"] - r["weights"] for run in default_runs for r in run.values()]
    w = results.get(("weights", seq))
    if ratios("adalomo_fused") and w:
        rows += [
            "",
            f"With glibc's defaults AdaLomo (fused) = {ratios('adalomo_fused')} x AdamW "
            f"(with the tied gradient built in place: {ratios('adalomo_fused_tied')}). The extra is "
            "freed memory that glibc keeps, not memory the program holds: right after the model is "
            f"built (the same model every time) the RSS is already {_mb(min(kept))} to "
            f"{_mb(max(kept))} MB above the weights in these processes ({_mb(w['after_build'] - w['weights'])} MB "
            "with the fixed threshold): blocks freed while the model was built stay in the heap, more "
            "are kept during the steps, and the amount differs from process to process. The savings "
            "of a fused update reach the process's RSS only with an allocator that returns freed "
            "blocks, e.g. `MALLOC_MMAP_THRESHOLD_=65536` in the launch environment or "
            "`mallopt(M_MMAP_THRESHOLD, 65536)` at start-up.",
            "",
        ]
    return "\n".join(rows) + "\n"


def write_outputs(payload: dict, results: dict, default_runs: list[dict], out: Path):
    """memory.md and memory.json from the raw runs (also used by ``--render``)."""
    meta = payload["meta"]
    seqs, cases = meta["seqs"], meta["cases"]
    summary = summarize(results, seqs, cases)
    bars = check_bars(summary)
    notes = analysis(results, summary, meta["steps"]) + "\n" + METHOD
    if default_runs:
        notes += "\n" + allocator_table(default_runs, results, seqs[0])
    write_markdown(out / "memory.md", summary, bars, meta, notes)
    payload = dict(payload, bars=bars, summary={str(k): v for k, v in summary.items()})
    order = ("meta", "bars", "summary", "runs", "runs_glibc_default_malloc")
    (out / "memory.json").write_text(json.dumps({k: payload[k] for k in order}, indent=1) + "\n")
    return summary, bars


def render(path: Path, out: Path) -> int:
    payload = json.loads(path.read_text())
    payload["meta"].setdefault("seqs", sorted({r["seq"] for r in payload["runs"]}))
    payload["meta"].setdefault("cases", [c for c in CASES if any(r["case"] == c for r in payload["runs"])])
    results = {(r["case"], r["seq"]): r for r in payload["runs"]}
    default_runs = [{(r["case"], r["seq"]): r for r in run} for run in payload.get("runs_glibc_default_malloc", [])]
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(payload, results, default_runs, out)
    return 0


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
        cases = [c for c in ("adamw", "adalomo_fused") if c in args.cases] + ["adalomo_fused_tied"]
        default_runs = [run_all(cases, args.seqs[:1], args.steps, "default", probes=False) for _ in range(2)]
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
        return 0 if bars["pass_adamw"] and bars["pass_floor"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
