"""Adapprox's lowrank_* CPU kernels (memopt/kernels/cpu_adapprox.cpp), which form G*G, V, the
residual and Vhat = Q U^T per row block instead of through the m x n buffer, against the torch
ops they replace (lowrank.vt_matmul's S part, residual_norms_, Q U^T + uhat_): within float
round-off, on shapes that exercise every tail (rows not a multiple of the 8-row block, columns
not a multiple of the 16-column panels, several matrices, ranks 1 to 64). The optimizer-level
agreement (projection and sketch steps vs fused=False) is in test_adapprox_kernels.py."""
from __future__ import annotations

import math

import pytest
import torch

import memopt
from memopt.adapprox_ops import uhat_
from memopt.kernels import cpu_adapprox
from memopt.lowrank import relative_error, residual_norms_, worst_error

pytestmark = pytest.mark.skipif(not cpu_adapprox.ready(), reason="Adapprox's C++ CPU kernels do not build here")

GROUP = dict(betas=(0.9, 0.999), lr=1e-3, weight_decay=0.0, vhat_floor="grad")
# (B, m, n, k): one vector block exactly, tails of rows and columns, a stack, ranks 1 and 64
SHAPES = [(1, 16, 32, 16), (1, 37, 70, 5), (2, 19, 48, 16), (1, 6, 13, 1), (1, 65, 100, 64)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _factors(B, m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, m, n, generator=gen) * 1e-3
    q = torch.linalg.qr(torch.randn(B, m, k, generator=gen)).Q.contiguous()
    # U such that Q U^T is mostly positive, with some entries below the floor
    u = (torch.rand(B, n, k, generator=gen) * 1e-6) * torch.sign(q.sum(1, keepdim=True))
    return g, q, u


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gram_is_q_transposed_times_g_squared(shape):
    g, q, _ = _factors(*shape)
    total, z = cpu_adapprox.lowrank_gram(g, q)
    ref = q.double().mT @ (g.double() ** 2)
    assert z.shape == ref.shape
    assert _rel(z, ref) <= 1e-6
    assert total == pytest.approx(float((g.double() ** 2).sum()), rel=1e-6)


def test_gram_of_a_nonfinite_gradient_says_so():
    g, q, _ = _factors(1, 9, 40, 3)
    g[0, 5, 33] = float("inf")
    total, _ = cpu_adapprox.lowrank_gram(g, q)
    assert total == float("inf")


def test_sum_squares_sums_g_squared_and_sees_an_overflow():
    g = torch.randn(3, 70_001) * 1e-3
    assert cpu_adapprox.sum_squares(g) == pytest.approx(float((g.double() ** 2).sum()), rel=1e-6)
    g[1, 5] = 3e19  # finite, but its square is not a float
    assert cpu_adapprox.sum_squares(g) > 3.4e38


@pytest.mark.parametrize("r", [1, 5, 16, 21, 33, 64])
@pytest.mark.parametrize("shape", [(1, 37, 70), (2, 9, 300)], ids=str)
def test_operator_is_the_buffer_operator(shape, r):
    """lowrank_operator (G*G formed inside lowrank_sx and lowrank_gram) against
    lowrank.second_moment_operator on the explicit G*G, with and without history."""
    from memopt.lowrank import second_moment_operator

    B, m, n = shape
    g, q_prev, u_prev = _factors(B, m, n, 4, seed=6)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(B, n, r, generator=gen), torch.randn(B, m, r, generator=gen)
    for qp, up in ((q_prev, u_prev), (q_prev[..., :0], u_prev[..., :0])):
        ref_v, ref_vt = second_moment_operator(qp, up, g * g, 0.999)
        got_v, got_vt = cpu_adapprox.lowrank_operator(g, qp.contiguous(), up, 0.999)
        assert _rel(got_v(x), ref_v(x)) <= 1e-6
        assert _rel(got_vt(y), ref_vt(y)) <= 1e-6
        assert got_vt(y).shape == (B, n, r) and got_v(x).shape == (B, m, r)


@pytest.mark.parametrize("floor", ["grad", "zero"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_uhat_from_the_factors_is_the_torch_ops(shape, floor):
    g, q, u = _factors(*shape, seed=1)
    group = dict(GROUP, vhat_floor=floor)
    ref = uhat_(torch.bmm(q, u.mT), g, group, 1e-8)
    out = torch.full_like(g, float("nan"))  # every element must be written
    sumsq = cpu_adapprox.lowrank_uhat_sumsq_(g, q, u.mT.contiguous(), out, group, 1e-8)
    assert _rel(out, ref) <= 1e-6
    assert sumsq == pytest.approx(float(ref.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("k_prev", [0, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sketch_pass_gives_the_residual_norms_and_uhat_of_the_torch_ops(shape, k_prev):
    B, m, n, k = shape
    g, q, u = _factors(*shape, seed=2)
    _, q_prev, u_prev = _factors(B, m, n, k_prev, seed=3) if k_prev else (None, q[..., :0], u[..., :0])
    beta2, scale = 0.999, float((g * g).mean())
    v_norm, r_norm = residual_norms_((g * g).clone(), q_prev, u_prev, q, u, beta2, scale=scale)
    ref_error = float(relative_error(v_norm.unsqueeze(-1), r_norm.unsqueeze(-1)).max())
    ref = uhat_(torch.bmm(q, u.mT), g, GROUP, 1e-8)

    out = torch.full_like(g, float("nan"))
    sumsq, v2, r2 = cpu_adapprox.lowrank_sketch_uhat_(g, q, u, q_prev, u_prev, out, GROUP, 1e-8, scale=scale)
    assert _rel(out, ref) <= 1e-6
    assert sumsq == pytest.approx(float(ref.double().square().sum()), rel=1e-6)
    assert v2 == pytest.approx((v_norm.double() ** 2).tolist(), rel=1e-5)
    assert r2 == pytest.approx((r_norm.double() ** 2).tolist(), rel=1e-5)
    assert worst_error(v2, r2) == pytest.approx(ref_error, rel=1e-5)


def test_worst_error_is_zero_for_a_zero_v_and_nan_for_a_nonfinite_norm():
    assert worst_error([0.0, 4.0], [0.0, 1.0]) == 0.5
    assert math.isnan(worst_error([4.0, 4.0], [1.0, float("inf")]))
    assert math.isnan(worst_error([4.0], [float("nan")]))
    assert worst_error([float("inf")], [1.0]) == 0.0  # as relative_error: 1 / inf


@pytest.mark.parametrize("resketch_every", [1, 3])
def test_the_switch_turns_the_lowrank_passes_off_and_both_paths_agree(resketch_every, monkeypatch):
    """LOWRANK_PASSES=False takes the GEMMs through the buffer (how the benchmark measures the
    difference); the two paths agree to round-off over sketch and projection steps."""
    calls = []
    for name in ("lowrank_gram", "lowrank_sketch_uhat_"):
        real = getattr(cpu_adapprox, name)
        monkeypatch.setattr(cpu_adapprox, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(33, 70, generator=gen) for _ in range(6)]
    finals = {}
    for on in (True, False):
        monkeypatch.setattr(cpu_adapprox, "LOWRANK_PASSES", on)
        calls.clear()
        p = torch.nn.Parameter(torch.randn(33, 70, generator=torch.Generator().manual_seed(5)))
        opt = memopt.Adapprox([p], lr=1e-2, k_max=6, resketch_every=resketch_every)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals[on] = (p.detach().clone(), opt.state[p]["rank"], len(calls))
    assert finals[True][2] == 6 and finals[False][2] == 0
    assert finals[True][1] == finals[False][1]
    assert _rel(finals[True][0], finals[False][0]) <= 1e-6


def test_a_sketch_wider_than_the_kernels_takes_the_buffer_path(monkeypatch):
    """k_max + oversampling > 64: the GEMMs through the buffer (no lowrank kernel asked, no
    error), and the same step as the torch path."""
    calls = []
    for name in ("lowrank_gram", "lowrank_sketch_uhat_", "lowrank_operator"):
        real = getattr(cpu_adapprox, name)
        monkeypatch.setattr(cpu_adapprox, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(90, 100, generator=gen) for _ in range(3)]
    finals = []
    for fused in (None, False):
        p = torch.nn.Parameter(torch.randn(90, 100, generator=torch.Generator().manual_seed(9)))
        opt = memopt.Adapprox([p], lr=1e-2, k_max=70, k_init=70, resketch_every=2, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals.append(p.detach().clone())
    assert calls == []
    assert _rel(finals[0], finals[1]) <= 1e-6
