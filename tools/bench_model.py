#!/usr/bin/env python
"""Forward+backward speed of our GPT against transformers' GPT2LMHeadModel of identical shape.

    python tools/bench_model.py --preset demo --batch-size 8 --steps 4 --rounds 5 \
        --markdown docs/benchmarks/model_speed.md --json docs/benchmarks/model_speed.json

Both models run in one process, in training mode (same dropout), in fp32, on the same batches.
The HF model is loaded with our model's weights through pretrain.models.hf_compat, and the script
first checks that both give the same eval-mode loss, so they provably compute the same function.
Timing alternates the two models step by step (A B B A ...) so that drifting machine load hits
both; the reported ratio is the median over step pairs of (ours / HF) tokens per second.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pretrain.models import build_gpt, get_preset, gpt_loss, init_model_parallel  # noqa: E402
from pretrain.models.hf_compat import gpt_to_hf  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=8192, help="the bundled tokenizer's size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=4, help="batches (timed steps per model) per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--markdown", help="write the result table here")
    p.add_argument("--json", help="write the raw numbers here")
    return p.parse_args(argv)


def build_pair(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    init_model_parallel(1)
    overrides = {"vocab_size": args.vocab_size}
    if args.seq_length:
        overrides["seq_length"] = args.seq_length
    cfg = get_preset(args.preset, "gpt", **overrides)
    ours = build_gpt(cfg)
    hf_state, hf_config = gpt_to_hf(ours.state_dict(), cfg)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config))
    hf.load_state_dict(hf_state)
    return cfg, ours, hf


def make_batch(cfg, batch_size, generator):
    data = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_length + 1), generator=generator)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float)}


def step_ours(model, batch):
    loss, _ = gpt_loss(model, batch)
    loss.backward()
    return loss


def step_hf(model, batch):
    # The usual HF call; labels = tokens (HF shifts inside), the same next-token task.
    out = model(input_ids=batch["tokens"], labels=batch["tokens"])
    out.loss.backward()
    return out.loss


def check_same_function(ours, hf, batch):
    """Eval-mode losses on the same next-token targets must agree (identical shapes/weights)."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        a, _ = gpt_loss(ours, batch)
        logits = hf(input_ids=batch["tokens"]).logits
        b = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    ours.train()
    hf.train()
    if abs(a.item() - b.item()) > 1e-4:
        raise SystemExit(f"error: models disagree (loss {a.item():.6f} vs {b.item():.6f})")
    return a.item()


def timed_step(step, model, batch) -> float:
    start = time.perf_counter()
    step(model, batch)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, ours, hf = build_pair(args)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(cfg, args.batch_size, gen) for _ in range(args.steps)]
    eval_loss = check_same_function(ours, hf, batches[0])
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"{args.preset}: {n_params / 1e6:.2f}M parameters, batch {args.batch_size} x "
          f"{cfg.seq_length}, eval loss {eval_loss:.4f} (both), threads {args.threads}", flush=True)

    runners = {"ours": (step_ours, ours), "hf": (step_hf, hf)}
    for _ in range(args.warmup):
        for step, model in runners.values():
            timed_step(step, model, batches[0])

    # The two models alternate step by step (ours, hf, hf, ours, ...): each pair of adjacent
    # steps sees nearly the same machine load, so the per-pair ratio is robust on a shared CPU.
    tokens = args.batch_size * cfg.seq_length
    times = {"ours": [], "hf": []}
    for r in range(args.rounds):
        for i, batch in enumerate(batches):
            order = ["ours", "hf"] if (r * len(batches) + i) % 2 == 0 else ["hf", "ours"]
            for name in order:
                times[name].append(timed_step(*runners[name], batch))
        a = statistics.median(times["ours"][-len(batches):])
        b = statistics.median(times["hf"][-len(batches):])
        print(f"round {r}: ours {tokens / a:8.0f} tok/s   hf {tokens / b:8.0f} tok/s   "
              f"ratio {b / a:.3f}", flush=True)

    ratios = [b / a for a, b in zip(times["ours"], times["hf"])]  # = ours tok/s / hf tok/s
    result = {
        "preset": args.preset,
        "parameters": n_params,
        "batch_size": args.batch_size,
        "seq_length": cfg.seq_length,
        "vocab_size": cfg.vocab_size,
        "threads": args.threads,
        "pairs": len(ratios),
        "attention_backend": "sdpa",
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
        "step_seconds": times,
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
        "cpu": _cpu_name(),
        "load_average": os.getloadavg(),
        "command": "python tools/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"median tokens/s: ours {result['tokens_per_s']['ours']:.0f}, "
          f"hf {result['tokens_per_s']['hf']:.0f}; ratio (median of {len(ratios)} step pairs) "
          f"{result['ratio_median']:.3f}, quartiles {result['ratio_quartiles'][0]:.3f}.."
          f"{result['ratio_quartiles'][2]:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(render_markdown(result))
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render_markdown(r) -> str:
    q1, _, q3 = r["ratio_quartiles"]
    return f"""# Model speed: our GPT vs transformers' GPT2LMHeadModel (CPU)

Forward + backward (+ zeroing gradients), fp32, training mode (dropout 0.1 in both), one process,
{r['threads']} threads. Model: preset `{r['preset']}` ({r['parameters'] / 1e6:.2f}M parameters,
vocabulary {r['vocab_size']}), batch {r['batch_size']} x {r['seq_length']} tokens. The HF model
has identical shape and is loaded with our weights; the script first checks that both give the
same eval loss.

The two models alternate step by step on the same batches, so neighbouring steps see the same
load on this shared machine (load average {r['load_average'][0]:.1f} at the end of the run);
the verdict is the median over {r['pairs']} step pairs of (our tokens/s) / (HF tokens/s).

| | ours (megatron-core, SDPA attention) | GPT2LMHeadModel (sdpa) |
|---|---|---|
| median tokens/s | {r['tokens_per_s']['ours']:.0f} | {r['tokens_per_s']['hf']:.0f} |
| **ratio ours / HF** (median of pairs) | **{r['ratio_median']:.3f}** | quartiles {q1:.3f} .. {q3:.3f} |

Requirement: ratio >= 0.9.

Where the difference comes from (torch profiler, one step each, this machine): the matrix
multiplies cost the same in both; transformers' GPT-2 computes its "gelu_new" activation from
separate element-wise ops (pow, mul, tanh and their backward), where ours calls the single
`F.gelu(approximate="tanh")` kernel, and HF's loss copies/shifts the logits once more. Timings on
this shared 2-core machine are noisy; the ratio of neighbouring steps is what is stable.

Versions: torch {r['torch']}, transformers {r['transformers']}, megatron-core
{r['megatron_core']}; CPU: {r['cpu']}. Raw step times: `model_speed.json`.

Command:

```
{r['command']}
```
"""


if __name__ == "__main__":
    main()
