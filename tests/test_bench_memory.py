"""tools/bench_memory.py: the RSS meter, and the in-place tied-gradient fix it measures."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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


def _grads(model, batch):
    from pretrain.models import gpt_loss

    model.zero_grad(set_to_none=True)
    loss, _ = gpt_loss(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(loss.detach())


def test_tied_gradient_in_place_gives_the_same_gradients(model_parallel_tp1):
    from pretrain.models import build_gpt, get_preset

    cfg = get_preset("tiny", "gpt", vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0)
    batch = bench._batch(torch, cfg, 16, 0)
    model = build_gpt(cfg, seed=3)
    ref, ref_loss = _grads(model, batch)
    bench.tie_gradient_in_place(torch, model)
    seen = []
    emb = model.embedding.word_embeddings.weight
    h = emb.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.data_ptr()))
    got, loss = _grads(model, batch)
    h.remove()
    assert loss == ref_loss
    assert len(seen) == 1  # the tied weight's gradient is final exactly once
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
