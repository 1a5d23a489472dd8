"""The report half of ``tools/bench_memory.py``: memory.md and memory.json from the raw runs.

Everything here is a function of the runs' JSON lines (no torch, no measuring), so
``bench_memory.py --render memory.json`` rewrites the report without running a case.
"""
from __future__ import annotations

import json
from pathlib import Path

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
    "fwdbwd_free_stock": "as fwdbwd_free, megatron's stock tied-embedding backward (two dense gradients)",
    "adalomo_fused_stock": "AdaLomo (fused), megatron's stock tied-embedding backward (two dense gradients)",
    "adalomo_fused_notrim": "AdaLomo (fused), no heap trims (release_init_memory=False, heap_trim_every=None)",
}
REQUIRED_SEQ = 128
BAR_VS_ADAMW = 0.40
BAR_VS_FLOOR = 1.10


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


def check_bars(summary: dict, default_runs: list[dict]) -> dict:
    """AdaLomo (fused) against the bars at REQUIRED_SEQ: with the fixed mmap threshold (the main
    table) and in every run with glibc's default malloc (x floor against the main table's floor,
    the bytes really held). ``pass`` only if all of them meet both bars."""
    s = summary.get(REQUIRED_SEQ)
    if s is None:
        return {}
    row = next((r for r in s["rows"] if r["case"] == "adalomo_fused"), None)
    if row is None or row["x_adamw"] is None:
        return {}
    floor = s["floor"]["floor"]
    glibc = [dict(x_adamw=run[("adalomo_fused", REQUIRED_SEQ)]["peak"] / run[("adamw", REQUIRED_SEQ)]["peak"],
                  x_floor=run[("adalomo_fused", REQUIRED_SEQ)]["peak"] / floor)
             for run in default_runs if ("adalomo_fused", REQUIRED_SEQ) in run and ("adamw", REQUIRED_SEQ) in run]
    bars = dict(
        seq=REQUIRED_SEQ, x_adamw=row["x_adamw"], pass_adamw=row["x_adamw"] <= BAR_VS_ADAMW,
        x_floor=row["x_floor"], pass_floor=row["x_floor"] <= BAR_VS_FLOOR, glibc_default_runs=glibc,
    )
    bars["pass"] = bars["pass_adamw"] and bars["pass_floor"] and all(
        r["x_adamw"] <= BAR_VS_ADAMW and r["x_floor"] <= BAR_VS_FLOOR for r in glibc)
    return bars


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
        stock = results.get(("adalomo_fused_stock", seq))
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
            f"keeps until the lookup's backward; RSS at the split {_mb(h['after'])} MB. "
            f"The tail (embedding lookup backward, which adds its rows into that gradient in place, "
            f"and the tied weight's update) peaks at {_mb(t['peak'])} MB, "
            f"{(t['peak'] - h['after']) / MB:.1f} MB above the split: no second dense "
            f"{fl['largest_shape'][0]} x {fl['largest_shape'][1]} gradient is made "
            f"(`pretrain/models/tied_embedding.py`). {where} The optimizer is not the cause: forward + backward with every gradient "
            f"dropped by its hook and no update at all peaks at {_mb(free['peak'])} MB; the fused "
            f"update adds {extra / MB:.1f} MB (its row-block scratch, 2 MiB per matrix in flight, "
            f"and {fused['state_bytes'] / MB:.1f} MB of factored state).",
            "",
        ]
        if stock:
            tl = _stage(stock, tail, last)
            L += [
                f"With megatron's stock backward instead (probe `adalomo_fused_stock`: "
                f"`embedding_dense_backward` makes a second dense gradient, alive next to the output "
                f"layer's until autograd adds them) the tail peaks at {_mb(tl['peak'])} MB and the step "
                f"at {_mb(stock['peak'])} MB = {stock['peak'] / fl['floor']:.3f} x floor"
                + (f", {stock['peak'] / results[('adamw', seq)]['peak']:.3f} x AdamW" if ("adamw", seq) in results else "")
                + ".",
                "",
            ]
    L += [
        "**AdamW** (torch's default on CPU is the single-tensor loop; `foreach=True` is shown too) "
        "peaks in `step()`: weights + gradients + two moments (4 x weights) + the temporaries of the "
        "embedding's denominator (`exp_avg_sq.sqrt()` then `/ sqrt(bias_correction2)`: two "
        "vocab x hidden tensors). `foreach` makes such temporaries for all parameters at once.",
        "",
        "**Adafactor / AdaLomo (backward + step)** peak at the end of backward or in `step()` "
        "(`peak at` says which): weights + all gradients (the full set exists before `step()`) + "
        "the step's temporaries.",
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
  A full run repeats AdamW and the AdaLomo (fused) cases with glibc's defaults (table below;
  `--allocator default` runs a whole table that way). The framework itself returns freed heap
  pages with `malloc_trim(0)` (`memopt.heap`: once after `build_gpt`, and during
  `fused_backward`); with the fixed threshold those calls find little to return.
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

## Building the tied embedding's gradient in place (GPT's default at TP = 1, `pretrain/models/tied_embedding.py`)

`MegatronGPT` replaces the forwards of its word-embedding lookup and output layer with two small
autograd functions sharing a per-forward holder (at TP = 1 without sequence parallelism; under
tensor parallelism megatron's own forwards stay). The output layer's backward leaves its weight
gradient in the holder instead of returning it; the lookup's backward sums its rows with the
same kernel as stock autograd (`embedding_dense_backward`, over a compact id space of one slot
per token) and adds each distinct row into that tensor once (`index_add_`), returning it as the
weight's only gradient. Autograd then never holds two vocab x hidden gradients, the
post-accumulate hook still sees the complete gradient exactly once, and the gradient is
bitwise the stock one (`tests/pretrain/models/test_tied_embedding.py`: fp32 and bf16, repeated
and distinct ids, accumulated micro-batches, fused AdaLomo steps; logits unchanged). The
`*_stock` probes put megatron's forwards back (`use_megatron_forward`) to show the difference.
A sparse lookup gradient (`F.embedding(..., sparse=True)`) does not help on torch 2.13:
autograd's input buffer counts sparse tensors as "subclass-like" and adds dense + sparse out of
place, which makes the same second dense tensor. memopt itself needs no change: its fused
update works in row blocks and adds a few MB.
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
            f"{bars['x_floor']:.3f} x floor (bar <= {BAR_VS_FLOOR}: {'PASS' if bars['pass_floor'] else 'FAIL'})"
            + (f"; with glibc's default malloc (no MALLOC_* settings), each run: "
               + ", ".join(f"{r['x_adamw']:.3f} x AdamW and {r['x_floor']:.3f} x floor" for r in bars["glibc_default_runs"])
               if bars.get("glibc_default_runs") else "")
            + f". Overall: {'PASS' if bars['pass'] else 'FAIL'}.**",
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


def _default_malloc_verdict(default_runs: list[dict], floor: float, seq: int) -> str:
    """Whether AdaLomo (fused) met both bars in every glibc-default process, in words."""
    runs = [r for r in default_runs if ("adalomo_fused", seq) in r and ("adamw", seq) in r]
    fused = [r[("adalomo_fused", seq)]["peak"] for r in runs]
    met = [f / r[("adamw", seq)]["peak"] <= BAR_VS_ADAMW and f / floor <= BAR_VS_FLOOR for f, r in zip(fused, runs)]
    if all(met):
        return (f"AdaLomo (fused) met both bars (<= {BAR_VS_ADAMW} x AdamW, <= {BAR_VS_FLOOR} x floor) in "
                f"all {len(runs)} processes with glibc's defaults.")
    return (f"With glibc's defaults AdaLomo (fused) met both bars (<= {BAR_VS_ADAMW} x AdamW, <= "
            f"{BAR_VS_FLOOR} x floor) in {sum(met)} of {len(runs)} processes: its peak ranged over "
            f"{_mb(min(fused))} to {_mb(max(fused))} MB ({min(fused) / floor:.2f} to {max(fused) / floor:.2f} x "
            "floor) for the same bytes held, so with glibc's dynamic mmap threshold the bars are a matter "
            "of the process's heap history, not of the program.")


def allocator_table(default_runs: list[dict], results: dict, seq: int) -> str:
    """Fixed mmap threshold vs glibc defaults, each default run repeated (its numbers vary)."""
    cases = ("weights", "activations", "adamw", "adalomo_fused", "adalomo_fused_stock", "adalomo_fused_notrim")
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

    def kept(cases):  # RSS right after the build above the weights: freed memory glibc keeps
        ks = [r[(c, seq)]["after_build"] - r[(c, seq)]["weights"] for r in default_runs for c in cases if (c, seq) in r]
        if not ks:
            return "-"
        return f"{_mb(ks[0])} MB" if _mb(min(ks)) == _mb(max(ks)) else f"{_mb(min(ks))} to {_mb(max(ks))} MB"

    w = results.get(("weights", seq))
    fused = [r[("adalomo_fused", seq)] for r in default_runs if ("adalomo_fused", seq) in r]
    if ratios("adalomo_fused") and w:
        rows += [
            "",
            f"With glibc's defaults AdaLomo (fused) = {ratios('adalomo_fused')} x AdamW "
            f"(with megatron's stock tied-embedding backward: {ratios('adalomo_fused_stock')}). "
            + _default_malloc_verdict(default_runs, floor, seq),
            "",
            "What glibc's defaults add over the fixed threshold is freed memory that glibc keeps, not "
            "memory the program holds, and the framework gives it back with `malloc_trim(0)` "
            "(`memopt.heap`; glibc's settings untouched). *Build:* megatron's CPU initialisation "
            "makes two full-size temporaries per weight; `build_gpt` trims once after it. Right after "
            f"the build the RSS is {kept(['weights', 'activations', 'adamw', 'adalomo_fused', 'adalomo_fused_stock'])} "
            f"above the weights in these processes ({_mb(w['after_build'] - w['weights'])} MB with the fixed "
            f"threshold), {kept(['adalomo_fused_notrim'])} without the trim (probe `adalomo_fused_notrim`). "
            "*Fused backward:* with the dynamic threshold every weight gradient and freed activation "
            "below 32 MiB lives in the heap; small requests split the freed gradient-sized blocks, so "
            "each new gradient takes fresh pages and the RSS rises through the backward instead of "
            "falling. `fused_backward` trims once before backward (what the forward freed) and once "
            "per `heap_trim_every` (32 MiB) of gradients consumed"
            + (f": {fused[0]['heap_trims'] / fused[0]['steps']:.0f} calls per step here, "
               + ", ".join(f"{1e3 * r['heap_trim_seconds'] / r['steps']:.1f}" for r in fused)
               + " ms per step inside `malloc_trim` in these processes"
               if fused and "heap_trims" in fused[0] else "")
            + ". The probe `adalomo_fused_notrim` (both trims off: the framework before them) shows "
            "what they buy; `heap_trim_every=None` turns the fused backward's trims off.",
            "",
        ]
    return "\n".join(rows) + "\n"


def write_outputs(payload: dict, results: dict, default_runs: list[dict], out: Path):
    """memory.md and memory.json from the raw runs (also used by ``--render``)."""
    meta = payload["meta"]
    seqs, cases = meta["seqs"], meta["cases"]
    summary = summarize(results, seqs, cases)
    bars = check_bars(summary, default_runs)
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
