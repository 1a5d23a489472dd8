"""The optimizers compared, their fixed hyperparameters and the centre of each lr grid.

Every entry trains through the ordinary trainer (``optimizer.name`` = ``optimizer``), with
``hparams`` as ``optimizer.hparams``. Weight decay is 0 everywhere (torch AdamW's default 0.01
is turned off) so that only the update rule differs. The lr grids are log-spaced around
``lr_center`` (see ``lr_grid``); relative-step optimizers (Adafactor, AdaLomo) scale the step
by RMS(W), so their lr is not comparable with Adam's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    key: str  # the study's name (also the run directory prefix)
    label: str  # for tables and plots
    optimizer: str  # memopt.create_optimizer name (or "galore_adamw" / a pretrain.baselines name, registered by the worker)
    lr_center: float
    hparams: dict = field(default_factory=dict)
    paper_key: str | None = None  # the row of the reported table (ALGORITHMS.md, last section)
    note: str = ""


CATALOG: dict[str, Entry] = {e.key: e for e in [
    Entry("sgd", "SGD", "sgd", 1.0, {"momentum": 0.0, "weight_decay": 0.0}, "sgd",
          "torch.optim.SGD, no momentum; engine clips the global grad norm at 1.0"),
    Entry("adamw", "AdamW", "adamw", 1e-3, {"weight_decay": 0.0}, "adamw", "torch.optim.AdamW"),
    Entry("adafactor", "Adafactor", "adafactor", 1e-2, {}, "adafactor",
          "beta1=None, scale_parameter=True, relative_step=False (the run's schedule drives lr)"),
    Entry("came", "CAME", "came", 1e-3, {"weight_decay": 0.0}, "came"),
    Entry("lomo", "LOMO", "lomo", 1.0, {}, None,
          "fused backward; global-norm clip 1.0 in two backward passes (the trainer's default)"),
    Entry("adalomo", "AdaLomo (fused)", "adalomo", 1e-2, {"clip_grad_norm": None}, None,
          "fused backward, no global-norm clip (grouped update normalization instead): one backward pass"),
    Entry("adapprox_k8", "Adapprox k_max=8", "adapprox", 1e-3, {"k_max": 8, "weight_decay": 0.0}, "adapprox",
          "adaptive rank (AS-RSI, xi=1e-3, k_min=1), beta1=0.9"),
    Entry("adapprox_k16", "Adapprox k_max=16", "adapprox", 1e-3, {"k_max": 16, "weight_decay": 0.0}, "adapprox",
          "adaptive rank (AS-RSI, xi=1e-3, k_min=1), beta1=0.9"),
    Entry("galore", "GaLore-AdamW r=hidden/4", "galore_adamw", 3e-3,
          {"rank": 96, "update_proj_gap": 200, "scale": 0.25}, "galore",
          "galore-torch 1.0 GaLoreAdamW on the transformer-layer matrices (rank = hidden/4: 96 for the demo GPT; "
          "the long study sets it per size), AdamW elsewhere"),
    # Baselines (pretrain/baselines, registered by the worker): not in the default study.
    Entry("sgdm", "SGD momentum 0.9", "sgd", 0.3, {"momentum": 0.9, "weight_decay": 0.0}, "sgd",
          "torch.optim.SGD, momentum 0.9; engine clips the global grad norm at 1.0"),
    Entry("adam_mini", "Adam-mini", "adam_mini", 1e-3, {"weight_decay": 0.0}, None,
          "pretrain/baselines/adam_mini.py (ours, from the paper): one v per Q/K head, per output neuron elsewhere"),
    Entry("apollo_mini", "APOLLO-Mini", "apollo_mini", 1e-2, {"weight_decay": 0.0}, None,
          "pretrain/baselines/apollo_mini.py (ours, from the paper): rank-1 projection, tensor-wise scale, "
          "transformer-layer matrices; AdamW elsewhere"),
    Entry("adamw8bit", "AdamW 8-bit", "adamw8bit", 1e-3, {"weight_decay": 0.0}, None,
          "bitsandbytes AdamW8bit (its CPU path), block-wise 8-bit moments"),
]}

BASELINE_KEYS = ("sgdm", "adam_mini", "apollo_mini", "adamw8bit")
DEFAULT_OPTIMIZERS = tuple(k for k in CATALOG if k not in BASELINE_KEYS)

# Adapprox rebuttal, GPT-2 125M on OpenWebText, training loss at 10K steps (ALGORITHMS.md). Where
# a tuned-lr number is reported it is used (GaLore 3.80 at lr 1e-3, Adapprox 3.76), otherwise the
# shared-lr (1e-4) number. LOMO and AdaLomo are not in that table.
PAPER_LOSS = {"sgd": 7.12, "adamw": 3.99, "adafactor": 4.00, "came": 3.86, "galore": 3.80, "adapprox": 3.76}
PAPER_SOURCE = ("Adapprox rebuttal (ALGORITHMS.md, last section): GPT-2 125M, OpenWebText, batch 8x1024, "
                "10K steps, training loss; SGD 7.12, AdamW 3.99, Adafactor 4.00, CAME 3.86 at the shared lr "
                "1e-4; GaLore 3.80 and Adapprox (k=1) 3.76 at their tuned lr")


# The long study's model sizes (GPT and BERT alike; seq_length 128, the 1k tokenizer
# data/tokenizer/spm_bpe_1k.model, whose small embedding leaves most parameters and compute in the
# transformer layers). micro_batch is chosen so that 2,000 steps give >= 20 tokens per parameter.
@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    micro_batch: int

    def overrides(self) -> list[str]:
        # Validation: the same ~320 samples (~41k tokens, about the whole 1% split) for every run
        # and seed: a fixed sample order (data.eval_seed) and enough batches to cover them.
        return [f"model.overrides.hidden_size={self.hidden}", f"model.overrides.num_layers={self.layers}",
                f"model.overrides.num_attention_heads={self.heads}", "model.overrides.hidden_dropout=0.0",
                "model.overrides.attention_dropout=0.0", f"train.micro_batch_size={self.micro_batch}",
                "train.seq_length=128", "train.grad_accum_steps=1", "data.eval_seed=1234",
                f"train.eval_iters={-(-EVAL_SAMPLES // self.micro_batch)}"]


EVAL_SAMPLES = 320


SIZES = {"s": ModelSize(64, 2, 4, 15), "m": ModelSize(128, 2, 4, 46), "l": ModelSize(192, 3, 6, 125)}
LONG_TOKENIZER = "data/tokenizer/spm_bpe_1k.model"

# The long study's lr centres, per trainer task, for 2,000 steps of warm-up + cosine (the main
# study's centres were tuned for 24 steps; BERT's all sat at an edge there). The grid is extended
# at its edges, so a centre only has to be near the optimum.
LONG_LR_CENTERS = {
    "gpt": {"sgd": 1.0, "sgdm": 0.3, "adamw": 3e-3, "adafactor": 3e-2, "came": 1e-3, "lomo": 1.0,
            "adalomo": 3e-2, "adapprox_k8": 3e-3, "adapprox_k16": 3e-3, "galore": 3e-3, "adam_mini": 3e-3,
            "apollo_mini": 1e-2, "adamw8bit": 3e-3},
    # BERT's own: where the main study's 32-step BERT sweep found each best lr (at its edge: SGD/LOMO
    # 3.16, GaLore 9.5e-3, CAME 3.16e-4 at the low edge, the others at the high edge).
    "bert": {"sgd": 3.0, "sgdm": 1.0, "adamw": 3e-3, "adafactor": 3e-2, "came": 3e-4, "lomo": 3.0,
             "adalomo": 3e-2, "adapprox_k8": 3e-3, "adapprox_k16": 3e-3, "galore": 1e-2, "adam_mini": 3e-3,
             "apollo_mini": 1e-2, "adamw8bit": 3e-3},
}
# In the order the study runs them: the papers' claims first (AdaLomo ~ AdamW; Adapprox ahead of
# AdamW / Adafactor / CAME), so a sitting cut short still answers them.
LONG_OPTIMIZERS = ("adamw", "adalomo", "adafactor", "adapprox_k16", "came", "adapprox_k8", "lomo", "galore",
                   "adam_mini", "apollo_mini", "adamw8bit", "sgd", "sgdm")


def size_hparams(size: ModelSize) -> dict:
    """Hyperparameters that follow the width: GaLore's rank is hidden/4 (as in the main study)."""
    return {"galore": {"rank": max(1, size.hidden // 4)}}


def lr_grid(center: float, n: int, span_decades: float = 1.0) -> list[float]:
    """``n`` log-spaced learning rates covering ``span_decades`` decades centred (geometrically)
    on ``center``; n=3, span 1 gives center x {10^-0.5, 1, 10^0.5}."""
    if n < 1:
        raise ValueError("need at least one learning rate")
    if n == 1:
        return [float(center)]
    step = span_decades / (n - 1)
    return [float(f"{center * 10 ** (-span_decades / 2 + i * step):.3g}") for i in range(n)]


def resolve(keys) -> list[Entry]:
    out = []
    for k in keys:
        if k not in CATALOG:
            raise ValueError(f"unknown optimizer {k!r}; choices: {', '.join(CATALOG)}")
        out.append(CATALOG[k])
    return out


def is_log_spaced(lrs: list[float], rel_tol: float = 0.02) -> bool:
    if len(lrs) < 3:
        return True
    ratios = [math.log(b / a) for a, b in zip(lrs, lrs[1:])]
    return all(abs(r - ratios[0]) <= rel_tol * abs(ratios[0]) + 1e-3 for r in ratios)
