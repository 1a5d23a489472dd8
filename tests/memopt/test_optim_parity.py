"""Parity of memopt's optimizers with the reference implementations (ALGORITHMS.md):
20 steps on 1-D, square, tall, wide and 3-D tensors, max relative difference <= 1e-6."""
from __future__ import annotations

import pytest
import torch

from memopt import CAME, AdaLomo, Adafactor
from optim_helpers import SHAPES, ParamModule, clone_params, make_grads, make_params, max_rel_diff, run_steps

STEPS = 20
TOL = 1e-6

transformers_opt = pytest.importorskip("transformers.optimization")


def _compare(ref_factory, ours_factory, grads=None, seed=0):
    params = make_params(seed)
    grads = grads if grads is not None else make_grads(STEPS, seed + 100)
    ref_p, our_p = clone_params(params), clone_params(params)
    run_steps(ref_factory(ref_p), ref_p, grads)
    run_steps(ours_factory(our_p), our_p, grads)
    # The parameters really moved: parity is not the trivial "nothing happened".
    assert max_rel_diff(ref_p, params) > 1e-5
    return max_rel_diff(our_p, ref_p)


@pytest.mark.parametrize(
    "kw",
    [
        dict(relative_step=True, scale_parameter=True, warmup_init=False),
        dict(relative_step=True, scale_parameter=True, warmup_init=True),
        dict(relative_step=True, scale_parameter=False, warmup_init=False, weight_decay=0.1),
        dict(relative_step=False, scale_parameter=True, lr=1e-2),
        dict(relative_step=False, scale_parameter=False, lr=1e-2, weight_decay=0.05),
        dict(relative_step=False, scale_parameter=True, lr=1e-2, clip_threshold=0.5, weight_decay=0.01),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_adafactor_matches_transformers(kw):
    kw = dict(kw)
    kw.setdefault("lr", None)
    diff = _compare(
        lambda ps: transformers_opt.Adafactor(ps, beta1=None, **kw),
        lambda ps: Adafactor(ps, beta1=None, **kw),
    )
    assert diff <= TOL


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999, 0.9999), (0.8, 0.99, 0.999)])
def test_came_matches_came_pytorch(weight_decay, betas):
    came_pytorch = pytest.importorskip("came_pytorch")
    diff = _compare(
        lambda ps: came_pytorch.CAME(ps, lr=1e-3, betas=betas, weight_decay=weight_decay),
        lambda ps: CAME(ps, lr=1e-3, betas=betas, weight_decay=weight_decay),
    )
    assert diff <= TOL


def test_adalomo_matches_transformers_adafactor_rule():
    # AdaLomo == Adafactor(scale_parameter=True, relative_step=False, beta1=None).
    diff = _compare(
        lambda ps: transformers_opt.Adafactor(ps, lr=1e-2, scale_parameter=True, relative_step=False, beta1=None),
        lambda ps: AdaLomo(ps, lr=1e-2),
    )
    assert diff <= TOL


@pytest.fixture
def lomo_optim_on_cpu(monkeypatch):
    """lomo_optim creates its state with ``.cuda()``; on a CPU machine make that a no-op."""
    lomo_optim = pytest.importorskip("lomo_optim")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    return lomo_optim


@pytest.mark.parametrize("fused", [True, False], ids=["fused_backward", "step"])
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(weight_decay=0.1), dict(clip_grad_value=0.5), dict(clip_grad_norm=3.0)],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults",
)
def test_adalomo_matches_lomo_optim(lomo_optim_on_cpu, fused, kw):
    # lomo_optim itself only handles 1-D and 2-D tensors (3-D is covered against transformers).
    shapes = [s for s in SHAPES if len(s) <= 2]
    params = make_params(0, shapes)
    coeffs = make_grads(STEPS, 7, shapes)
    lr = 1e-2
    ref_model = ParamModule(params)
    ref = lomo_optim_on_cpu.AdaLomo(ref_model, lr=lr, **kw)
    our_model = ParamModule(params)
    ours = AdaLomo(our_model.parameters(), lr=lr, **kw)
    for c in coeffs:
        if "clip_grad_norm" in kw:
            ref.grad_norm(ref_model.loss(c))
        ref.fused_backward(ref_model.loss(c), lr)
        if fused:
            ours.fused_backward(our_model.loss(c))
        else:
            our_model.loss(c).backward()
            ours.step()
            ours.zero_grad(set_to_none=True)
    assert max_rel_diff(list(ref_model.parameters()), params) > 1e-4
    assert max_rel_diff(list(our_model.parameters()), list(ref_model.parameters())) <= TOL
