#!/usr/bin/env python
"""Fine-tuning study: continue a pretrained demo GPT on the bundled corpus's held-out part with
AdaLomo (fused backward), AdamW, LoRA (peft) and LOMO (fused); validation loss and peak memory.
Writes docs/results/finetune/{runs.jsonl,report.md,finetune.png}.

    python tools/study_finetune.py            # resumes; the base model is prepared once (below)

Base model: the quickstart's checkpoint (``bash launch/quickstart.sh``: demo GPT, 13.8M
parameters, 120 AdaLomo steps on the training part) or, when there is none, the same config
trained here on one process; exported once to Hugging Face (tools/convert_to_hf.py, logits
checked) so that peft's LoRA applies to a plain GPT2LMHeadModel.

Data: the held-out works (Persuasion, The Tempest, Paradise Regained; never trained on) cut into
pieces of <= 4,000 characters, shuffled (seed 0); 85% of the pieces are fine-tuning text, 15%
validation; tokenized with the base's tokenizer into 128-token blocks.

Per method: a 3-point lr grid half a decade apart around its centre, extended once when the
best is at an edge (tools/study_seq_models.py's sweep), one seed. Memory per run as in
tools/study_seq_models.py (peak RSS of the training steps above the RSS before the first step;
optimizer state bytes).
"""
from __future__ import annotations

import argparse
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

import study_seq_models as seq  # noqa: E402

METHODS = {  # key: (label, lr centre, note)
    "adamw": ("AdamW (full)", 3e-4, "torch.optim.AdamW, weight decay 0; global grad-norm clip 1.0"),
    "adalomo": ("AdaLomo (fused)", 1e-2, "memopt.AdaLomo, fused backward, no global clip"),
    "lora": ("LoRA r=8 + AdamW", 3e-3, "peft LoRA r=8, alpha 16, on c_attn/c_proj/c_fc; AdamW on the adapters; clip 1.0"),
    "lomo": ("LOMO (fused)", 3e-1, "memopt.Lomo, fused backward, global grad-norm clip 1.0 (two backward passes)"),
}
KEY_FIELDS = ("optimizer", "lr", "seed", "steps", "batch", "base")
MIB = 2**20


# -- data and model (in the worker) ---------------------------------------------------------------
def heldout_pieces(piece_chars: int = 4000, val_share: float = 0.15) -> tuple[list[dict], list[dict]]:
    """(fine-tuning pieces, validation pieces) of the held-out works: shuffled pieces, split."""
    from pretrain.data import bundled

    docs = [p for d in bundled.corpus_documents("heldout") for p in bundled.pieces(d, piece_chars)]
    random.Random(0).shuffle(docs)
    n_val = max(1, round(len(docs) * val_share))
    return docs[n_val:], docs[:n_val]


def heldout_blocks(tokenizer, seq_len: int):
    """(train blocks, validation blocks) of ``heldout_pieces``, ``seq_len`` tokens each."""
    import torch

    train, val = heldout_pieces()

    def blocks(part):
        ids = []
        for d in part:
            ids += tokenizer(d["text"])["input_ids"] + [tokenizer.eos_token_id]
        n = len(ids) // seq_len
        return torch.tensor(ids[: n * seq_len]).view(n, seq_len)

    return blocks(train), blocks(val)


def build(method: str, hf_dir: str, lr: float):
    """(model, optimizer, fused, trainable parameters)."""
    import torch
    import transformers

    import memopt

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)  # fp32, as exported
    if method == "lora":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                              fan_in_fan_out=True)
        model = peft.get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if method in ("adamw", "lora"):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif method == "adalomo":
        opt = memopt.create_optimizer("adalomo", params, lr=lr, clip_grad_norm=None)
    elif method == "lomo":
        opt = memopt.create_optimizer("lomo", params, lr=lr, clip_grad_norm=1.0)
    else:
        raise ValueError(f"unknown method {method!r}; choices: {', '.join(METHODS)}")
    return model, opt, hasattr(opt, "fused_backward"), params


def val_loss(model, blocks, batch: int) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=blocks[i:i + batch], labels=blocks[i:i + batch]).loss.item()
                  for i in range(0, len(blocks), batch)]
    model.train()
    return statistics.mean(losses)


def train_run(spec: dict) -> dict:
    import warnings

    import torch
    import transformers

    import bench_memory
    from memopt.base import optimizer_state_bytes

    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(spec["base"])
    train, val = heldout_blocks(tok, spec["seq_len"])
    val = val[: spec["val_blocks"]]
    torch.manual_seed(spec["seed"])
    model, opt, fused, params = build(spec["optimizer"], spec["base"], spec["lr"])
    steps, batch = spec["steps"], spec["batch"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: seq.lr_multiplier(s, steps))
    start_loss = val_loss(model, val, 8)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(spec["seed"]))
    bench_memory.trim()
    bench_memory.reset_hwm()
    baseline = bench_memory.rss()
    wall0, cpu0, losses = time.perf_counter(), time.process_time(), []
    for step in range(steps):
        idx = order[(step * batch + torch.arange(batch)) % len(train)]
        loss = model(input_ids=train[idx], labels=train[idx]).loss
        seq.update(opt, loss, params, fused)
        sched.step()
        losses.append(loss.item())
    peak = bench_memory.hwm() - baseline
    train_wall, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    final = val_loss(model, val, 8)
    ok = math.isfinite(final)
    return dict(spec, failed=not ok, final_val_loss=final if ok else None, start_val_loss=start_loss,
                train_losses=losses, optimizer_state_bytes=optimizer_state_bytes(opt),
                trainable_params=sum(p.numel() for p in params), params=sum(p.numel() for p in model.parameters()),
                peak_train_rss_bytes=peak, baseline_rss_bytes=baseline, train_blocks=len(train), val_blocks_used=len(val),
                train_wall_s=train_wall, train_cpu_s=train_cpu, run_wall_s=time.perf_counter() - t_start)


# -- the base model ------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    return steps[-1] if steps else None


def prepare_base(args) -> Path:
    """The HF export of the base checkpoint (made once), training the base first if there is none."""
    hf = Path(args.work_dir) / "hf_base"
    if (hf / "config.json").is_file():
        return hf
    ckpt = Path(args.base) if args.base else latest_checkpoint(ROOT / "runs/quickstart")
    if ckpt is None or not ckpt.is_dir():
        run = Path(args.work_dir) / "base"
        print(f"no quickstart checkpoint: training the base with configs/quickstart.yaml on one process in {run}")
        subprocess.run([sys.executable, str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/quickstart.yaml"),
                        "engine.kind=single", f"output_dir={run}", "train.progress_bar=false"], check=True, cwd=ROOT)
        ckpt = latest_checkpoint(run)
    subprocess.run([sys.executable, str(TOOLS / "convert_to_hf.py"), str(ckpt), str(hf)], check=True, cwd=ROOT)
    (hf / "base_checkpoint.txt").write_text(f"{ckpt}\n")
    return hf


# -- report ---------------------------------------------------------------------------------------------
def write_report(results: dict, out: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for v in results.values() for r in v["sweep"] + v.get("finals", []) if not r.get("missing")]
    lines = [f"**{meta['label']}**", ""] if meta.get("label") else []
    lines += ["# Fine-tuning the demo GPT on held-out text: AdaLomo vs AdamW vs LoRA vs LOMO", "",
              f"Command: `{meta['command']}`", "", f"Base: {meta['base']}. Runs: {len(runs)}; summed run time "
              f"{sum(r.get('run_wall_s') or 0 for r in runs) / 60:.1f} min; this sitting {meta['sitting_wall_s'] / 60:.1f} min.", "",
              "| method | best lr | lr grid: final val loss | val loss before | val loss after | trainable params | "
              "optimizer state MiB | training peak RSS MiB | train s/run |", "|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, v in results.items():
        best = next(r for r in v["sweep"] if r["lr"] == v["best_lr"])
        grid = ", ".join(f"{r['lr']:.3g}: {'not run yet' if r.get('missing') else seq_fmt(r.get('final_val_loss'))}"
                         for r in v["sweep"])
        if best.get("missing"):
            lines.append(f"| {METHODS[key][0]} | | {grid} | | not run yet | | | | |")
            continue
        seeds = [r["final_val_loss"] for r in [best] + v["finals"] if r.get("final_val_loss") is not None]
        after = (f"{statistics.mean(seeds):.3f} +- {(max(seeds) - min(seeds)) / 2:.3f} ({len(seeds)} seeds)"
                 if len(seeds) > 1 else seq_fmt(best.get("final_val_loss")))
        lines.append(f"| {METHODS[key][0]} | {v['best_lr']:.3g} | {grid} | {best['start_val_loss']:.3f} | "
                     f"{after} | {best.get('trainable_params', 0):,} | "
                     f"{best.get('optimizer_state_bytes', 0) / MIB:.2f} | {best.get('peak_train_rss_bytes', 0) / MIB:.1f} | "
                     f"{best.get('train_wall_s', 0):.0f} |")
        if best.get("final_val_loss") is not None:
            ax.scatter(best["peak_train_rss_bytes"] / MIB, best["final_val_loss"], s=40)
            ax.annotate(METHODS[key][0], (best["peak_train_rss_bytes"] / MIB, best["final_val_loss"]), fontsize=8)
    ax.set(xlabel="training peak RSS above the baseline (MiB)", ylabel="validation loss after fine-tuning",
           title="fine-tuning: quality vs memory (best lr each)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=110)
    plt.close(fig)
    lines += ["", "Methods: " + "; ".join(f"**{v[0]}**: {v[2]}" for v in METHODS.values()), "",
              "![quality vs memory](finetune.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def seq_fmt(v) -> str:
    return "failed" if v is None else f"{v:.3f}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--val-blocks", type=int, default=16, help="validation blocks of --seq-len tokens")
    ap.add_argument("--seed", type=int, default=1, help="the sweep's seed")
    ap.add_argument("--final-seeds", default="", help="more seeds for the best lr, e.g. 2,3 (the seed spread)")
    ap.add_argument("--max-extensions", type=int, default=1)
    ap.add_argument("--base", default=None, help="checkpoint dir (default: the quickstart's latest)")
    ap.add_argument("--hf-base", default=None, help="an HF GPT-2 directory to fine-tune instead (no export)")
    ap.add_argument("--work-dir", default=str(ROOT / "runs/finetune_study"))
    ap.add_argument("--out", default=str(ROOT / "docs/results/finetune"))
    ap.add_argument("--label", default=None)
    ap.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choices: {', '.join(METHODS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        seq.serve(train_run)
        return 0
    t0 = time.perf_counter()
    hf = Path(args.hf_base) if args.hf_base else prepare_base(args)
    worker = seq.Worker(__file__)
    study = seq.Study(Path(args.out), seq.missing_run if args.report_only else worker, key_fields=KEY_FIELDS)
    base = dict(task="finetune", base=str(hf), steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                val_blocks=args.val_blocks, seed=args.seed)
    results = {}
    try:
        for key in args.methods:
            best, runs = seq.sweep(study, base, key, METHODS[key][1], args.max_extensions, points=3)
            finals = [study.get(dict(base, optimizer=key, lr=best, seed=int(x))) for x in args.final_seeds.split(",") if x]
            results[key] = dict(best_lr=best, sweep=runs, finals=[r for r in finals if not r.get("missing")])
    finally:
        worker.close()
    note = (hf / "base_checkpoint.txt").read_text().strip() if (hf / "base_checkpoint.txt").is_file() else str(hf)
    cmd = "python tools/study_finetune.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_report(results, Path(args.out), dict(command=cmd, label=args.label, base=note,
                                               sitting_wall_s=time.perf_counter() - t0))
    print(f"wrote {Path(args.out) / 'report.md'} ({(time.perf_counter() - t0) / 60:.1f} min this sitting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
