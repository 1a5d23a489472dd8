"""The tied word embedding's gradient built in place (pretrain/models/tied_embedding.py): GPT's
default at TP = 1, bitwise the stock megatron gradient, ONE gradient tensor into the weight."""
import pytest
import torch

from pretrain.models import build_gpt, get_preset, gpt_logits, gpt_loss
from pretrain.models.tied_embedding import (
    builds_tied_gradient_in_place,
    in_place_unsupported,
    tie_gradient_in_place,
    use_megatron_forward,
)


def _tiny(vocab=500, seed=3):
    cfg = get_preset("tiny", "gpt", vocab_size=vocab, hidden_dropout=0.0, attention_dropout=0.0)
    return build_gpt(cfg, seed=seed), cfg


def _batch(batch, seq, high, step):
    """Tokens drawn from ``0..high-1``: a small ``high`` repeats ids within the batch."""
    g = torch.Generator().manual_seed(1000 + step)
    t = torch.randint(0, high, (batch, seq + 1), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(batch, seq)}


def _grads(model, batches, one_graph=False):
    """Gradients after one backward per batch (accumulated), or one backward of the summed losses."""
    model.zero_grad(set_to_none=True)
    losses = [gpt_loss(model, b)[0] for b in batches]
    if one_graph:
        sum(losses).backward()
    else:
        for loss in losses:
            loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _weight_sized_buffers_in_backward(model, loss) -> int:
    """How many distinct tensors of the tied weight's size backward creates (views not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    weight = model.embedding.word_embeddings.weight
    storages = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.numel() == weight.numel():
                    storages.add(t.untyped_storage().data_ptr())
            return out

    with Record():
        loss.backward()
    storages.discard(weight.untyped_storage().data_ptr())
    return len(storages)


def test_gpt_builds_it_by_default_at_tp1(model_parallel_tp1):
    model, _ = _tiny()
    assert in_place_unsupported(model) is None
    assert builds_tied_gradient_in_place(model)
    use_megatron_forward(model)
    assert not builds_tied_gradient_in_place(model)


def test_backward_makes_one_weight_sized_gradient(model_parallel_tp1):
    model, cfg = _tiny()
    batch = _batch(1, 16, cfg.vocab_size, 0)
    assert _weight_sized_buffers_in_backward(model, gpt_loss(model, batch)[0]) == 1
    model.zero_grad(set_to_none=True)
    use_megatron_forward(model)
    # stock: the output layer's, embedding_dense_backward's and their sum
    assert _weight_sized_buffers_in_backward(model, gpt_loss(model, batch)[0]) >= 2


# (batch, seq, id range, dtype): repeated ids (compact path), all ids distinct-ish, more tokens
# than vocabulary rows (dense path), bf16.
CASES = [(2, 64, 20, torch.float32), (1, 16, 500, torch.float32), (9, 64, 500, torch.float32),
         (2, 64, 30, torch.bfloat16)]


@pytest.mark.parametrize("batch,seq,high,dtype", CASES)
def test_gradients_are_bitwise_the_stock_ones(model_parallel_tp1, batch, seq, high, dtype):
    model, _ = _tiny()
    model = model.to(dtype)
    batches = [_batch(batch, seq, high, step) for step in range(2)]  # accumulated: two backwards
    got = _grads(model, batches)
    use_megatron_forward(model)
    ref = _grads(model, batches)
    for name, g in ref.items():
        assert torch.equal(got[name], g), name


def test_two_forwards_in_one_graph_match_up_to_rounding(model_parallel_tp1):
    model, _ = _tiny()
    batches = [_batch(1, 16, 50, step) for step in range(2)]
    got = _grads(model, batches, one_graph=True)
    use_megatron_forward(model)
    ref = _grads(model, batches, one_graph=True)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_logits_unchanged_and_hooks_see_the_full_gradient_once(model_parallel_tp1):
    model, cfg = _tiny()
    tokens = _batch(2, 16, cfg.vocab_size, 0)["tokens"]
    with torch.no_grad():
        tied_logits = gpt_logits(model, tokens)
        use_megatron_forward(model)
        stock_logits = gpt_logits(model, tokens)
    assert torch.equal(tied_logits, stock_logits)

    tie_gradient_in_place(model)
    weight = model.embedding.word_embeddings.weight
    seen = []
    weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    gpt_loss(model, _batch(2, 16, 40, 1))[0].backward()
    assert len(seen) == 1 and torch.equal(seen[0], weight.grad)


def test_fused_adalomo_steps_are_bitwise_unchanged(model_parallel_tp1):
    import memopt

    weights = []
    for in_place in (True, False):
        model, cfg = _tiny()
        if not in_place:
            use_megatron_forward(model)
        opt = memopt.AdaLomo(model.parameters(), lr=1e-2)
        for step in range(2):
            opt.fused_backward(gpt_loss(model, _batch(1, 16, 40, step))[0])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, w in weights[1].items():
        assert torch.equal(weights[0][name], w), name


def test_frozen_embedding_gets_no_gradient(model_parallel_tp1):
    model, cfg = _tiny()
    model.embedding.word_embeddings.weight.requires_grad_(False)
    gpt_loss(model, _batch(1, 16, cfg.vocab_size, 0))[0].backward()
    assert model.embedding.word_embeddings.weight.grad is None
    assert model.decoder.final_layernorm.weight.grad is not None


def test_refused_where_megatron_must_communicate(model_parallel_tp1):
    model, _ = _tiny()
    model.output_layer.config.sequence_parallel = True  # the flags megatron's forwards act on
    try:
        assert in_place_unsupported(model) == "sequence_parallel"
        with pytest.raises(ValueError, match="not with sequence_parallel"):
            tie_gradient_in_place(model)
    finally:
        model.output_layer.config.sequence_parallel = False
