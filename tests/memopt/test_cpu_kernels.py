"""memopt.kernels' CPU backend (C++/OpenMP, memopt/kernels/cpu_kernels.cpp) against the torch
reference path (foreach=False, fused=False): parameters and state after 12 steps <= 1e-6
relative, a non-finite gradient skipped and counted alike, on 1-D, 2-D and 3-D parameters; the
fused backward of AdaLomo/LOMO; the defaults (fused=None picks the kernel on CPU, foreach=False
does not); a machine without a compiler falls back with one warning."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memopt
from memopt import kernels
from memopt.paths import resolve_fused

pytestmark = pytest.mark.skipif(not kernels.available("cpu"), reason="memopt's C++ CPU kernels do not build here")

ROOT = Path(__file__).resolve().parents[2]

OPTIMIZERS = {
    "adafactor": lambda ps, **f: memopt.Adafactor(ps, **f),
    "adafactor_beta1_wd": lambda ps, **f: memopt.Adafactor(ps, beta1=0.9, weight_decay=0.1, **f),
    "adafactor_lr_noscale": lambda ps, **f: memopt.Adafactor(
        ps, lr=1e-2, relative_step=False, scale_parameter=False, clip_threshold=0.5, **f),
    "adalomo_wd": lambda ps, **f: memopt.AdaLomo(ps, lr=1e-2, weight_decay=0.1, **f),
    "came": lambda ps, **f: memopt.CAME(ps, lr=1e-2, **f),
    "came_wd": lambda ps, **f: memopt.CAME(ps, lr=1e-2, weight_decay=0.1, clip_threshold=0.5, **f),
    "lomo": lambda ps, **f: memopt.Lomo(ps, lr=1e-2, **f),
    "lomo_wd": lambda ps, **f: memopt.Lomo(ps, lr=1e-2, weight_decay=0.1, **f),
}

# A vector (bias), a matrix, a batch of matrices (per-matrix factors), a single row and a single
# column, and one large enough that the rows are split over threads.
SHAPES = [(13,), (6, 10), (3, 4, 7), (1, 9), (9, 1), (300, 128)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (0 for equal tensors)."""
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return diff / scale if scale else diff


def run_steps(name: str, steps: int, inf_at: int | None, **flags):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    opt = OPTIMIZERS[name](params, **flags)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen) * (10.0 ** (-i % 3))
        if t == inf_at:
            params[1].grad[0, 0] = float("inf")
            params[2].grad[1, 2, 3] = float("nan")
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("inf_at", [None, 5])
def test_fused_matches_reference(name, inf_at):
    ref, ref_opt = run_steps(name, 12, inf_at, foreach=False, fused=False)
    fus, fus_opt = run_steps(name, 12, inf_at, fused=True)
    for p, q in zip(fus, ref):
        assert rel_err(p.detach(), q.detach()) <= 1e-6, (name, tuple(p.shape))
        sp, sq = fus_opt.state[p], ref_opt.state[q]
        assert sp["step"] == sq["step"] and sp["nonfinite_skips"] == sq["nonfinite_skips"]
        for key, value in sq.items():
            if torch.is_tensor(value):
                assert rel_err(sp[key], value) <= 1e-6, (name, tuple(p.shape), key)
    assert fus_opt.nonfinite_skips == ref_opt.nonfinite_skips == (2 if inf_at else 0)


def test_skipped_step_leaves_parameter_and_state_bit_for_bit():
    for name in ("adafactor_beta1_wd", "came_wd", "lomo_wd"):
        params, opt = run_steps(name, 3, None, fused=True)
        before = [p.detach().clone() for p in params]
        states = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params]
        for p in params:
            p.grad = torch.full(p.shape, float("nan"))
        opt.step()
        for p, b, st in zip(params, before, states):
            assert torch.equal(p.detach(), b), name
            for k, v in st.items():
                assert torch.equal(opt.state[p][k], v), (name, k)
        assert opt.nonfinite_skips == len(params)


def test_huge_finite_gradient_is_skipped_like_the_reference():
    """|g| > 1.8e19 squares to inf in fp32: the reference skips it, so must the kernel."""
    for name in ("adafactor", "came", "lomo"):
        skips = []
        for flags in (dict(foreach=False, fused=False), dict(fused=True)):
            p = torch.nn.Parameter(torch.ones(4, 5))
            opt = OPTIMIZERS[name]([p], **flags)
            p.grad = torch.full((4, 5), 1e20)
            opt.step()
            skips.append(opt.nonfinite_skips)
        assert skips == [1, 1], name


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
@pytest.mark.parametrize("name", ["adafactor", "came", "lomo", "adalomo_wd"])
def test_empty_parameter_is_a_counted_no_op(shape, name):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = OPTIMIZERS[name]([p], fused=True)
    p.grad = torch.zeros(shape)
    opt.step()
    assert opt.state[p]["step"] == 1 and opt.nonfinite_skips == 0


def test_bf16_parameters_match_reference():
    results = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter((torch.randn(16, 24, generator=gen) * 0.1).bfloat16())
        opt = memopt.AdaLomo([p], lr=1e-2, **flags)
        for _ in range(4):
            p.grad = torch.randn(16, 24, generator=gen).bfloat16()
            opt.step()
        results.append((p.detach().float(), opt.state[p]["exp_avg_sq_row"]))
    assert torch.equal(results[0][0], results[1][0])
    assert rel_err(results[1][1], results[0][1]) <= 1e-6


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("cls", ["adalomo", "lomo"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_fused_backward_matches_reference(cls, clip):
    make = {"adalomo": lambda ps, **f: memopt.AdaLomo(ps, lr=1e-2, weight_decay=0.01, clip_grad_norm=clip, **f),
            "lomo": lambda ps, **f: memopt.Lomo(ps, lr=1e-2, clip_grad_norm=clip, **f)}[cls]
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    models = []
    for flags in (dict(foreach=False, fused=False), dict(fused=True)):
        model = tiny_model()
        opt = make(list(model.parameters()), **flags)
        for _ in range(6):
            opt.fused_backward(model(x).square().mean())
        models.append(model)
    for p, q in zip(models[1].parameters(), models[0].parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-6


def test_defaults_pick_the_kernel_on_cpu_only_when_foreach_is_none():
    cpu = torch.device("cpu")
    assert resolve_fused(dict(foreach=None, fused=None), cpu)
    assert not resolve_fused(dict(foreach=False, fused=None), cpu)  # the torch reference path
    assert not resolve_fused(dict(foreach=True, fused=None), cpu)  # the sync-free path
    assert not resolve_fused(dict(foreach=None, fused=False), cpu)
    assert not resolve_fused(dict(foreach=None, fused=None), torch.device("meta"))


def test_default_optimizer_uses_the_kernel(monkeypatch):
    calls = []
    real = kernels.factored_step_host  # the per-parameter host path's call
    monkeypatch.setattr(kernels, "factored_step_host", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = torch.nn.Parameter(torch.randn(4, 6))
    p.grad = torch.randn(4, 6)
    memopt.Adafactor([p]).step()
    memopt.Adafactor([p], foreach=False).step()
    assert calls == [1]


def test_flag_errors():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="cannot both be set"):
        memopt.Adafactor([p], foreach=True, fused=True)


def test_without_a_compiler_falls_back_with_one_warning(tmp_path):
    """No compiler and no cached build: one warning line, fused=None runs the torch path,
    fused=True says what to do."""
    script = textwrap.dedent("""
        import warnings, torch, memopt
        from memopt import kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = torch.nn.Parameter(torch.ones(3, 4)); p.grad = torch.ones(3, 4)
            memopt.Adafactor([p]).step()
            memopt.Lomo([p]).step()
        lines = [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)]
        assert len(lines) == 1 and "no C++ compiler" in lines[0], lines
        try:
            memopt.Adafactor([p], fused=True).step()
        except kernels.KernelUnavailable as exc:
            assert "fused=False" in str(exc)
        else:
            raise AssertionError("fused=True ran without kernels")
        print("FALLBACK-OK")
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "FALLBACK-OK" in out.stdout, out.stderr[-2000:]
