"""Fused backward (LOMO, AdaLomo): updates inside backward, gradients freed at once, same result
as the ordinary step, and dynamic loss scaling for fp16."""
from __future__ import annotations

import pytest
import torch

import memopt


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).to(dtype)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("cls", [memopt.AdaLomo, memopt.Lomo])
@pytest.mark.parametrize(
    "kw", [dict(), dict(weight_decay=0.1), dict(clip_grad_value=0.05), dict(clip_grad_norm=0.1)],
    ids=lambda kw: ",".join(kw) or "plain",
)
def test_fused_and_step_modes_give_identical_parameters(cls, kw):
    fused_model, step_model = _mlp(), _mlp()
    fused = cls(fused_model.parameters(), lr=1e-2, **kw)
    stepped = cls(step_model.parameters(), lr=1e-2, **kw)
    for batch in _batches(6):
        fused.fused_backward(_loss(fused_model, batch))
        _loss(step_model, batch).backward()
        stepped.step()
        stepped.zero_grad(set_to_none=True)
    moved = False
    for a, b, c in zip(fused_model.parameters(), step_model.parameters(), _mlp().parameters()):
        assert torch.equal(a, b)
        moved |= not torch.equal(a, c)
    assert moved


def _live_grads_during_backward(model, run_backward):
    """Largest number of parameters holding a .grad at any point of backward."""
    peak = 0

    def observe(grad):
        nonlocal peak
        peak = max(peak, sum(p.grad is not None for p in model.parameters()))
        return grad

    x, y = _batches(1)[0]
    h = x
    for layer in model:
        h = layer(h)
        if h.requires_grad:
            h.register_hook(observe)
    loss = torch.nn.functional.mse_loss(h, y)
    run_backward(loss)
    return peak


@pytest.mark.parametrize("cls", [memopt.AdaLomo, memopt.Lomo])
def test_gradients_do_not_outlive_their_update(cls):
    model = _mlp()
    opt = cls(model.parameters(), lr=1e-2)
    assert _live_grads_during_backward(model, lambda loss: loss.backward()) >= 4  # ordinary: they pile up
    model.zero_grad(set_to_none=True)
    assert _live_grads_during_backward(model, opt.fused_backward) == 0
    assert all(p.grad is None for p in model.parameters())
    opt2 = cls(model.parameters(), lr=1e-2, clip_grad_norm=1.0)  # two-pass mode frees them too
    assert _live_grads_during_backward(model, opt2.fused_backward) == 0


def test_fused_backward_refuses_accumulated_gradients():
    model = _mlp()
    opt = memopt.AdaLomo(model.parameters())
    _loss(model, _batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="already hold gradients"):
        opt.fused_backward(_loss(model, _batches(1)[0]))


def test_fp16_dynamic_loss_scale_skips_overflow_and_grows_back():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = memopt.Lomo([p], lr=1e-3, loss_scale=2.0**16, loss_scale_growth_interval=2)
    coeff = torch.full((4,), 10.0, dtype=torch.float16)  # grad 10: 10 * 2^13 overflows fp16, 10 * 2^12 not

    def loss():
        return (p * coeff).sum()

    applied = [opt.fused_backward(loss()) for _ in range(4)]
    assert applied == [False] * 4 and torch.equal(p, torch.ones_like(p))
    assert opt.loss_scaler.scale == 2.0**12 and opt.loss_scaler.overflows == 4
    assert opt.fused_backward(loss()) is True
    assert torch.equal(p, (torch.ones(4) - 1e-3 * 10).half())  # fp32 math on the unscaled gradient
    assert opt.fused_backward(loss()) is True
    assert opt.loss_scaler.scale == 2.0**13  # two clean steps: grows back
    assert opt.fused_backward(loss()) is False  # ... and overflows again at 2^13
    assert opt.state_dict()["loss_scaler"]["scale"] == 2.0**12


def test_loss_scaler_state_is_restored():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = memopt.AdaLomo([p], lr=1e-3)
    opt.loss_scaler.scale = 128.0
    opt.loss_scaler.clean_steps = 7
    fresh = memopt.AdaLomo([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))], lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.loss_scaler.scale == 128.0 and fresh.loss_scaler.clean_steps == 7
