"""Tables, noise statements, the comparison with the reported ranking, plots and report.md.

Noise: with n seeds a configuration's final validation loss is reported as mean +- half-range
(half of max - min over seeds). Two optimizers differ *beyond noise* when their [min, max]
intervals over seeds do not overlap. With 2 seeds this is a coarse test (it can neither prove
a difference nor its absence), but it needs no distributional assumption that 2 samples could
not check; report.md spells the criterion out where it lists the verdicts, so a "beyond noise"
is read as "intervals apart", not as statistical significance.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from itertools import combinations
from pathlib import Path

from .catalog import CATALOG, PAPER_LOSS, PAPER_SOURCE

MB = 2 ** 20


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def summarize_task(task_out: dict) -> dict:
    """Per optimizer: the sweep, the best lr (and whether it sits at the edge of the grid), and
    the final runs' statistics over seeds."""
    keys = list(dict.fromkeys(r["key"] for r in task_out["sweep"]))
    rows = {}
    for key in keys:
        sweep = sorted((r for r in task_out["sweep"] if r["key"] == key), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in sweep]
        best = task_out["best_lr"].get(key)
        finals = [r for r in task_out["final"] if r["key"] == key]
        vals = [r["final_val_loss"] for r in finals if _finite(r.get("final_val_loss"))]
        row = dict(key=key, label=sweep[0]["label"], lrs=lrs, best_lr=best,
                   sweep=[(r["lr"], r.get("final_val_loss"), bool(r.get("failed"))) for r in sweep],
                   best_at_edge=best is not None and len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                   seeds=[r["seed"] for r in finals], val_losses=vals, n_failed=len(finals) - len(vals))
        if vals:
            lo, hi = min(vals), max(vals)
            row.update(mean=statistics.fmean(vals), half_range=(hi - lo) / 2, lo=lo, hi=hi)

        def med(field, rs=finals):
            xs = [r[field] for r in rs if _finite(r.get(field))]
            return statistics.fmean(xs) if xs else None

        row.update(train_loss=med("final_train_loss"), tokens_per_s=med("tokens_per_s"),
                   peak_memory_bytes=med("peak_memory_bytes"), optimizer_state_bytes=med("optimizer_state_bytes"),
                   param_bytes=med("param_bytes"), adapprox_rank=med("adapprox_mean_rank"),
                   train_wall_s=med("train_wall_s"))
        zs = [r["zeroshot"] for r in finals if r.get("zeroshot")]
        if zs:
            row["zeroshot"] = {t: {m: statistics.fmean(z[t][m] for z in zs if t in z and m in z[t])
                                   for m in zs[0][t]} for t in zs[0]}
            row["zeroshot_seeds"] = len(zs)
        rows[key] = row
    ranked = sorted((r for r in rows.values() if "mean" in r), key=lambda r: r["mean"])
    by_seed = {key: {r["seed"]: r["final_val_loss"] for r in task_out["final"]
                     if r["key"] == key and _finite(r.get("final_val_loss"))} for key in rows}
    pairs = []
    for a, b in combinations(ranked, 2):
        if len(a["val_losses"]) < 2 or len(b["val_losses"]) < 2:
            verdict = None  # one seed: no noise estimate
        else:
            verdict = a["hi"] < b["lo"]
        # Paired by seed: a seed fixes the initialization and the data order for every optimizer,
        # so a seed that is hard for one is hard for all; the per-seed differences remove that.
        seeds = sorted(set(by_seed[a["key"]]) & set(by_seed[b["key"]]))
        diffs = [by_seed[b["key"]][sd] - by_seed[a["key"]][sd] for sd in seeds]
        pairs.append(dict(better=a["key"], worse=b["key"], gap=b["mean"] - a["mean"], beyond_noise=verdict,
                          paired_diffs=diffs, paired_consistent=(all(d > 0 for d in diffs) if len(diffs) >= 2 else None)))
    return dict(rows=rows, ranking=[r["key"] for r in ranked], pairs=pairs,
                failed_sweep=task_out.get("failed_sweep", []), incomplete=task_out.get("incomplete", []))


def compare_with_paper(summary: dict) -> dict:
    """Pairwise order of every two optimizers that the reported table ranks differently, ours vs
    theirs: 'agrees' / 'disagrees', and whether our difference exceeds the seed noise."""
    rows = summary["rows"]
    ours = [k for k in summary["ranking"] if CATALOG[k].paper_key in PAPER_LOSS]
    out = []
    for a, b in combinations(ours, 2):  # a ranks above b here
        pa, pb = PAPER_LOSS[CATALOG[a].paper_key], PAPER_LOSS[CATALOG[b].paper_key]
        if CATALOG[a].paper_key == CATALOG[b].paper_key or pa == pb:
            continue
        pair = next(p for p in summary["pairs"] if p["better"] == a and p["worse"] == b)
        out.append(dict(ours_better=a, ours_worse=b, paper_agrees=pa < pb, beyond_noise=pair["beyond_noise"],
                        our_gap=rows[b]["mean"] - rows[a]["mean"], paper_gap=pb - pa))
    paper_rank = sorted({CATALOG[k].paper_key for k in ours}, key=lambda p: PAPER_LOSS[p])
    n = len(out)
    agree = sum(p["paper_agrees"] for p in out)
    return dict(pairs=out, n_pairs=n, n_agree=agree, our_order=ours, paper_order=paper_rank)


# -- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # up to 13 optimizers in one plot: 10 colours x distinct markers/line styles stay apart
    plt.rcParams["axes.prop_cycle"] = (cycler(color=plt.cm.tab10.colors[:7] * 2)
                                       + cycler(linestyle=["-"] * 7 + ["--"] * 7)
                                       + cycler(marker=list("osD^v<>") * 2))
    return plt


def plot_loss_vs_tokens(task: str, task_out: dict, summary: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key in summary["ranking"] + [k for k in summary["rows"] if k not in summary["ranking"]]:
        finals = [r for r in task_out["final"] if r["key"] == key and r.get("val_curve")]
        if not finals:
            continue
        by_tok: dict = {}
        for r in finals:
            for tok, v in r["val_curve"]:
                if _finite(v):
                    by_tok.setdefault(tok, []).append(v)
        toks = sorted(t for t, vs in by_tok.items() if len(vs) == len(finals))
        if not toks:
            continue
        mean = [statistics.fmean(by_tok[t]) for t in toks]
        line, = ax.plot(toks, mean, ms=3, label=f"{summary['rows'][key]['label']} (lr {summary['rows'][key]['best_lr']:.3g})")
        if len(finals) > 1:
            ax.fill_between(toks, [min(by_tok[t]) for t in toks], [max(by_tok[t]) for t in toks],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{task.upper()}: validation loss at the tuned lr (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_vs_loss(task: str, summary: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for key in summary["ranking"]:
        r = summary["rows"][key]
        for ax, field in zip(axes, ("optimizer_state_bytes", "peak_memory_bytes")):
            x = (r.get(field) or 0) / MB
            ax.errorbar([x], [r["mean"]], yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], capsize=3, ls="none")
            ax.annotate(r["label"], (x, r["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("optimizer state (MiB, end of training)")
    axes[1].set_xlabel("peak RSS of the training process (MiB)")
    for ax in axes:
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task.upper()}: memory vs final validation loss (bars: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(task: str, summary: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, r in summary["rows"].items():
        pts = [(lr, v) for lr, v, failed in r["sweep"] if _finite(v) and not failed]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=4, label=r["label"])
    _finish_log_x(plt, fig, ax, path, "peak learning rate", "final validation loss (sweep seed)",
                  f"{task.upper()}: learning-rate sweep (diverged runs omitted)")


def _finish_log_x(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(kind: str, names: list[str], params: dict, summaries: dict, path: Path) -> None:
    """Final validation loss (mean, min-max bars over seeds) against model parameters, per optimizer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    keys = list(dict.fromkeys(k for n in names for k in summaries[n]["ranking"]))
    for key in keys:
        pts = [(params[n], summaries[n]["rows"][key]) for n in names if "mean" in summaries[n]["rows"].get(key, {})]
        if pts:
            ax.errorbar([p for p, _ in pts], [r["mean"] for _, r in pts],
                        yerr=[[r["mean"] - r["lo"] for _, r in pts], [r["hi"] - r["mean"] for _, r in pts]],
                        capsize=3, ms=4, label=pts[0][1]["label"])
    _finish_log_x(plt, fig, ax, path, "model parameters", "final validation loss (tuned lr, mean over seeds)",
                  f"{kind.upper()}: final loss vs model size")


def scale_section(kind: str, names: list[str], meta: dict, summaries: dict, plot: str) -> list[str]:
    """The scale axis: each optimizer's final loss and rank at every size, and where the ranking flips."""
    params = {n: meta["tasks"][n]["parameters"] for n in names}
    keys = list(dict.fromkeys(k for n in names for k in summaries[n]["rows"]))
    L = [f"## {kind.upper()} across model sizes", "",
         "Final validation loss at each optimizer's own tuned lr per size (mean +- half-range over seeds; rank in "
         "brackets; '-' = not finished yet).", "",
         "| optimizer | " + " | ".join(f"{n} ({params[n] / 1e6:.2f}M)" for n in names) + " |",
         "|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for n in names:
            r = summaries[n]["rows"].get(key, {})
            rank = summaries[n]["ranking"].index(key) + 1 if key in summaries[n]["ranking"] else None
            cells.append(f"{r['mean']:.3f} +- {r['half_range']:.3f} ({rank})" if "mean" in r else "-")
        label = next(summaries[n]["rows"][key]["label"] for n in names if key in summaries[n]["rows"])
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    flips = []
    for a, b in zip(names, names[1:]):
        common = [k for k in summaries[a]["ranking"] if k in summaries[b]["ranking"]]
        order_b = [k for k in summaries[b]["ranking"] if k in common]
        for x, y in combinations(common, 2):  # x ranks above y at size a
            if order_b.index(x) > order_b.index(y):
                flips.append(f"{summaries[a]['rows'][x]['label']} / {summaries[a]['rows'][y]['label']} ({a} -> {b})")
    L += ["", "Pairs whose order flips between adjacent sizes: " + ("; ".join(flips) if flips else "none")
          + (" (among optimizers finished at both sizes)." if len(names) > 1 else "."), "", f"![final loss vs size]({plot})", ""]
    return L


# -- the report ----------------------------------------------------------------------------------
def _f(x, fmt="{:.3f}", none="-"):
    return fmt.format(x) if _finite(x) else none


def _mb(x):
    return _f(x / MB if _finite(x) else None, "{:.2f}")


def _zs_columns(rows: dict) -> list[tuple[str, str]]:
    for r in rows.values():
        if r.get("zeroshot"):
            cols = []
            for t, ms in r["zeroshot"].items():
                cols += [(t, m) for m in ms if m in ("acc", "acc_norm", "word_perplexity", "perplexity")]
            return cols
    return []


def task_section(task: str, meta: dict, task_out: dict, summary: dict, plots: dict) -> list[str]:
    rows = summary["rows"]
    L = [f"## {task.upper()}: {meta['model']}", ""]
    per_param = (f" = {meta['tokens_per_param']:.1f} tokens per parameter" if meta.get("tokens_per_param") else "")
    L += [f"Budget: {meta['budget_tokens']:,} tokens per final run ({meta['budget_steps']} steps of "
          f"{meta['tokens_per_step']} tokens{per_param}), {meta['sweep_tokens']:,} per sweep run; seeds {meta['seeds']}. "
          + ("The sweep budget equals the final budget, so the best sweep run is the first seed's final run."
             if meta['sweep_tokens'] == meta['budget_tokens'] else ""), ""]
    if not rows:
        return L + ["No run of this task has finished yet.", ""]
    L += ["### Learning-rate sweep (final validation loss, sweep seed)", "",
          "| optimizer | " + " | ".join(f"lr #{i + 1}" for i in range(max(len(r['lrs']) for r in rows.values()))) + " | best lr |",
          "|---|" + "---|" * (max(len(r['lrs']) for r in rows.values()) + 1)]
    for r in rows.values():
        cells = []
        for lr, v, failed in r["sweep"]:
            txt = f"{lr:.3g}: " + ("diverged" if failed else _f(v))
            cells.append(f"**{txt}**" if lr == r["best_lr"] else txt)
        edge = " (edge of grid)" if r["best_at_edge"] else ""
        L.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_f(r['best_lr'], '{:.3g}')}{edge} |")
    if any(r["best_at_edge"] for r in rows.values()):
        L += ["", "*(edge of grid)*: the best lr is the smallest or largest tried; the optimum may lie outside the grid."]
    if summary["failed_sweep"]:
        L += ["", f"Every sweep run failed for: {', '.join(summary['failed_sweep'])} (no final runs)."]
    if summary["incomplete"]:
        L += ["", f"Not finished yet (the study's deadline came first): {', '.join(summary['incomplete'])}; "
              "their rows are missing or partial."]
    zcols = _zs_columns(rows)
    L += ["", "### Final runs at the tuned lr", "",
          "Ranked by mean final validation loss; +- is the half-range over seeds. Memory: the optimizer state "
          "held at the end of training (tensor storages in the optimizer state) and the peak resident set size "
          "of the whole training process (model, gradients, activations, Python and torch included).", "",
          "| rank | optimizer | lr | val loss (mean +- half-range) | per seed | train loss | tokens/s | "
          "opt. state MiB | peak RSS MiB |" + "".join(f" {t} {m} |" for t, m in zcols),
          "|---|---|---|---|---|---|---|---|---|" + "---|" * len(zcols)]
    for i, key in enumerate(summary["ranking"], 1):
        r = rows[key]
        rank_note = f" (mean rank {r['adapprox_rank']:.1f})" if _finite(r.get("adapprox_rank")) else ""
        zs = "".join(f" {_f(r.get('zeroshot', {}).get(t, {}).get(m), '{:.3f}' if 'acc' in m else '{:.1f}')} |"
                     for t, m in zcols)
        L.append(f"| {i} | {r['label']}{rank_note} | {r['best_lr']:.3g} | {r['mean']:.3f} +- {r['half_range']:.3f} | "
                 f"{', '.join(f'{v:.3f}' for v in r['val_losses'])} | {_f(r['train_loss'])} | {_f(r['tokens_per_s'], '{:.0f}')} | "
                 f"{_mb(r['optimizer_state_bytes'])} | {_mb(r['peak_memory_bytes'])} |" + zs)
    missing = [r["label"] for r in rows.values() if "mean" not in r and r["best_lr"] is not None]
    if missing:
        L += ["", f"No finished final run for: {', '.join(missing)}."]
    if zcols:
        L += ["", "Zero-shot columns: the local held-out tasks (pretrain/eval/tasks) on each final model, mean over seeds"
              + (f", at most {meta['zeroshot_limit']} documents per task" if meta.get("zeroshot_limit") else "") + "."]
    L += ["", "### Which differences exceed the noise", ""]
    pairs = summary["pairs"]
    if not pairs:
        L.append("Fewer than two optimizers finished.")
    elif all(p["beyond_noise"] is None for p in pairs):
        L.append("One seed only: no noise estimate, so no difference can be called significant.")
    else:
        beyond = [p for p in pairs if p["beyond_noise"]]
        within = [p for p in pairs if p["beyond_noise"] is False]
        L.append(f"{len(beyond)} of {len(pairs)} pairs differ beyond noise (their min-max intervals over seeds do not overlap); "
                 f"{len(within)} pairs overlap. Adjacent pairs in the ranking:")
        L.append("")
        rk = summary["ranking"]
        for a, b in zip(rk, rk[1:]):
            p = next(x for x in pairs if x["better"] == a and x["worse"] == b)
            word = "beyond noise" if p["beyond_noise"] else ("within noise" if p["beyond_noise"] is False else "no noise estimate")
            paired = ""
            if p.get("paired_diffs"):
                paired = ("; per seed " + ", ".join(f"{d:+.3f}" for d in p["paired_diffs"])
                          + (" (the same order on every seed)" if p["paired_consistent"] else ""))
            L.append(f"- {rows[a]['label']} < {rows[b]['label']}: gap {p['gap']:.3f}, {word}{paired}")
        consistent = [p for p in pairs if p.get("paired_consistent")]
        L += ["", f"Paired by seed (every optimizer shares a seed's initialization and data order, so the seed-to-seed "
              f"spread is partly common to all): {len(consistent)} of {len(pairs)} pairs keep their order on every seed."]
    L += ["", f"![validation loss vs tokens]({plots['loss']})", "", f"![memory vs final loss]({plots['memory']})",
          "", f"![lr sweep]({plots['sweep']})", ""]
    return L


def paper_section(cmp: dict, summary: dict, task: str = "gpt") -> list[str]:
    rows = summary["rows"]
    L = ["## Ranking compared with the reported results" + ("" if task == "gpt" else f" ({task})"), "", f"Reference: {PAPER_SOURCE}.", "",
         "Paper order (best first): " + " < ".join(f"{p} ({PAPER_LOSS[p]:.2f})" for p in cmp["paper_order"]) + ".  ",
         "Our order (GPT, mean final validation loss, those with a paper row): "
         + " < ".join(rows[k]["label"] for k in cmp["our_order"]) + ".", ""]
    if not cmp["pairs"]:
        return L + ["No pair of optimizers here has two different rows in the paper table.", ""]
    L += [f"Of {cmp['n_pairs']} pairs, {cmp['n_agree']} are ordered as in the paper.", "",
          "| our better | our worse | our gap | paper gap | agrees with paper | beyond our noise |", "|---|---|---|---|---|---|"]
    for p in cmp["pairs"]:
        bn = {True: "yes", False: "no", None: "n/a (1 seed)"}[p["beyond_noise"]]
        L.append(f"| {rows[p['ours_better']]['label']} | {rows[p['ours_worse']]['label']} | {p['our_gap']:.3f} | "
                 f"{p['paper_gap']:+.2f} | {'yes' if p['paper_agrees'] else '**no**'} | {bn} |")
    firm_agree = [p for p in cmp["pairs"] if p["paper_agrees"] and p["beyond_noise"]]
    firm_disagree = [p for p in cmp["pairs"] if not p["paper_agrees"] and p["beyond_noise"]]
    L += ["", "Plainly:", ""]
    L.append("- Agrees, beyond noise: " + (", ".join(f"{rows[p['ours_better']]['label']} better than {rows[p['ours_worse']]['label']}"
                                                     for p in firm_agree) or "none") + ".")
    L.append("- Disagrees, beyond noise: " + (", ".join(f"{rows[p['ours_better']]['label']} better than {rows[p['ours_worse']]['label']} (the paper has the opposite)"
                                                        for p in firm_disagree) or "none") + ".")
    L.append("- Every other pair is within our seed noise (or has one seed), so it neither confirms nor contradicts the paper.")
    L += ["", "Caveats: the paper's numbers are training losses of a 125M model after 10K steps of 8x1024 tokens "
          "(82M tokens) on OpenWebText, with one shared lr for AdamW/Adafactor/CAME/SGD; ours are validation losses of "
          "a far smaller model after a far smaller budget, every optimizer at its own tuned lr. Early-training rankings "
          "favour fast starters and can invert later.", ""]
    return L


def write_report(study: dict, meta: dict, out_dir: Path, label: str | None = None) -> dict:
    """Write report.md, the plots, results.json and raw/ (metrics.jsonl of every run) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, L = {}, []
    title = "Optimizer study" + (f" ({label})" if label else "")
    L += [f"# {title}", ""]
    if label:
        L += [f"**{label}.**", ""]
        if label.upper().startswith("SMOKE"):
            L += ["Budgets far below the study's; the numbers below show that the pipeline works, they are not results.", ""]
    runs = [r for t in study["tasks"].values() for r in t["sweep"] + t["final"] if not r.get("reused_from_sweep")]
    reused = sum(1 for r in runs if r.get("reused"))
    wall = f"Wall time: {study['wall_s'] / 60:.1f} min on {meta['machine']} ({meta['date']})"
    if reused:
        wall += (f"; {reused} of {len(runs)} training runs were finished by an earlier invocation with the same"
                 " specification and reused, so their time is not in it")
    L += ["Regenerate with:", "", "```", meta["command"], "```", "", wall + ".", ""]
    L += ["### Setup", "", "| optimizer | implementation, fixed hyperparameters | lr grid |", "|---|---|---|"]
    for key in meta["optimizers"]:
        e = CATALOG[key]
        hp = ", ".join(f"{k}={v}" for k, v in e.hparams.items()) or "defaults"
        L.append(f"| {e.label} | `{e.optimizer}` ({hp}){'; ' + e.note if e.note else ''} | "
                 f"{', '.join(f'{x:.3g}' for x in meta['lr_grids'][key])} |")
    per_task = [f"{name}: " + "; ".join(f"{CATALOG[k].label} {', '.join(f'{h}={v}' for h, v in hp.items())}"
                                         for k, hp in t["hparams"].items() if k in meta["optimizers"])
                for name, t in meta["tasks"].items() if t.get("hparams")]
    if any(": " in x and not x.endswith(": ") for x in per_task):
        L += ["", "Set per task (they follow the model's width): " + " | ".join(per_task) + "."]
    fractions = {t.get("warmup_fraction") for t in meta["tasks"].values()}
    warmup = (f"{fractions.pop():.0%} of the steps" if len(fractions) == 1 and None not in fractions
              else "min(20, steps/10) steps")
    L += ["", "Every optimizer sees the same initialization and the same data order for a given seed (the "
          f"trainer's `train.seed` fixes both); schedule: linear warm-up ({warmup}) then cosine "
          "to 0.1 x lr; the engine clips the global gradient norm at 1.0 for the non-fused optimizers. The lr "
          "of each optimizer is chosen by the lowest final validation loss of its sweep run"
          + (f"; while it sits at an edge of the grid, the grid is extended outward (up to {meta['max_extensions']} points)"
             if meta.get("max_extensions") else "") + ".", ""]
    if meta.get("timing"):
        L += timing_section(meta["timing"])
    for task, task_out in study["tasks"].items():
        s = summaries[task] = summarize_task(task_out)
        plots = {"loss": f"loss_vs_tokens_{task}.png", "memory": f"memory_vs_loss_{task}.png", "sweep": f"lr_sweep_{task}.png"}
        if s["rows"]:
            plot_loss_vs_tokens(task, task_out, s, out_dir / plots["loss"])
            plot_memory_vs_loss(task, s, out_dir / plots["memory"])
            plot_sweep(task, s, out_dir / plots["sweep"])
        L += task_section(task, meta["tasks"][task], task_out, s, plots)
        if task_out.get("task", task) == "gpt" and s["ranking"]:
            cmp = s["paper"] = compare_with_paper(s)
            L += paper_section(cmp, s, task)
    for kind in ("gpt", "bert"):
        names = [n for n, m in meta["tasks"].items()
                 if m.get("kind") == kind and m.get("parameters") and summaries.get(n, {}).get("ranking")]
        if len(names) > 1:
            plot = f"loss_vs_size_{kind}.png"
            plot_scale(kind, names, {n: meta["tasks"][n]["parameters"] for n in names}, summaries, out_dir / plot)
            L += scale_section(kind, names, meta, summaries, plot)
    L += ["## Raw data", "", "`results.json`: every run (spec, curves, summary, memory, zero-shot) and the summaries; "
          "`raw/<task>/<run>/metrics.jsonl`: the trainer's log of every run.", ""]
    (out_dir / "report.md").write_text("\n".join(L))
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "study": study, "summaries": summaries},
                                                     indent=1, default=str))
    raw = out_dir / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    for task, task_out in study["tasks"].items():
        for r in task_out["sweep"] + task_out["final"]:
            src = Path(r["output_dir"]) / "metrics.jsonl"
            if src.is_file():
                dst = raw / task / r["name"] / "metrics.jsonl"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    return summaries


def timing_section(timing: dict) -> list[str]:
    L = ["### Budget arithmetic", "",
         "Predicted training time = tokens to train / tokens/s, per optimizer. *wall tokens/s*: measured "
         "(median over logged steps; on a shared machine this mostly measures the other jobs' load); "
         "*idle tokens/s*: tokens per CPU-second of the run x torch threads, what an otherwise idle machine "
         "gives at perfect thread scaling (optimistic). Actual: wall time of the runs incl. process start-up, "
         "validation and zero-shot evaluation. Remaining: the runs not finished yet (grid extensions not "
         "counted) at the wall speed; * marks a speed extrapolated from another size of the same model "
         "by the parameter ratio.", "",
         "| task | optimizer | runs (done) | tokens | wall tokens/s | predicted min | idle tokens/s | predicted idle min "
         "| actual min | remaining min |",
         "|---|---|---|---|---|---|---|---|---|---|"]

    def m(x):
        return _f(x / 60 if _finite(x) else None, "{:.1f}")

    for row in timing["rows"]:
        star = "*" if row.get("extrapolated") else ""
        L.append(f"| {row['task']} | {row['label']} | {row['runs']} ({row.get('done_runs', 0)}) | {row['tokens']:,} | "
                 f"{_f(row['tokens_per_s'], '{:.0f}')}{star} | {m(row['predicted_s'])} | "
                 f"{_f(row.get('idle_tokens_per_s'), '{:.0f}')}{star} | {m(row.get('predicted_idle_s'))} | "
                 f"{m(row.get('actual_s'))} | {m(row.get('remaining_s'))} |")
    L += ["", f"Total: predicted {timing['predicted_total_s'] / 60:.1f} min of training at the measured wall speed "
          f"({timing.get('predicted_idle_total_s', 0) / 60:.1f} min idle); actual {timing['actual_total_s'] / 60:.1f} min "
          "wall for this invocation."]
    if timing.get("remaining_runs"):
        jobs = timing.get("jobs") or 1
        L += [f"Remaining: {timing['remaining_runs']} runs, {timing['remaining_total_s'] / 3600:.1f} h of run time at the "
              f"wall speeds above, about {timing['remaining_total_s'] / 3600 / jobs:.1f} h with {jobs} side by side"
              + (f"; no speed known yet for {', '.join(timing['unknown_speed'])}" if timing.get("unknown_speed") else "")
              + "."]
    return L + [""]
