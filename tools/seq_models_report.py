"""report.md and plots of tools/study_seq_models.py, from its results (every number here comes
from runs.jsonl; nothing is typed in by hand)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

MIB = 2**20
METRIC = {"lstm_lm": ("val_ppl", "perplexity"), "seq2seq_reverse": ("val_token_acc", "token accuracy")}


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half-range) over seeds."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def fmt(v, digits=3):
    return "failed" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def summarize(task: str, per_opt: dict) -> list[dict]:
    rows = []
    for key, r in per_opt.items():
        ok = [f for f in r["finals"] if f.get("final_val_loss") is not None]
        if not ok:
            rows.append(dict(key=key, best_lr=r["best_lr"], seeds=0))
            continue
        loss, loss_hr = spread([f["final_val_loss"] for f in ok])
        metric, metric_hr = spread([f["final"][METRIC[task][0]] for f in ok])
        rows.append(dict(
            key=key, best_lr=r["best_lr"], seeds=len(ok), loss=loss, loss_hr=loss_hr, metric=metric, metric_hr=metric_hr,
            state_mib=statistics.mean(f["optimizer_state_bytes"] for f in ok) / MIB,
            # median over all of the optimizer's runs (the lr hardly changes it): the first run in a
            # fresh worker process carries ~25 MiB of one-time allocations, a median ignores it
            peak_mib=statistics.median(f["peak_train_rss_bytes"] for f in r["sweep"] + r["finals"]
                                       if f.get("peak_train_rss_bytes")) / MIB,
            param_mib=ok[0]["param_bytes"] / MIB, params=ok[0]["param_count"],
            train_s=statistics.mean(f["train_wall_s"] for f in ok), cpu_s=statistics.mean(f["train_cpu_s"] for f in ok),
            lrs=[s["lr"] for s in r["sweep"]], interior=r["sweep"][0]["lr"] < r["best_lr"] < r["sweep"][-1]["lr"],
        ))
    return rows


def verdict(rows: list[dict], a: str, b: str) -> str:
    """Whether ``a`` and ``b`` differ beyond the seed noise (gap vs the sum of half-ranges)."""
    ra, rb = (next((r for r in rows if r["key"] == k and r.get("seeds")), None) for k in (a, b))
    if ra is None or rb is None:
        return f"{a} vs {b}: not both finished"
    gap, noise = ra["loss"] - rb["loss"], ra["loss_hr"] + rb["loss_hr"]
    where = "within" if abs(gap) <= noise else "beyond"
    return (f"{a} - {b} final val loss: {gap:+.4f} (seed noise {noise:.4f}: {where} noise); optimizer state "
            f"{ra['state_mib']:.3f} vs {rb['state_mib']:.3f} MiB; training peak RSS above the baseline "
            f"{ra['peak_mib']:.1f} vs {rb['peak_mib']:.1f} MiB")


def plot(task: str, per_opt: dict, labels: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in per_opt.items():
        ok = [f for f in r["finals"] if f.get("final_val_loss") is not None]
        if ok:
            steps = [p["step"] for p in ok[0]["val_curve"]]
            curves = [[p["val_loss"] for p in f["val_curve"]] for f in ok]
            mean = [statistics.mean(c) for c in zip(*curves)]
            ax1.plot(steps, mean, marker="o", ms=3, label=f"{labels[key]} (lr {r['best_lr']:.3g})")
            ax1.fill_between(steps, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)], alpha=0.2)
        pts = [(s["lr"], s["final_val_loss"]) for s in r["sweep"] if s.get("final_val_loss") is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=labels[key])
    ax1.set(xlabel="step", ylabel="validation loss", title=f"{task}: best lr, mean and range over seeds")
    ax2.set(xscale="log", xlabel="learning rate", ylabel="final validation loss", title=f"{task}: lr sweep (seed 1)")
    losses = [s["final_val_loss"] for r in per_opt.values() for s in r["sweep"] if s.get("final_val_loss") is not None]
    if losses:  # a diverged edge point would flatten the rest
        ax2.set_ylim(min(losses) - 0.1, min(max(losses), min(losses) + 1.5) + 0.1)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    name = f"{task}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def write_report(results: dict, out: Path, meta: dict) -> None:
    labels = {k: v[0] for k, v in meta["optimizers"].items()}
    all_runs = [f for t in results.values() for r in t.values() for f in r["sweep"] + r["finals"] if not f.get("missing")]
    compute_s = sum({id(f): f.get("run_wall_s") or 0 for f in all_runs}.values())
    lines = []
    if meta.get("label"):
        lines += [f"**{meta['label']}**", ""]
    lines += ["# AdaLomo vs Adam vs SGD (and Adafactor) on an LSTM LM and an LSTM seq2seq model", "",
              f"Command: `{meta['command']}`", "",
              f"Runs: {len({id(f) for f in all_runs})}; summed run time {compute_s / 60:.1f} min; this sitting "
              f"{meta['sitting_wall_s'] / 60:.1f} min (finished runs were reused from runs.jsonl).", "",
              "Optimizers: " + "; ".join(f"**{v[0]}**: {v[2]}" for v in meta["optimizers"].values()), ""]
    for task, per_opt in results.items():
        rows = summarize(task, per_opt)
        name = METRIC[task][1]
        first = next((f for r in per_opt.values() for f in r["finals"] if f.get("param_count")), None)
        lines += [f"## {task}", ""]
        if first:
            lines += [f"{first['param_count']:,} parameters, {first['steps']} steps, size {first['size'] or 'default'}.", ""]
        lines += [f"| optimizer | best lr | lr grid (interior?) | seeds | val loss | {name} | optimizer state MiB | "
                  "training peak RSS MiB | train s/run (CPU s) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not r.get("seeds"):
                lines.append(f"| {labels[r['key']]} | {r['best_lr']:.3g} | | 0 | not finished | | | | |")
                continue
            grid = ", ".join(f"{x:.3g}" for x in r["lrs"]) + (" (yes)" if r["interior"] else " (**edge**)")
            lines.append(f"| {labels[r['key']]} | {r['best_lr']:.3g} | {grid} | {r['seeds']} | {fmt(r['loss'])} +- "
                         f"{fmt(r['loss_hr'])} | {fmt(r['metric'])} +- {fmt(r['metric_hr'])} | {r['state_mib']:.3f} | "
                         f"{r['peak_mib']:.1f} | {r['train_s']:.0f} ({r['cpu_s']:.0f}) |")
        lines += ["", "Sweep (seed 1, final validation loss):", "",
                  "| optimizer | " + " | ".join(["lr: loss"] * 1) + " |", "|---|---|"]
        for key, r in per_opt.items():
            cells = ", ".join(f"{s['lr']:.3g}: {'not run yet' if s.get('missing') else fmt(s.get('final_val_loss'))}"
                              for s in r["sweep"])
            lines.append(f"| {labels[key]} | {cells} |")
        lines += ["", "- " + verdict(rows, "adalomo", "adam"), "- " + verdict(rows, "adalomo", "adafactor"),
                  "- " + verdict(rows, "adam", "sgd"), ""]
        lines += [f"![{task}]({p})" for p in plot(task, per_opt, labels, out)] + [""]
    lines += ["Val loss: mean +- half-range over the seeds at the best lr. Training peak RSS: the highest RSS of the",
              "training steps minus the RSS just before the first step (weights and data are in that baseline),",
              "median over all of the optimizer's runs on the task.", ""]
    (out / "report.md").write_text("\n".join(lines))
