"""``fused=True`` on a sync-free kernel backend (Triton; memopt/fused_path.py) makes no host sync.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, with the Triton
backend put in place of the C++ one for CPU tensors (the ``triton_for_cpu`` fixture); on a CUDA
machine the same tests run on CUDA, where the backend is Triton anyway. Each optimizer with
kernels (Adafactor, AdaLomo, CAME, LOMO) is checked in ``step()`` and, for LOMO/AdaLomo, in
``fused_backward``: 0 ``aten._local_scalar_dense`` (what .item(), float(), bool() call; counted
by test_foreach's ``CountOps``) after a warm-up step, and the reference path's results
(foreach=False, fused=False) within 1e-6 relative after 3 steps, the second holding an inf
gradient that must be skipped and counted on the device. Tiny shapes: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

# Its module-level checks skip this module too where the kernels cannot run (no triton; no CUDA
# and no interpreter; triton imported before TRITON_INTERPRET=1 was set).
from test_triton_kernels import DEVICE, rel_err

import memopt
from memopt import kernels
from memopt.kernels import triton as triton_backend
from test_foreach import CountOps

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# 2-D, a 3-D stack, 1-D, 0-d and an empty parameter (its step counts, nothing else happens).
SHAPES = [(5, 7), (2, 3, 4), (6,), (), (0, 3)]
BAD = (2, 0)  # (1-based step, parameter) whose gradient holds an inf
STEPS = 3
TOL = 1e-6

CASES = {
    "adafactor": (memopt.Adafactor, dict()),  # relative step, b_t = 1 - t^-0.8: device scalars
    "adafactor_b1_wd_warmup": (memopt.Adafactor, dict(beta1=0.9, weight_decay=0.1, warmup_init=True)),
    "adalomo": (memopt.AdaLomo, dict(lr=1e-2, weight_decay=0.05)),
    "came": (memopt.CAME, dict(lr=2e-3, weight_decay=0.1)),
    "lomo": (memopt.Lomo, dict(lr=1e-2, weight_decay=0.1)),
}


@pytest.fixture(autouse=True)
def triton_for_cpu(monkeypatch):
    """CPU tensors get the Triton backend (interpreted) instead of the C++ one."""
    if DEVICE == "cpu":
        cuda_or_other = kernels.backend
        monkeypatch.setattr(kernels, "backend",
                            lambda device: triton_backend if torch.device(device).type == "cpu" else cuda_or_other(device))
    assert kernels.backend(DEVICE) is triton_backend and kernels.sync_free(DEVICE)


def gradients(step: int, shapes=SHAPES, inject=True):
    gen = torch.Generator().manual_seed(100 + step)
    gs = [torch.randn(s, generator=gen) for s in shapes]
    if inject and step == BAD[0]:
        gs[BAD[1]].view(-1)[3] = float("inf")
    return gs


def pair(shapes=SHAPES, dtype=torch.float32):
    """(reference params on CPU, copies on DEVICE: never the same memory, also on CPU)."""
    gen = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    return ref, [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in ref]


def assert_matches(ref_opt, ref, new_opt, new):
    for p, q in zip(ref, new):
        assert rel_err(q, p) <= TOL, (tuple(p.shape), rel_err(q, p))
        s_ref, s_new = ref_opt.state[p], new_opt.state[q]
        assert torch.is_tensor(s_new["step"]) and s_new["step"].device == q.device
        assert int(s_new["step"]) == s_ref["step"] and int(s_new["nonfinite_skips"]) == s_ref["nonfinite_skips"]
        for key, v in s_ref.items():
            if torch.is_tensor(v):
                assert rel_err(s_new[key], v) <= TOL, (tuple(p.shape), key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_is_sync_free_and_matches_the_reference(case):
    cls, kw = CASES[case]
    ref, new = pair()
    ref_opt = cls(ref, foreach=False, fused=False, **kw)
    new_opt = cls(new, fused=True, **kw)
    for step in range(1, STEPS + 1):
        for p, q, g in zip(ref, new, gradients(step)):
            p.grad, q.grad = g, g.to(DEVICE, copy=True)
        ref_opt.step()
        with CountOps() as c:
            new_opt.step()
        if step > 1:  # the first step creates the states and the device counters
            assert c.syncs == 0, (step, c.syncs)
        if step == BAD[0]:
            assert new_opt.nonfinite_skips == 1  # counted on the device, read here
    assert ref_opt.nonfinite_skips == 1 and ref_opt.state[ref[BAD[1]]]["step"] == STEPS - 1
    assert_matches(ref_opt, ref, new_opt, new)
    if cls is memopt.Adafactor:
        # The step size AdafactorSchedule reports (of the first parameter: the skipped one), from
        # the scale noted on the device.
        from transformers.optimization import AdafactorSchedule

        (lr_new,), (lr_ref,) = AdafactorSchedule(new_opt).get_lr(), AdafactorSchedule(ref_opt).get_lr()
        assert torch.is_tensor(lr_new) and rel_err(lr_new, torch.tensor(lr_ref)) <= TOL


class _Model(torch.nn.Module):
    """loss = sum_i (tanh(p_i) * c_i): dL/dp_i = c_i * (1 - tanh(p_i)^2), inf where c_i is."""

    def __init__(self, params):
        super().__init__()
        self.ps = torch.nn.ParameterList(params)

    def forward(self, step):
        cs = [c.to(p.device) for p, c in zip(self.ps, gradients(step))]
        return sum((torch.tanh(p.float()) * c).sum() for p, c in zip(self.ps, cs))


@pytest.mark.parametrize("cls, kw", [
    (memopt.AdaLomo, dict(lr=1e-2)), (memopt.AdaLomo, dict(lr=1e-2, clip_grad_norm=0.5)),
    (memopt.Lomo, dict(lr=1e-2, weight_decay=0.1)), (memopt.Lomo, dict(lr=1e-2, clip_grad_norm=0.5)),
], ids=["adalomo", "adalomo_clip", "lomo", "lomo_clip"])
def test_fused_backward_is_sync_free_and_matches_the_reference(cls, kw):
    ref, new = pair()
    models = {"ref": _Model(ref), "new": _Model(new)}
    opts = {"ref": cls(ref, foreach=False, fused=False, **kw), "new": cls(new, fused=True, **kw)}
    for step in range(1, STEPS + 1):
        opts["ref"].fused_backward(models["ref"](step))
        with CountOps() as c:
            opts["new"].fused_backward(models["new"](step))
        if step > 1:
            assert c.syncs == 0, (step, c.syncs)
        if step == BAD[0]:
            # With the global-norm clip the inf makes the coefficient 0: the other gradients
            # become zeros (applied), the inf one nan (skipped), on both paths.
            assert opts["new"].nonfinite_skips == 1
    assert opts["ref"].nonfinite_skips == 1
    assert_matches(opts["ref"], ref, opts["new"], new)


@pytest.mark.parametrize("stochastic_rounding", [False, True], ids=["nearest", "stochastic"])
def test_bf16_weights_are_written_back_as_on_the_reference(stochastic_rounding):
    """bf16 parameters: the fp32 work copy is rounded back (stochastically: keyed by the device
    step, which must be the reference's host step)."""
    kw = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=stochastic_rounding)
    ref, new = pair(dtype=torch.bfloat16)
    ref_opt = memopt.AdaLomo(ref, foreach=False, fused=False, **kw)
    new_opt = memopt.AdaLomo(new, fused=True, **kw)
    for step in range(1, STEPS + 1):
        for p, q, g in zip(ref, new, gradients(step)):
            p.grad, q.grad = g.bfloat16(), g.to(DEVICE, torch.bfloat16, copy=True)
        ref_opt.step()
        with CountOps() as c:
            new_opt.step()
        assert step == 1 or c.syncs == 0
    differ = 0
    for p, q in zip(ref, new):
        # The fp32 updates agree to 1e-6; rounding may then fall on the other side of a tie.
        x, y = q.detach().cpu().float(), p.detach().float()
        assert q.dtype == torch.bfloat16 and bool(((x - y).abs() <= y.abs() * 2.0**-7 * 1.01).all())
        differ += int((x != y).sum())
    # Such ties are rare (none under the interpreter); random bits of another step than the
    # reference's would round ~40% of these 66 elements the other way.
    assert differ <= 2, differ
    assert new_opt.nonfinite_skips == ref_opt.nonfinite_skips == 1


def test_fp16_overflow_is_gated_on_the_device_and_counts_no_skip():
    """fp16 loss scaling (test_foreach's scaler test) on this path: an overflow masks every update
    off through the device gate; it is the scaler's business, not a non-finite skip."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16, device=DEVICE))
    opt = memopt.Lomo([p], lr=1e-3, loss_scale=2.0**16, loss_scale_growth_interval=2, fused=True)
    coeff = torch.full((4,), 10.0, dtype=torch.float16, device=DEVICE)

    def run():
        with CountOps() as c:
            applied = opt.fused_backward((p * coeff).sum())
        assert c.syncs == 0 and torch.is_tensor(applied)
        return bool(applied)

    assert [run() for _ in range(4)] == [False] * 4 and torch.equal(p, torch.ones_like(p))
    assert opt.loss_scaler.scale == 2.0**12 and opt.nonfinite_skips == 0 and int(opt.state[p]["step"]) == 0
    assert run() is True
    assert torch.equal(p, (torch.ones(4, device=DEVICE) - 1e-3 * 10).half())
    assert int(opt.state[p]["step"]) == 1 and opt.nonfinite_skips == 0


def test_raise_policy_raises_and_changes_nothing():
    p = torch.nn.Parameter(torch.zeros(4, 4, device=DEVICE))
    opt = memopt.Adafactor([p], fused=True, on_nonfinite="raise")
    p.grad = torch.full((4, 4), float("nan"), device=DEVICE)
    with pytest.raises(memopt.NonFiniteGradientError, match="shape \\(4, 4\\) at step 1"):
        opt.step()
    assert int(opt.state[p]["nonfinite_skips"]) == 1 and int(opt.state[p]["step"]) == 0
    assert torch.equal(p, torch.zeros(4, 4, device=DEVICE))


def test_checkpoint_moves_between_this_path_and_the_reference():
    """A state dict of this path (device counters) resumes on the reference path, and back."""
    cls, kw = CASES["adafactor_b1_wd_warmup"]
    ref, new = pair()
    ref_opt = cls(ref, foreach=False, fused=False, **kw)
    new_opt = cls(new, fused=True, **kw)
    for step in range(1, STEPS + 1):
        if step == 2:  # swap the optimizers' paths through their checkpoints
            sd_new, sd_ref = new_opt.state_dict(), ref_opt.state_dict()
            cpu_new = [torch.nn.Parameter(q.detach().to("cpu", copy=True)) for q in new]
            dev_ref = [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in ref]
            ref_opt, new_opt = cls(cpu_new, foreach=False, fused=False, **kw), cls(dev_ref, fused=True, **kw)
            ref_opt.load_state_dict(sd_new)
            new_opt.load_state_dict(sd_ref)
            # A loaded state dict brings its groups' flags (as in torch): set the paths again.
            ref_opt.param_groups[0]["fused"], new_opt.param_groups[0]["fused"] = False, True
            ref, new = cpu_new, dev_ref
        for p, q, g in zip(ref, new, gradients(step, inject=False)):
            p.grad, q.grad = g, g.to(DEVICE, copy=True)
        ref_opt.step()
        new_opt.step()
    # Both have run steps 1 on one path and 2-3 on the other: they must agree.
    assert max(rel_err(q, p) for p, q in zip(ref, new)) <= TOL
    assert all(int(new_opt.state[q]["step"]) == int(ref_opt.state[p]["step"]) == STEPS for p, q in zip(ref, new))


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is only observable on a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_step_is_sync_free_by_torch_sync_debug_mode(case):
    cls, kw = CASES[case]
    _, new = pair()
    opt = cls(new, fused=True, **kw)
    for step in range(1, STEPS + 1):
        for q, g in zip(new, gradients(step)):
            q.grad = g.to(DEVICE, copy=True)
        if step == 1:
            opt.step()  # compiles the kernels, creates the states
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert opt.nonfinite_skips == 1
