#!/usr/bin/env python
"""Summarize a training run from its metrics.jsonl: loss drop, tokens/s, peak memory, and a
loss-curve PNG.

    python tools/summarize_run.py runs/quickstart            # writes runs/quickstart/loss_curve.png

A directory without logged training loss is one line `error: ...` (exit status 1); --debug shows
the traceback.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.cli_errors import ArgumentParser, CommandError, add_debug_flag, run_cli  # noqa: E402


def load_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CommandError(f"no metrics.jsonl in {run_dir} (is it a training output_dir?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CommandError(f"{path}:{i} is not valid JSON") from None
    if not any("loss" in r for r in rows):
        raise CommandError(f"{path} holds no logged training loss yet")
    return rows


def summarize(rows: list[dict]) -> dict:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r] or [train[0].get("tokens_per_s", 0.0)]
    return dict(
        steps=train[-1]["step"], first_loss=train[0]["loss"], last_loss=train[-1]["loss"],
        loss_drop=train[0]["loss"] - train[-1]["loss"],
        last_val_loss=val[-1]["val_loss"] if val else None,
        median_tokens_per_s=statistics.median(speeds),
        peak_memory_mb=max(r.get("peak_memory_bytes", 0) for r in train) / 2**20,
        tokens=train[-1].get("tokens"),
    )


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.get("tokens", r["step"]) for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r.get("tokens", r["step"]) for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("tokens" if "tokens" in train[0] else "step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="summarize_run.py", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--png", type=Path, help="where to write the loss curve (default: RUN_DIR/loss_curve.png)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
    rows = load_metrics(args.run_dir)
    s = summarize(rows)
    png = args.png or args.run_dir / "loss_curve.png"
    try:
        plot(rows, png, f"{args.run_dir.name}: loss")
    except OSError as e:
        raise CommandError(f"cannot write {png}: {e.strerror or e}") from None
    print(f"steps           {s['steps']}")
    print(f"loss            {s['first_loss']:.3f} -> {s['last_loss']:.3f} (drop {s['loss_drop']:.3f})")
    if s["last_val_loss"] is not None:
        print(f"validation loss {s['last_val_loss']:.3f}")
    print(f"tokens/s        {s['median_tokens_per_s']:.0f} (median over logged steps, all ranks)")
    print(f"peak memory     {s['peak_memory_mb']:.0f} MiB (rank 0 process)")
    print(f"loss curve      {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
