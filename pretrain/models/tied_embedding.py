"""One gradient tensor for GPT's tied word embedding, built in place (the default at TP = 1).

GPT ties its output layer to the word embeddings. Stock autograd gives that weight two dense
vocab x hidden gradients, the output layer's (early in backward) and the lookup's
(``embedding_dense_backward``, at the very end), and sums them, so at the end of backward two
such tensors are alive at once (155 MB more than one at GPT-2 124M shapes, fp32). At short
sequences that second tensor is most of what separates a fused update (AdaLomo, LOMO) from its
memory floor (docs/benchmarks/memory.md).

``MegatronGPT`` calls :func:`tie_gradient_in_place` on itself when :func:`in_place_unsupported`
finds nothing against it (TP = 1, no sequence parallelism, no deferred or fused weight-gradient
accumulation); otherwise the model keeps megatron's own forward. Forward outputs are the same
ops as megatron's, so logits, losses and the HF export are unchanged; the gradient is bitwise
the stock one for every forward that has its own backward (micro-batches, gradient accumulation,
fused two-pass clipping), see ``_TiedLookup``.

A sparse lookup gradient (``F.embedding(..., sparse=True)``) is no alternative on torch 2.13:
autograd's input buffer adds dense + sparse out of place, which makes the same second tensor.
"""

from __future__ import annotations

import types

import torch
from megatron.core import parallel_state


class _TiedGrad:
    """The output layer's part of the tied weight's gradient, for the lookup of the same forward."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


def _compact_ids(flat_ids: torch.Tensor):
    """``(slot_of_token, id_of_slot)``: each distinct id gets a slot in ``0..n-1`` (n = number
    of tokens), numbered in sorted order; unused slots name id 0. Sync-free (no data-dependent
    shapes), unlike ``torch.unique``."""
    n = flat_ids.numel()
    sorted_ids, order = torch.sort(flat_ids, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot_sorted = torch.cumsum(starts, 0) - 1
    slot_of_token = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    id_of_slot = torch.zeros(n, dtype=flat_ids.dtype, device=flat_ids.device).scatter_(0, slot_sorted, sorted_ids)
    return slot_of_token, id_of_slot


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward returns the tied weight's WHOLE gradient:
    the output layer's part (left in ``holder`` by ``_TiedOutput``) plus the lookup's rows.

    Bitwise the stock sum ``output_grad + embedding_dense_backward(g, ids)``: the lookup's rows
    are summed by the same kernel (``embedding_dense_backward``) over a compact id space that
    keeps the tokens' order, then each distinct row is added once (``index_add_``). The compact
    space has one slot per token, so it is never larger than the dense gradient it replaces
    (with more tokens than vocabulary rows the dense gradient is used directly)."""

    @staticmethod
    def forward(ctx, ids, weight, holder):
        ctx.save_for_backward(ids)
        ctx.holder, ctx.shape = holder, weight.shape
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        acc, ctx.holder.grad = ctx.holder.grad, None
        if not ctx.needs_input_grad[1]:
            return None, None, None
        flat, g2 = ids.reshape(-1), g.reshape(-1, g.shape[-1])
        vocab = ctx.shape[0]
        if acc is None or flat.numel() >= vocab:  # no output layer part, or the dense sum is smaller
            dense = torch.ops.aten.embedding_dense_backward(g2, flat, vocab, -1, False)
            return None, dense if acc is None else acc.add_(dense), None
        slot_of_token, id_of_slot = _compact_ids(flat)
        rows = torch.ops.aten.embedding_dense_backward(g2, slot_of_token, flat.numel(), -1, False)
        # Unused slots hold zero rows and name id 0: adding +0.0 changes nothing.
        return None, acc.index_add_(0, id_of_slot, rows), None


class _TiedOutput(torch.autograd.Function):
    """``x @ weight.T`` whose backward keeps its weight gradient in ``holder`` (accumulated in
    place) instead of returning it: autograd then never holds two vocab x hidden gradients.
    The same matmuls as megatron's linear backward at TP = 1."""

    @staticmethod
    def forward(ctx, x, weight, holder):
        ctx.save_for_backward(x, weight)
        ctx.holder = holder
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_dtype = weight.dtype
        if g.dtype != grad_dtype:  # autocast ran the forward matmul in g's dtype (bf16 over fp32 weights)
            x, weight = x.to(g.dtype), weight.to(g.dtype)
        if ctx.needs_input_grad[1]:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            if ctx.holder.grad is None:
                ctx.holder.grad = g2.t().matmul(x2).to(grad_dtype)  # kept in the weight's dtype, as stock
            elif g.dtype == grad_dtype:  # the same forward's output used twice: still in place
                ctx.holder.grad.addmm_(g2.t(), x2)
            else:
                ctx.holder.grad.add_(g2.t().matmul(x2).to(grad_dtype))
        return g.matmul(weight) if ctx.needs_input_grad[0] else None, None, None


def _tied_lookup_forward(self, input_):
    holder = _TiedGrad()
    self.weight._tied_grad_holder = holder  # picked up by the output layer of this forward
    return _TiedLookup.apply(input_, self.weight, holder)


def _tied_output_forward(self, input_, weight=None, runtime_gather_output=None):
    weight = self.weight if weight is None else weight
    expected = (self.output_size_per_partition, self.input_size)
    if tuple(weight.shape) != expected:  # megatron's own check
        raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not {expected} as expected")
    holder = getattr(weight, "_tied_grad_holder", None)
    if holder is None:  # not preceded by a tied lookup: plain linear, ordinary gradient
        return torch.matmul(input_, weight.t()), None
    weight._tied_grad_holder = None
    return _TiedOutput.apply(input_, weight, holder), None


def in_place_unsupported(model) -> str | None:
    """Why the in-place tied gradient cannot replace megatron's forward here, or None.

    The replacement forwards do no tensor-parallel communication and none of megatron's
    weight-gradient buffering (deferred embedding wgrad, fused accumulation into main_grad,
    activation offloading), and assume the output layer is tied and has no bias."""
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        return "tensor parallelism (TP > 1)"
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    out = getattr(model, "output_layer", None)
    if emb is None or out is None or not getattr(model, "share_embeddings_and_output_weights", False):
        return "no tied word embedding and output layer"
    if getattr(out, "bias", None) is not None or getattr(out, "weight", None) is not None:
        return "an output layer with its own weight or a bias"
    config = out.config
    flags = ("sequence_parallel", "defer_embedding_wgrad_compute", "gradient_accumulation_fusion", "cpu_offloading")
    on = [f for f in flags if getattr(config, f, False)] + (["deterministic_mode"] if emb.deterministic_mode else [])
    if getattr(emb, "reduce_scatter_embeddings", False):
        on.append("reduce_scatter_embeddings")
    return ", ".join(on) or None


def tie_gradient_in_place(model) -> None:
    """Give the tied word embedding of a megatron GPT ONE gradient tensor, built in place.

    The output layer's backward leaves its weight gradient in a holder made by the lookup of the
    same forward, and the lookup's backward adds its rows into it and returns it as the weight's
    only gradient. A post-accumulate hook (the fused update) sees the full gradient once. One
    holder per forward, so several forwards in one graph, retained graphs and gradient
    accumulation stay exact (several forwards in ONE backward sum their per-forward gradients in
    another order than stock autograd: equal up to rounding).
    """
    reason = in_place_unsupported(model)
    if reason is not None:
        raise ValueError(f"tie_gradient_in_place: not with {reason}")
    emb, out = model.embedding.word_embeddings, model.output_layer
    emb.forward = types.MethodType(_tied_lookup_forward, emb)
    out.forward = types.MethodType(_tied_output_forward, out)


def use_megatron_forward(model) -> None:
    """Undo :func:`tie_gradient_in_place`: megatron's own forwards again (two dense gradients for
    the tied weight in backward). For comparisons and the memory benchmark's stock probes."""
    for module in (model.embedding.word_embeddings, model.output_layer):
        module.__dict__.pop("forward", None)


def builds_tied_gradient_in_place(model) -> bool:
    """Whether ``model``'s forwards are the in-place ones."""
    forward = model.embedding.word_embeddings.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _tied_lookup_forward
