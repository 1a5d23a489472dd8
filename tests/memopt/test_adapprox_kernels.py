"""Adapprox's fused CPU element-wise passes (memopt/kernels/cpu_adapprox.cpp) against the torch ops
they replace (memopt.adapprox_ops.uhat_, apply_update), and the optimizer with them (fused=None or
True on CPU) against its torch path (fused=False) over sketch and projection steps: parameters
<= 1e-6 relative, first moment and factors within the torch path's own one-ulp sensitivity; a non-finite gradient skipped with nothing changed;
which path the flags pick."""
from __future__ import annotations

import pytest
import torch

import memopt
from memopt import adapprox_ops
from memopt.adapprox_ops import apply_update, uhat_
from memopt.kernels import KernelUnavailable, cpu_adapprox

pytestmark = pytest.mark.skipif(not cpu_adapprox.ready(), reason="Adapprox's C++ CPU kernels do not build here")

GROUP = dict(betas=(0.9, 0.999), lr=1e-3, weight_decay=0.0, vhat_floor="grad")


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


def test_square_sum_writes_g_squared_and_sums_it():
    g = torch.randn(70_001) * 1e-3  # more than one block and one thread's grain
    out = torch.empty_like(g)
    total = cpu_adapprox.square_sum(g, out)
    assert torch.equal(out, g * g)
    assert total == pytest.approx(float((g.double() ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("floor", ["grad", "zero"])
def test_uhat_is_the_torch_ops_within_two_ulps(floor):
    torch.manual_seed(0)
    g = torch.randn(301, 177) * 1e-3
    vhat = torch.randn(301, 177) * 1e-6  # Q U^T: negative entries hit the floor / the clamp
    group = dict(GROUP, vhat_floor=floor)
    ref = uhat_(vhat.clone(), g, group, 1e-8)
    got = vhat.clone()
    sumsq = cpu_adapprox.uhat_sumsq_(got, g, group, 1e-8)
    # Two ulps (2.4e-7): this sqrt is correctly rounded, torch's vectorized one not always, and
    # its one-ulp difference can round the other way in the division.
    assert _max_rel(got, ref) <= 2.5e-7
    assert sumsq == pytest.approx(float(ref.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("with_m", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_apply_update_is_the_torch_ops_bit_for_bit(with_m, weight_decay):
    torch.manual_seed(1)
    group = dict(GROUP, weight_decay=weight_decay)
    w, uhat, m = torch.randn(3, 40_000), torch.randn(3, 40_000), torch.randn(3, 40_000)
    w_ref, m_ref = w.clone(), m.clone() if with_m else None
    apply_update(w_ref, uhat, m_ref, 0.7, group, 2e-3)
    m_got = m.clone() if with_m else None
    cpu_adapprox.apply_update_(w, uhat, m_got, 0.7, group, 2e-3)
    assert torch.equal(w, w_ref)
    if with_m:
        assert torch.equal(m_got, m_ref)


def _run(fused, shapes, steps, grads, **kw):
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = memopt.Adapprox(params, lr=1e-2, k_max=6, fused=fused, **kw)
    for t in range(steps):
        for p, g in zip(params, grads[t]):
            p.grad = g
        opt.step()
    return params, opt


def _close(a, b):
    """<= 1e-6 relative to the tensor's size (element-wise rtol would be met as well but for
    entries that sit at round-off, e.g. a factor column's near-zero components)."""
    return float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12


@pytest.mark.parametrize(
    "options",
    [dict(), dict(resketch_every=3), dict(weight_decay=0.1, bias_correction=True, resketch_every=2),
     dict(betas=(0.0, 0.99), vhat_floor="zero")],
    ids=["defaults", "resketch3", "wd_bc_resketch2", "no_m_zero_floor"],
)
def test_optimizer_with_kernels_equals_its_torch_path(options):
    """W within 1e-6 of the torch path. The factors and M within the round-off the algorithm
    itself amplifies: the kernels form the sketch's products and Vhat with their own sums of k
    products (not MKL's), and the subspace iteration and Uhat = G / sqrt(Vhat) (where Vhat is
    small) magnify such differences, so the yardstick is how far the torch path itself moves when
    every gradient entry moves by one ulp (measured: the kernel path's distance is 0.5-1.6x that)."""
    shapes = [(40, 24), (2, 12, 30), (19, 70), (9,)]  # (19, 70): row and column tails of the kernels
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(7)]
    one_ulp = [[torch.nextafter(g, torch.full_like(g, float("inf"))) for g in gs] for gs in grads]
    p_ref, o_ref = _run(False, shapes, 7, grads, **options)
    p_ulp, o_ulp = _run(False, shapes, 7, one_ulp, **options)
    p_got, o_got = _run(None, shapes, 7, grads, **options)

    def dist(x, y):
        return float((x - y).norm() / y.norm())

    for a, b, c in zip(p_got, p_ref, p_ulp):
        assert _close(a.detach(), b.detach())
        sa, sb, sc = o_got.state[a], o_ref.state[b], o_ulp.state[c]
        assert sa["step"] == sb["step"] == 7
        if "rank" in sa:
            assert sa["rank"] == sb["rank"]
            assert sa["rel_error"] == pytest.approx(sb["rel_error"], rel=1e-4)
            # Q U^T: the factors themselves are defined up to the signs of Q's columns.
            ref = sb["Q"] @ sb["U"].mT
            assert dist(sa["Q"] @ sa["U"].mT, ref) <= 3 * dist(sc["Q"] @ sc["U"].mT, ref) + 1e-7
        if "exp_avg" in sb:
            assert dist(sa["exp_avg"], sb["exp_avg"]) <= 3 * dist(sc["exp_avg"], sb["exp_avg"]) + 1e-7


def test_the_default_and_fused_true_use_the_kernels_and_fused_false_does_not(monkeypatch):
    calls = []
    real = cpu_adapprox.lowrank_sketch_uhat_  # a first step is a sketch step
    monkeypatch.setattr(cpu_adapprox, "lowrank_sketch_uhat_", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for flags in (dict(), dict(fused=True), dict(fused=False), dict(foreach=False)):
        p = torch.nn.Parameter(torch.randn(6, 5))
        p.grad = torch.randn(6, 5)
        memopt.Adapprox([p], **flags).step()
    assert calls == [1, 1]


def test_fused_true_without_the_kernels_says_what_to_do(monkeypatch):
    monkeypatch.setattr(cpu_adapprox, "ready", lambda: False)
    p = torch.nn.Parameter(torch.randn(6, 5))
    p.grad = torch.randn(6, 5)
    before = p.detach().clone()
    memopt.Adapprox([p]).step()  # fused=None: the torch ops
    assert not torch.equal(p.detach(), before)
    with pytest.raises(KernelUnavailable, match="Adapprox: fused=True needs the CPU kernels"):
        memopt.Adapprox([p], fused=True).step()
    assert adapprox_ops.cpu_kernels_for(dict(fused=False, foreach=None), p, p.grad) is None


def test_a_non_contiguous_gradient_takes_the_torch_ops_and_the_same_step():
    g = torch.randn(5, 6).t()  # (6, 5), not contiguous
    assert adapprox_ops.cpu_kernels_for(dict(fused=None, foreach=None), torch.zeros(6, 5), g) is None
    ws = []
    for fused in (None, False):
        p = torch.nn.Parameter(torch.ones(6, 5))
        p.grad = g
        memopt.Adapprox([p], fused=fused).step()
        ws.append(p.detach())
    assert torch.equal(ws[0], ws[1]) and not torch.equal(ws[0], torch.ones(6, 5))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e19])  # 3e19: finite, but its square is not
@pytest.mark.parametrize("resketch_every", [1, 4])
def test_nonfinite_gradient_changes_nothing_on_the_kernel_path(bad, resketch_every, monkeypatch):
    calls = []
    for name in ("sum_squares", "lowrank_gram"):  # a sketch step's first pass, a projection step's
        real = getattr(cpu_adapprox, name)
        monkeypatch.setattr(cpu_adapprox, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    torch.manual_seed(5)
    p = torch.nn.Parameter(torch.randn(30, 20))
    opt = memopt.Adapprox([p], resketch_every=resketch_every)
    p.grad = torch.randn(30, 20)
    opt.step()
    st = opt.state[p]
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
    w = p.detach().clone()
    g = torch.randn(30, 20)
    g[4, 7] = bad
    p.grad = g
    opt.step()
    # both steps ran the kernels; the second of resketch_every=4 is a projection step
    assert calls == ["sum_squares", "sum_squares" if resketch_every == 1 else "lowrank_gram"]
    assert torch.equal(p.detach(), w)
    for k, v in before.items():
        if k != "nonfinite_skips":
            assert torch.equal(st[k], v) if torch.is_tensor(v) else st[k] == v, k
    assert st["nonfinite_skips"] == 1 and st["step"] == 1
