"""Behaviour every memopt optimizer promises: checkpoints, schedulers, low precision, registry,
non-finite gradients."""
from __future__ import annotations

import io

import pytest
import torch

import memopt
from memopt import NonFiniteGradientError, create_optimizer
from optim_helpers import SHAPES, clone_params, make_grads, make_params, run_steps

HPARAMS = {
    "adafactor": dict(),
    "came": dict(lr=1e-3),
    "adalomo": dict(lr=1e-2),
    "lomo": dict(lr=1e-2),
    "adapprox": dict(lr=1e-2),
}
NAMES = sorted(HPARAMS)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_identical_to_never_stopping(name):
    params = make_params(0)
    grads = make_grads(10, 3)
    straight = clone_params(params)
    run_steps(create_optimizer(name, straight, **HPARAMS[name]), straight, grads)

    first = clone_params(params)
    opt = create_optimizer(name, first, **HPARAMS[name])
    run_steps(opt, first, grads[:5])
    saved = _roundtrip(opt.state_dict())
    resumed = [p.detach().clone().requires_grad_(True) for p in first]
    opt2 = create_optimizer(name, resumed, **HPARAMS[name])
    opt2.load_state_dict(saved)
    run_steps(opt2, resumed, grads[5:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    # ...and the state was really needed: a fresh optimizer (lost state) ends elsewhere,
    # except for LOMO, which has no state beyond a counter.
    if name != "lomo":
        lost = [p.detach().clone().requires_grad_(True) for p in first]
        run_steps(create_optimizer(name, lost, **HPARAMS[name]), lost, grads[5:])
        assert any(not torch.equal(a, b) for a, b in zip(lost, straight))


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_the_update(name):
    if name == "adafactor":
        hp = dict(lr=1e-2, relative_step=False)
    else:
        hp = HPARAMS[name]
    params = clone_params(make_params(0))
    before = [p.detach().clone() for p in params]
    opt = create_optimizer(name, params, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step == 0 else 1.0)
    run_steps(opt, params, make_grads(1))  # lr multiplier 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    sched.step()
    assert opt.param_groups[0]["lr"] == hp["lr"]
    run_steps(opt, params, make_grads(1, 9))
    assert all(not torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_math(name, dtype):
    low = clone_params(make_params(0, dtype=dtype))
    ref = [p.detach().float().requires_grad_(True) for p in low]
    grads = make_grads(1, 4)
    opt = create_optimizer(name, low, **HPARAMS[name])
    run_steps(opt, low, [[g.to(dtype) for g in grads[0]]])
    run_steps(create_optimizer(name, ref, **HPARAMS[name]), ref, [[g.to(dtype).float() for g in grads[0]]])
    for a, b in zip(low, ref):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))  # the fp32 result, rounded once
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_is_skipped_and_counted(name):
    params = clone_params(make_params(0))
    opt = create_optimizer(name, params, **HPARAMS[name])
    run_steps(opt, params, make_grads(2, 5))
    before = [p.detach().clone() for p in params]
    state_before = _roundtrip(opt.state_dict())
    bad = make_grads(1, 6)
    bad[0][1][3, 4] = float("nan")
    bad[0][4][0, 0, 0] = float("inf")
    run_steps(opt, params, bad)
    p_nan, p_inf = params[1], params[4]
    assert torch.equal(p_nan, before[1]) and torch.equal(p_inf, before[4])
    assert not torch.equal(params[2], before[2])  # the healthy ones moved
    for idx in (1, 4):
        st, st0 = opt.state_dict()["state"][idx], state_before["state"][idx]
        assert st["nonfinite_skips"] == 1 and st["step"] == st0["step"] == 2
        for k, v in st0.items():
            if torch.is_tensor(v):
                assert torch.equal(st[k], v), k
                assert torch.isfinite(st[k]).all(), k
    assert opt.nonfinite_skips == 2
    run_steps(opt, params, make_grads(1, 7))  # and training goes on
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_can_raise(name):
    params = clone_params(make_params(0))
    opt = create_optimizer(name, params, on_nonfinite="raise", **HPARAMS[name])
    bad = make_grads(1)
    bad[0][2][0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        run_steps(opt, params, bad)


def test_registry_builds_every_optimizer():
    p = [torch.nn.Parameter(torch.randn(4, 3))]
    expected = {
        "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adafactor": memopt.Adafactor,
        "came": memopt.CAME, "lomo": memopt.Lomo, "adalomo": memopt.AdaLomo, "adapprox": memopt.Adapprox,
    }
    assert set(memopt.OPTIMIZERS) == set(expected)
    for name, cls in expected.items():
        hp = {"lr": 1e-3} if name in ("sgd", "came") else {}
        assert type(create_optimizer(name, p, **hp)) is cls
    assert type(create_optimizer("AdamW", p)) is torch.optim.AdamW  # case-insensitive


def test_registry_rejects_unknown_names_with_the_choices():
    p = [torch.nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match=r"unknown optimizer 'adafacter'.*did you mean 'adafactor'.*valid choices: adafactor, adalomo, adamw, adapprox, came, lomo, sgd"):
        create_optimizer("adafacter", p)
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'betas1' for optimizer 'came'.*valid: lr, eps"):
        create_optimizer("came", p, lr=1e-3, betas1=0.9)


@pytest.mark.parametrize(
    "name, hp, message",
    [
        ("adafactor", dict(lr=1e-3), "relative_step"),
        ("adafactor", dict(relative_step=False), "needs an lr"),
        ("adafactor", dict(warmup_init=True, relative_step=False, lr=1e-3), "warmup_init"),
        ("came", dict(), "lr is required"),
        ("came", dict(lr=1e-3, betas=(0.9, 0.999)), "betas"),
        ("adalomo", dict(lr=-1.0), "lr must be a positive"),
        ("adalomo", dict(decay_rate=0.8), "decay_rate must be negative"),
        ("lomo", dict(clip_grad_norm=0.0), "clip_grad_norm"),
        ("adalomo", dict(on_nonfinite="ignore"), "on_nonfinite"),
    ],
)
def test_invalid_hyperparameters_fail_clearly(name, hp, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer(name, [torch.nn.Parameter(torch.randn(3, 3))], **hp)


def test_step_counts_optimizer_steps_not_micro_batches():
    model = torch.nn.Linear(4, 3)
    opt = memopt.AdaLomo(model.parameters(), lr=1e-3)
    for _ in range(3):  # three micro-batches accumulated, one step
        model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert all(s["step"] == 1 for s in opt.state.values())


def test_state_is_kept_per_shape_as_promised():
    params = clone_params(make_params(0))
    opt = memopt.Adafactor(params)
    run_steps(opt, params, make_grads(1))
    expected = sum(
        4 * (s[0] if len(s) == 1 else (torch.Size(s[:-1]).numel() + torch.Size(s[:-2] + s[-1:]).numel()))
        for s in SHAPES
    )
    assert opt.state_bytes() == expected


@pytest.mark.parametrize("name", NAMES)
def test_resume_keeps_fp32_state_for_bf16_params_and_current_hyperparameters(name):
    params = clone_params(make_params(0, dtype=torch.bfloat16))
    opt = create_optimizer(name, params, **HPARAMS[name])
    run_steps(opt, params, [[g.bfloat16() for g in step] for step in make_grads(2, 5)])
    saved = _roundtrip(opt.state_dict())
    fresh = create_optimizer(name, params, **HPARAMS[name])
    fresh.load_state_dict(saved)
    for state in fresh.state.values():
        for key, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and key != "step":
                assert v.dtype == torch.float32, key
    # update_param without an explicit group uses the loaded group's hyperparameters
    fresh.param_groups[0]["lr"] = 0.0
    before = params[1].detach().clone()
    fresh.update_param(params[1], make_grads(1, 8)[0][1].bfloat16())
    if name != "adafactor":  # Adafactor's default relative step ignores lr
        assert torch.equal(params[1], before)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", ["adafactor", "came", "adalomo", "lomo", "adapprox"])
def test_an_empty_parameter_steps_without_error(name, foreach):
    """Empty tensors (0 rows, 0 columns, an empty stack, an empty vector) are stepped (their step
    counts) and change nothing; the other parameters update as usual."""
    import memopt

    shapes = [(0,), (0, 5), (5, 0), (2, 0, 3)]
    empty = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    full = torch.nn.Parameter(torch.ones(3, 4))
    opt = memopt.create_optimizer(name, [*empty, full], foreach=foreach, fused=False,
                                  **({"lr": 1e-3} if name == "came" else {}))
    for _ in range(2):
        for p in [*empty, full]:
            p.grad = torch.full(p.shape, 0.5)
        opt.step()
    assert [int(opt.state[p]["step"]) for p in empty] == [2] * len(shapes)
    assert not torch.equal(full.detach(), torch.ones(3, 4))
