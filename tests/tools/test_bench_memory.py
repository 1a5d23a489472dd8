"""tools/bench_memory.py: the RSS meter, and the in-place tied gradient it measures
(pretrain/models/tied_embedding.py)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from pretrain.models.tied_embedding import tie_gradient_in_place

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "tools" / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_meter_sees_a_transient_allocation_and_resets():
    meter = bench.Meter()
    with meter.stage("alloc"):
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with meter.stage("idle"):
        pass
    alloc, idle = meter.stages
    assert alloc["peak"] > 60 * 2**20  # the high-water mark kept the freed tensor
    assert idle["peak"] < alloc["peak"] - 50 * 2**20  # and was reset for the next stage


def _tiny(seed=3):
    from pretrain.models import build_gpt, get_preset

    cfg = get_preset("tiny", "gpt", vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0)
    return build_gpt(cfg, seed=seed), cfg


def _grads(model, batches, accumulate=False):
    """Gradients of the summed loss of ``batches``: one graph, or one backward per batch."""
    from pretrain.models import gpt_loss

    model.zero_grad(set_to_none=True)
    losses = [gpt_loss(model, b)[0] for b in batches]
    if accumulate:
        for loss in losses:
            loss.backward()
    else:
        sum(losses).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_batches,accumulate", [(1, False), (2, False), (2, True)])
def test_tied_gradient_in_place_gives_the_same_gradients(model_parallel_tp1, n_batches, accumulate):
    model, cfg = _tiny()
    batches = [bench._batch(torch, cfg, 16, i) for i in range(n_batches)]
    ref = _grads(model, batches, accumulate)
    tie_gradient_in_place(model)
    seen = []
    emb = model.embedding.word_embeddings.weight
    h = emb.register_post_accumulate_grad_hook(lambda p: seen.append(1))
    got = _grads(model, batches, accumulate)
    h.remove()
    assert len(seen) == (n_batches if accumulate else 1)  # final once per backward
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_tied_gradient_in_place_fused_adalomo_step_is_unchanged(model_parallel_tp1):
    import memopt
    from pretrain.models import gpt_loss

    weights = []
    for tied in (False, True):
        model, cfg = _tiny()
        if tied:
            tie_gradient_in_place(model)
        opt = memopt.AdaLomo(model.parameters(), lr=1e-2)
        for step in range(2):
            opt.fused_backward(gpt_loss(model, bench._batch(torch, cfg, 16, step))[0])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-6, msg=name)
