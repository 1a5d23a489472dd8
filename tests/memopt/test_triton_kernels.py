"""The Triton kernels (memopt/kernels/triton*.py) against the torch reference path (foreach=False).

Without a GPU they run on CPU tensors under Triton's interpreter. Triton reads
``TRITON_INTERPRET=1`` when it is first imported (its own library, ``tl.zeros``, ``tl.sum``, is
decorated then) and when a kernel is decorated, so tests/conftest.py sets it before anything
imports triton on a machine without CUDA; this module skips with the reason if triton was loaded
without it. With a CUDA device (tools/gpu_check.sh) the same tests run the compiled kernels on CUDA.

Each case runs three steps with an inf injected into the second gradient: that step must leave
every tensor bit for bit unchanged and return ok=False (the caller counts it), and the steps
around it must match the reference to 1e-6 relative. Sizes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e .[gpu])", allow_module_level=True)
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (set it before triton is imported; "
                "tests/conftest.py does)", allow_module_level=True)
pytest.importorskip("triton", exc_type=ImportError)  # a broken install skips too

import memopt  # noqa: E402
from memopt.kernels import triton as kernels  # noqa: E402

if DEVICE == "cpu" and not kernels.interpreted():
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

# A row block's columns in two loads (n=300 > 256), a 3-D stack of matrices with odd sizes, 1-D, 0-d.
SHAPES = [(13, 300), (2, 9, 70), (37,), ()]
# m > ROWS_PER_SPLIT (256): column statistics in two row splits; slow under the interpreter, so
# only where the factored passes differ (Adafactor's and CAME's).
TALL = (300, 5)
# The interpreter computes masked-off and skipped (inf) lanes too, and numpy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
BAD_STEP = 2
TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def gradients(shape, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        g = torch.randn(shape, generator=gen)
        if t == BAD_STEP and g.numel():
            g.view(-1)[g.numel() // 2] = float("inf")
        out.append(g)
    return out


def run_against_reference(opt_cls, opt_kw, shape, state_keys, kernel_call):
    """Step the reference (CPU, foreach=False) and the kernel (DEVICE) on the same gradients.

    ``kernel_call(w, g, state, t)`` runs the kernel with its state dict at 1-based step t (the
    count of applied updates + 1, as the reference keeps it) and returns ok."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(shape))
    w = p.detach().clone().to(DEVICE)
    opt = opt_cls([p], foreach=False, **opt_kw)
    state = None
    applied = 0
    for t, g in enumerate(gradients(shape), start=1):
        p.grad = g.clone()
        opt.step()
        ref = opt.state[p]
        if state is None:  # the kernel's state starts as the reference's did: zeros
            state = {k: torch.zeros_like(ref[k], device=DEVICE) for k in state_keys}
        before = [w.clone()] + [v.clone() for v in state.values()]
        ok = kernel_call(w, g.to(DEVICE), state, applied + 1)
        assert ok.dtype == torch.bool and ok.dim() == 0 and ok.device == w.device
        if t == BAD_STEP:
            assert not bool(ok), "a non-finite gradient must be reported (ok=False)"
            for old, new in zip(before, [w] + list(state.values())):
                assert torch.equal(old, new), "a skipped step changed a tensor"
        else:
            assert bool(ok)
            applied += 1
        assert ref["step"] == applied and ref["nonfinite_skips"] == int(t >= BAD_STEP)
        assert rel_err(w, p) <= TOL, (t, rel_err(w, p))
        for k in state_keys:
            assert rel_err(state[k], ref[k]) <= TOL, (t, k, rel_err(state[k], ref[k]))


def factored_state_keys(shape, beta1):
    keys = ["exp_avg_sq_row", "exp_avg_sq_col"] if len(shape) >= 2 else ["exp_avg_sq"]
    return keys + (["exp_avg"] if beta1 is not None else [])


def factored_kwargs(state):
    return dict(sq_row=state.get("exp_avg_sq_row"), sq_col=state.get("exp_avg_sq_col"), sq=state.get("exp_avg_sq"),
                exp_avg=state.get("exp_avg"))


@pytest.mark.parametrize("shape", SHAPES + [TALL])
@pytest.mark.parametrize("device_scalars", [False, True], ids=["host-scalars", "device-scalars"])
def test_adafactor_relative_step(shape, device_scalars):
    """Adafactor's defaults: b_t = 1 - t^-0.8, relative step min(1e-2, 1/sqrt(t)), scale by RMS(W);
    with device_scalars beta2, 1 - beta2 and the step size are 0-d device tensors (the sync-free
    path's case), checked against the same reference."""

    def call(w, g, state, t):
        omb, rho = t ** -0.8, min(1e-2, 1.0 / math.sqrt(t))
        beta2 = 1.0 - omb
        extra = {}
        if device_scalars:
            tt = torch.full((), float(t), device=DEVICE)
            omb_t = tt.pow(-0.8)
            beta2, rho, extra = 1.0 - omb_t, torch.clamp(tt.rsqrt(), max=1e-2), dict(one_minus_beta2=omb_t)
        rms_w = float(w.double().square().mean().sqrt()) if w.numel() else 0.0
        ok, scale = kernels.factored_step_(
            w, g, beta2=beta2, eps1=1e-30, eps2=1e-3, step_size=rho, clip_threshold=1.0, weight_decay=0.0,
            multiplicative_decay=False, scale_parameter=True, beta1=None, **factored_kwargs(state), **extra)
        assert scale.dim() == 0 and abs(float(scale) - max(1e-3, rms_w)) <= 1e-6 * max(1e-3, rms_w)
        return ok

    run_against_reference(memopt.Adafactor, {}, shape, factored_state_keys(shape, None), call)


@pytest.mark.parametrize("shape", SHAPES)
def test_adafactor_first_moment_and_weight_decay(shape):
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5)

    def call(w, g, state, t):
        return kernels.factored_step_(
            w, g, beta2=1.0 - t ** -0.8, eps1=1e-30, eps2=1e-3, step_size=1e-2, clip_threshold=0.5, weight_decay=0.1,
            multiplicative_decay=False, scale_parameter=True, beta1=0.9, **factored_kwargs(state))[0]

    run_against_reference(memopt.Adafactor, kw, shape, factored_state_keys(shape, 0.9), call)


@pytest.mark.parametrize("shape", SHAPES)
def test_adalomo(shape):
    """AdaLomo: lr * max(eps2, RMS(W)), multiplicative weight decay (lomo_optim's rounding)."""
    kw = dict(lr=1e-2, weight_decay=0.05)

    def call(w, g, state, t):
        return kernels.factored_step_(
            w, g, beta2=1.0 - t ** -0.8, eps1=1e-30, eps2=1e-3, step_size=1e-2, clip_threshold=1.0,
            weight_decay=0.05, multiplicative_decay=True, scale_parameter=True, beta1=None,
            **factored_kwargs(state))[0]

    run_against_reference(memopt.AdaLomo, kw, shape, factored_state_keys(shape, None), call)


@pytest.mark.parametrize("shape", SHAPES + [TALL])
def test_came(shape):
    kw = dict(lr=2e-3, weight_decay=0.1, betas=(0.9, 0.999, 0.9999), clip_threshold=1.0)
    keys = (["exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col"]
            if len(shape) >= 2 else ["exp_avg", "exp_avg_sq"])

    def call(w, g, state, t):
        return kernels.came_step_(
            w, g, exp_avg=state["exp_avg"], sq_row=state.get("exp_avg_sq_row"), sq_col=state.get("exp_avg_sq_col"),
            res_row=state.get("exp_avg_res_row"), res_col=state.get("exp_avg_res_col"), sq=state.get("exp_avg_sq"),
            lr=2e-3, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
            weight_decay=0.1)

    run_against_reference(memopt.CAME, kw, shape, keys, call)


@pytest.mark.parametrize("shape", [(13, 300), (3000,), ()])
def test_lomo(shape):
    def call(w, g, state, t):
        return kernels.lomo_step_(w, g, lr=1e-2, weight_decay=0.1)

    run_against_reference(memopt.Lomo, dict(lr=1e-2, weight_decay=0.1), shape, [], call)


def test_empty_parameter_is_a_no_op():
    w = torch.empty(0, 4, device=DEVICE)
    ok, scale = kernels.factored_step_(w, w.clone(), sq_row=torch.empty(0, device=DEVICE),
                                       sq_col=torch.zeros(4, device=DEVICE), beta2=0.5, eps1=1e-30, eps2=1e-3,
                                       step_size=1e-2, clip_threshold=1.0)
    assert bool(ok) and float(scale) == pytest.approx(1e-3)
    assert bool(kernels.lomo_step_(w, w.clone(), lr=1.0))


def test_bad_operands_get_one_line_errors():
    w = torch.zeros(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernels.lomo_step_(w.t(), w.t(), lr=1.0)
    with pytest.raises(ValueError, match="needs sq_row and sq_col"):
        kernels.factored_step_(w, w.clone(), beta2=0.5, eps1=1e-30, eps2=1e-3, step_size=1e-2, clip_threshold=1.0)
    with pytest.raises(ValueError, match="exp_avg exactly when beta1"):
        kernels.factored_step_(w, w.clone(), sq_row=torch.zeros(4, device=DEVICE), sq_col=torch.zeros(5, device=DEVICE),
                               beta2=0.5, eps1=1e-30, eps2=1e-3, step_size=1e-2, clip_threshold=1.0, beta1=0.9)


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is only observable on a CUDA device")
def test_no_host_sync_on_cuda():
    w = torch.randn(64, 96, device="cuda")
    g = torch.randn_like(w)
    r, c = torch.zeros(64, device="cuda"), torch.zeros(96, device="cuda")
    t = torch.full((), 3.0, device="cuda")

    def steps():
        omb = t.pow(-0.8)
        kernels.factored_step_(w, g, sq_row=r, sq_col=c, beta2=1.0 - omb, one_minus_beta2=omb, eps1=1e-30,
                               eps2=1e-3, step_size=t.rsqrt(), clip_threshold=1.0)
        kernels.came_step_(w, g, exp_avg=torch.zeros_like(w), sq_row=r, sq_col=c, res_row=r.clone(),
                           res_col=c.clone(), lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30,
                           eps2=1e-16, clip_threshold=1.0, weight_decay=0.1)
        kernels.lomo_step_(w, g, lr=1e-3, weight_decay=0.1)

    steps()  # the first call compiles the kernels of exactly these argument kinds
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")


FUSED_CASES = {
    "adafactor": (memopt.Adafactor, dict(beta1=0.9, weight_decay=0.1)),
    "adalomo": (memopt.AdaLomo, dict(lr=1e-2, weight_decay=0.05)),
    "came": (memopt.CAME, dict(lr=2e-3, weight_decay=0.1)),
    "lomo": (memopt.Lomo, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.mark.skipif(DEVICE != "cuda", reason="fused=True dispatches to the Triton kernels for CUDA tensors")
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_true_on_cuda_matches_the_cpu_reference(case):
    """The optimizers' fused=True on CUDA runs these kernels (memopt.kernels dispatch) and gives
    the reference path's parameters and skip counts (an inf gradient at step 2)."""
    from memopt import kernels as dispatch

    assert dispatch.backend("cuda") is kernels
    cls, kw = FUSED_CASES[case]
    shapes = [(13, 300), (2, 9, 70), (37,)]
    gen = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    new = [torch.nn.Parameter(p.detach().to("cuda")) for p in ref]
    ref_opt = cls(ref, foreach=False, **kw)
    new_opt = cls(new, fused=True, **kw)
    for t in range(1, 6):
        for p, q in zip(ref, new):
            g = torch.randn(p.shape, generator=gen)
            if t == BAD_STEP and p.dim() == 2:
                g[0, 0] = float("nan")
            p.grad, q.grad = g, g.to("cuda")
        ref_opt.step()
        new_opt.step()
    for p, q in zip(ref, new):
        assert rel_err(q, p) <= 1e-5, (case, tuple(p.shape), rel_err(q, p))
    assert new_opt.nonfinite_skips == ref_opt.nonfinite_skips == 1
