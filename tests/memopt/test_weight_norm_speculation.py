"""The C++ factored kernel's speculated RMS(W) (cpu_kernels.cpp, factored_step): lr_t comes from
the row sums of W^2 the kernel wrote last step, checked on every row while updating it.

An unedited run gives the same bits as a kernel that reads W (no speculation) and never repairs;
a W written between steps (scaled, one row changed, replaced, a checkpoint loaded) is detected
and repaired, and the run stays within 1e-6 of the torch reference (foreach=False, fused=False)."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt
from memopt import kernels

pytestmark = pytest.mark.skipif(not kernels.available("cpu"), reason="memopt's C++ CPU kernels do not build here")

OPTIMIZERS = {
    "adafactor": lambda ps, **f: memopt.Adafactor(ps, **f),
    "adafactor_beta1": lambda ps, **f: memopt.Adafactor(ps, beta1=0.9, **f),
    "adafactor_beta1_wd": lambda ps, **f: memopt.Adafactor(ps, beta1=0.9, weight_decay=0.1, **f),
    "adalomo": lambda ps, **f: memopt.AdaLomo(ps, lr=1e-2, **f),
    "adalomo_wd": lambda ps, **f: memopt.AdaLomo(ps, lr=1e-2, weight_decay=0.1, **f),
}
# Row lengths below, at and between multiples of the kernel's 32-float vector step (10, 7: tail
# only; 128: no tail; 45: both), so every order the row sums of squares are taken in is covered.
SHAPES = [(13,), (6, 10), (3, 4, 7), (300, 128), (20, 45)]


def cpu_module():
    from memopt.kernels import cpu
    return cpu


def make(name, seed=0, dtype=torch.float32, **flags):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in SHAPES]
    return params, OPTIMIZERS[name](params, **flags)


def grads(params, gen):
    for i, p in enumerate(params):
        p.grad = (torch.randn(p.shape, generator=gen) * (10.0 ** (-i % 3))).to(p.dtype)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unedited_run_gives_the_bits_of_the_kernel_that_reads_w(name, monkeypatch):
    params, opt = make(name)
    g1 = torch.Generator().manual_seed(1)
    before = cpu_module().repairs
    for _ in range(12):
        grads(params, g1)
        opt.step()
    assert cpu_module().repairs == before
    assert len(opt.__dict__["_row_sq_cache"]) == 4  # the four matrices; the vector has no rows

    monkeypatch.setattr(cpu_module(), "SPECULATE_WEIGHT_NORM", False)
    ref, ref_opt = make(name)
    g2 = torch.Generator().manual_seed(1)
    for _ in range(12):
        grads(ref, g2)
        ref_opt.step()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


def scale_all(params, others):
    for p in params:
        p.data.mul_(0.5)


def change_one_row(params, others):
    params[3].data[17].mul_(40.0)


def replace_storage(params, others):
    for p, q in zip(params, others):
        p.data = q.detach().clone()


def copy_in_place(params, others):
    for p, q in zip(params, others):
        p.data.copy_(q)


@pytest.mark.parametrize("edit", [scale_all, change_one_row, replace_storage, copy_in_place])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_w_written_between_steps_is_repaired(name, edit):
    fast, fast_opt = make(name)
    ref, ref_opt = make(name, foreach=False, fused=False)
    others = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3 for p in fast]
    g_fast, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    before = cpu_module().repairs
    for t in range(1, 13):
        if t in (4, 9):
            edit(fast, others)
            edit(ref, others)
        grads(fast, g_fast)
        grads(ref, g_ref)
        fast_opt.step()
        ref_opt.step()
        for p, q in zip(fast, ref):
            assert rel_err(p.detach(), q.detach()) <= 1e-6, (t, p.shape)
    assert cpu_module().repairs > before


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_loaded_checkpoint_is_not_speculated_on(name):
    """load_state_dict drops the cache: the first step after it reads W, so loading parameters and
    optimizer state from another run needs no repair and matches the reference."""
    fast, fast_opt = make(name)
    ref, ref_opt = make(name, foreach=False, fused=False)
    assert fast_opt.param_groups[0]["fused"] is None
    # One donor per path: a state dict carries its groups' foreach/fused flags along.
    donor_fast, donor_fast_opt = make(name, seed=3)
    donor_ref, donor_ref_opt = make(name, seed=3, foreach=False, fused=False)
    gens = [torch.Generator().manual_seed(s) for s in (1, 1, 2, 2)]
    for _ in range(5):
        for ps, o, g in zip((fast, ref, donor_fast, donor_ref), (fast_opt, ref_opt, donor_fast_opt, donor_ref_opt),
                            gens):
            grads(ps, g)
            o.step()
    for ps, donor in ((fast, donor_fast), (ref, donor_ref)):
        for p, d in zip(ps, donor):
            p.data.copy_(d)
    # torch's loader keeps the saved tensors (same dtype and device): a copy, as from disk.
    fast_opt.load_state_dict(copy.deepcopy(donor_fast_opt.state_dict()))
    ref_opt.load_state_dict(copy.deepcopy(donor_ref_opt.state_dict()))
    g_fast, g_ref = gens[0], gens[1]
    before = cpu_module().repairs
    for _ in range(4):
        grads(fast, g_fast)
        grads(ref, g_ref)
        fast_opt.step()
        ref_opt.step()
    assert cpu_module().repairs == before
    assert fast_opt.__dict__["_row_sq_cache"]  # the kernel speculated again after its first step
    for p, q in zip(fast, ref):
        assert rel_err(p.detach(), q.detach()) <= 1e-6


def test_bf16_parameters_keep_no_cache():
    params, opt = make("adafactor", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads(params, g)
        opt.step()
    assert not opt.__dict__.get("_row_sq_cache")
