"""Adam-mini (Zhang et al., 2024, "Adam-mini: Use Fewer Learning Rates To Gain More"), written
from the paper's description: Adam's first moment per entry, but one second-moment scalar per
*block* of parameters, the block's mean of g*g:

    m   = b1 m + (1 - b1) g
    v_b = b2 v_b + (1 - b2) mean_{i in b}(g_i^2)
    W  -= lr (m / (1 - b1^t)) / (sqrt(v_b / (1 - b2^t)) + eps)    (+ decoupled weight decay)

Blocks, per parameter group (``block``):
  "segments": rows of dim 0 grouped by ``segments`` (a LongTensor, one id per row): the paper's
              per-head blocks of Query and Key (``megatron_gpt_groups`` builds them);
  "row":      one block per output neuron (row of dim 0): Value, attention projection, MLP;
  "tensor":   one block for the whole tensor (norms, biases);
  "coordinate": plain Adam, v per entry (the authors' setting for embeddings and the output layer).
"auto" (the default for parameters given without groups): "row" for matrices, "tensor" otherwise.
"""
from __future__ import annotations

import torch

from .base import ParamwiseOptimizer

BLOCKS = ("auto", "segments", "row", "tensor", "coordinate")


def block_of(p: torch.Tensor, group: dict) -> str:
    block = group["block"]
    if block == "auto":
        return "row" if p.ndim >= 2 else "tensor"
    return block


def block_mean_sq(g: torch.Tensor, block: str, segments: torch.Tensor | None) -> torch.Tensor:
    """mean(g*g) per block, shaped to broadcast against ``g``."""
    sq = g * g
    if block == "coordinate":
        return sq
    if block == "tensor":
        return sq.mean().reshape([1] * g.ndim)
    rows = sq.reshape(g.shape[0], -1).mean(dim=1)  # per row
    if block == "row":
        return rows.reshape([-1] + [1] * (g.ndim - 1))
    count = torch.bincount(segments).to(rows.dtype)
    per_segment = torch.zeros(count.numel(), dtype=rows.dtype, device=rows.device).index_add_(0, segments, rows)
    return per_segment / count


def expand(v: torch.Tensor, g: torch.Tensor, block: str, segments: torch.Tensor | None) -> torch.Tensor:
    if block != "segments":
        return v
    return v[segments].reshape([-1] + [1] * (g.ndim - 1))


class AdamMini(ParamwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 block: str = "auto"):
        if lr <= 0:
            raise ValueError(f"AdamMini: lr must be > 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamMini: betas must be in [0, 1), got {betas!r}")
        if block not in BLOCKS:
            raise ValueError(f"AdamMini: block must be one of {', '.join(BLOCKS)}, got {block!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block=block,
                                      segments=None))
        for group in self.param_groups:
            if group["block"] == "segments" and group["segments"] is None:
                raise ValueError("AdamMini: a group with block='segments' needs 'segments' (one id per row)")

    def update(self, p, g, state, group) -> None:
        b1, b2 = group["betas"]
        block, segments = block_of(p, group), group["segments"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["v"] = torch.zeros_like(block_mean_sq(g, block, segments))
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - b1)
        state["v"].mul_(b2).add_(block_mean_sq(g, block, segments), alpha=1 - b2)
        denom = (expand(state["v"], g, block, segments) / (1 - b2**t)).sqrt_().add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - b1**t))


def qkv_segments(num_heads: int, num_query_groups: int, head_dim: int) -> torch.Tensor:
    """Block ids of the rows of megatron-core's fused ``linear_qkv`` (rows per query group: its
    query heads, one key head, one value head; each ``head_dim`` rows): one block per Q head and
    per K head, one per row (output neuron) of V."""
    ids, nxt = [], 0
    for _ in range(num_query_groups):
        for _ in range(num_heads // num_query_groups + 1):  # the group's query heads, then its key head
            ids += [nxt] * head_dim
            nxt += 1
        ids += list(range(nxt, nxt + head_dim))  # value rows: one block each
        nxt += head_dim
    return torch.tensor(ids)


def megatron_gpt_groups(named_params, num_heads: int, num_query_groups: int | None, head_dim: int) -> list[dict]:
    """Adam-mini's partition of a megatron-core GPT: Q/K per head, other matrices per output
    neuron, embeddings and output layer per entry, norms and biases one block per tensor (the
    fused QKV bias follows the QKV rows)."""
    segments = qkv_segments(num_heads, num_query_groups or num_heads, head_dim)
    groups: dict[str, list] = {"segments": [], "row": [], "tensor": [], "coordinate": []}
    for name, p in named_params:
        if "linear_qkv." in name and name.endswith(("weight", "bias")) and p.shape[0] == segments.numel():
            groups["segments"].append(p)
        elif "embedding" in name or name.startswith("output_layer"):
            groups["coordinate"].append(p)
        elif p.ndim >= 2:
            groups["row"].append(p)
        else:
            groups["tensor"].append(p)
    return [dict(params=ps, block=b, segments=segments if b == "segments" else None)
            for b, ps in groups.items() if ps]
