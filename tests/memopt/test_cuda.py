"""The CUDA subset (run by tools/gpu_check.sh; skipped without a CUDA device).

* no host sync in the steady state of step() and fused_backward() on the default (sync-free)
  path, checked by torch itself: torch.cuda.set_sync_debug_mode("error") raises on any
  synchronizing call (Adapprox: at most one warning per step, its rank decisions);
* the default resolves to foreach=True on CUDA, and matches the CPU reference path;
* kernel launches per step (torch.profiler) the same for a 12-layer and a 24-layer GPT.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import memopt
from optim_helpers import max_rel_diff
from test_foreach import BAD, CONFIGS, SHAPES, _gpt_shapes, _grads, _params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = torch.device("cuda")


def _cuda_params(dtype=torch.float32):
    return [p.detach().to(DEV).requires_grad_(True) for p in _params(dtype)]


class _SyncCheck:
    """``error`` mode (every sync raises), or ``warn`` mode that counts the syncs."""

    def __init__(self, mode):
        self.mode, self.count = mode, 0

    def __enter__(self):
        torch.cuda.synchronize()
        self._rec = warnings.catch_warnings(record=True)
        self._log = self._rec.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(self.mode)
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._rec.__exit__(*exc)
        self.count = sum("synchroniz" in str(w.message) for w in self._log)
        return False


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_cuda_step_is_sync_free(case):
    name, hp = CONFIGS[case]
    params = _cuda_params()
    opt = memopt.create_optimizer(name, params, **hp)  # foreach=None: the sync-free path on CUDA
    assert memopt.base.resolve_foreach(opt.param_groups[0], DEV)
    for step in range(6):
        for p, g in zip(params, _grads(step)):
            p.grad = g.to(DEV)
        if step < 2:
            opt.step()  # warm-up: states and counters are created
            continue
        if name == "adapprox":
            with _SyncCheck("warn") as check:
                opt.step()
            assert check.count <= 1, check.count
        else:
            with _SyncCheck("error"):
                opt.step()
    assert opt.nonfinite_skips == 1


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_cuda_matches_the_cpu_reference(case):
    name, hp = CONFIGS[case]
    ref = _params(torch.float32)
    new = _cuda_params()
    ref_opt = memopt.create_optimizer(name, ref, foreach=False, **hp)
    new_opt = memopt.create_optimizer(name, new, **hp)
    for step in range(20):
        for p, q, g in zip(ref, new, _grads(step)):
            p.grad, q.grad = g, g.to(DEV)
        ref_opt.step()
        new_opt.step()
    # GPU kernels round differently from the CPU ones (reductions in another order).
    tol = 1e-4 if name == "adapprox" else 1e-5
    assert max_rel_diff([p.cpu() for p in new], ref) <= tol
    assert int(new_opt.state[new[BAD[1]]]["nonfinite_skips"]) == ref_opt.state[ref[BAD[1]]]["nonfinite_skips"] == 1


class _Net(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=DEV, dtype=dtype)) for s in SHAPES])
        self.cs = [g.to(DEV) for g in _grads(0, inject=False)]

    def forward(self):
        return sum((torch.tanh(p.float()) * c).sum() for p, c in zip(self.ps, self.cs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cls, kw", [
    (memopt.AdaLomo, dict(lr=1e-2)), (memopt.AdaLomo, dict(lr=1e-2, clip_grad_norm=0.5)),
    (memopt.Lomo, dict(lr=1e-2, weight_decay=0.1)), (memopt.Lomo, dict(lr=1e-2, clip_grad_norm=0.5)),
])
def test_cuda_fused_backward_is_sync_free(cls, kw, dtype):
    """Sync-free hooks, also with the fp16 dynamic loss scale and global-norm clipping."""
    net = _Net(dtype)
    opt = cls(net.parameters(), **kw)
    for step in range(5):
        loss = net()
        if step < 2:
            opt.fused_backward(loss)
            continue
        with _SyncCheck("error"):
            opt.fused_backward(loss)
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


def _kernels_per_step(name, hp, layers):
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(DEV).requires_grad_(True) for s in _gpt_shapes(layers)]
    opt = memopt.create_optimizer(name, params, **hp)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEV)
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("case", ["adafactor", "adafactor_b1_wd_warmup", "came", "adalomo", "lomo"])
def test_cuda_kernel_launches_do_not_grow_with_depth(case):
    name, hp = CONFIGS[case]
    assert _kernels_per_step(name, hp, 12) == _kernels_per_step(name, hp, 24)
