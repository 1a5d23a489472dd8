"""One gradient tensor for the tied word embedding, built in place (opt-in, TP = 1).

GPT ties its output layer to the word embeddings. Stock autograd gives that weight two dense
vocab x hidden gradients, the output layer's (early in backward) and the lookup's
(``embedding_dense_backward``, at the very end), and sums them, so at the end of backward two
such tensors are alive at once (155 MB more than one at GPT-2 124M shapes, fp32). At short
sequences that second tensor is most of what separates a fused update (AdaLomo, LOMO) from its
memory floor (docs/benchmarks/memory.md).

``tie_gradient_in_place(model)`` is applied from outside to a built model; nothing in
``pretrain.models`` calls it, so models keep megatron's own forward unless a caller asks.
``tools/bench_memory.py`` measures it (the ``*_tied`` probes) and ``tests/tools/test_bench_memory.py``
checks that the gradients and fused steps are unchanged.

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
    """Give the tied word embedding of a megatron GPT ONE gradient tensor, built in place.

    The output layer's backward leaves its weight gradient in a holder made by the lookup of the
    same forward, and the lookup's backward adds its rows into it (``index_add_``) and returns it
    as the weight's only gradient. A post-accumulate hook (the fused update) sees the full
    gradient once. One holder per forward, so several forwards in one graph, retained graphs and
    gradient accumulation stay exact.

    TP = 1 only: the replacement forwards do no vocab-parallel communication. The output layer
    must have no bias and the embedding no sequence-parallel reduce-scatter, for the same reason.
    """
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("tie_gradient_in_place: TP = 1 only")
    emb, out = model.embedding.word_embeddings, model.output_layer
    if getattr(out, "bias", None) is not None or getattr(emb, "reduce_scatter_embeddings", False):
        raise ValueError("tie_gradient_in_place: output layer without bias, no sequence parallelism")
    emb.forward = types.MethodType(_tied_lookup_forward, emb)
    out.forward = types.MethodType(_tied_output_forward, out)
