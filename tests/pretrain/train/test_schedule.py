"""The learning-rate schedule: its shapes, the scheduler that applies it, and its re-application
on resume. Expected values are the closed forms written out here, not calls into the schedule."""
import math

import pytest
import torch

from pretrain.optim import build_scheduler, lr_multiplier
from pretrain.train.schedule import reapply_schedule


def expected(step, total, warmup, decay, floor):
    """Multiplier of the update at 0-based ``step``: (step+1)/warmup while warming up, then
    decay from 1 to ``floor`` over the remaining ``total - warmup`` steps (constant: 1)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    t = min(step - warmup, total - warmup) / (total - warmup)
    if decay == "linear":
        return 1.0 - (1.0 - floor) * t
    return floor + (1.0 - floor) * (1.0 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_is_a_linear_ramp_reaching_the_base_lr(decay):
    got = [lr_multiplier(s, 100, 4, decay, 0.1) for s in range(5)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-12)


def test_cosine_shape():
    # 20 steps, 4 of warm-up: 16 decay steps; at a quarter, half and three quarters of them the
    # cosine is at 1/2 + sqrt(2)/4, 1/2 and 1/2 - sqrt(2)/4 of the way from the floor to 1.
    floor = 0.1
    for step, frac in [(4, 1.0), (8, 0.5 + math.sqrt(2) / 4), (12, 0.5), (16, 0.5 - math.sqrt(2) / 4)]:
        assert lr_multiplier(step, 20, 4, "cosine", floor) == pytest.approx(floor + (1 - floor) * frac, abs=1e-12)
    assert lr_multiplier(12, 20, 4, "cosine", floor) == pytest.approx(0.55, abs=1e-12)
    values = [lr_multiplier(s, 20, 4, "cosine", floor) for s in range(4, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing to the end


def test_linear_shape():
    # Equal steps down: 16 decay steps from 1 to 0.2 lose 0.05 each.
    got = [lr_multiplier(s, 20, 4, "linear", 0.2) for s in range(4, 21)]
    assert got == pytest.approx([1.0 - 0.05 * k for k in range(17)], abs=1e-12)


def test_constant_ignores_the_floor_and_the_end():
    assert [lr_multiplier(s, 10, 2, "constant", 0.1) for s in range(2, 30)] == [1.0] * 28


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_decay_ends_on_the_floor_and_stays_there(decay, floor):
    total = 12
    assert lr_multiplier(total, total, 3, decay, floor) == pytest.approx(floor, abs=1e-12)
    assert lr_multiplier(total - 1, total, 3, decay, floor) > floor
    # A run extended past its schedule (or a last step counted once more) keeps the floor.
    for step in (total + 1, total + 50):
        assert lr_multiplier(step, total, 3, decay, floor) == pytest.approx(floor, abs=1e-12)


def test_no_warmup_starts_at_the_base_lr():
    assert lr_multiplier(0, 10, 0, "cosine", 0.1) == 1.0
    assert lr_multiplier(0, 10, 0, "linear", 0.1) == 1.0


def _sgd(lr, n_groups=1):
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(n_groups)]
    return params, torch.optim.SGD([{"params": [p]} for p in params], lr=lr)


def _train(params, opt, sched, steps):
    """Steps with gradient 1 everywhere; the lr each update used, read off the parameters."""
    used = []
    for _ in range(steps):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        used.append([float((b - p.detach())[0]) for b, p in zip(before, params)])
    return used


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_build_scheduler_drives_the_optimizer_lr(decay):
    base, total, warmup, floor = 0.2, 10, 3, 0.1
    params, opt = _sgd(base, n_groups=2)
    sched = build_scheduler(opt, total, warmup, decay, floor)
    want = [base * expected(s, total, warmup, decay, floor) for s in range(total + 3)]
    # Before any step the groups already carry the first update's lr.
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([want[0]] * 2, rel=1e-12)
    used = _train(params, opt, sched, total + 2)
    for step, lrs in enumerate(used):
        assert lrs == pytest.approx([want[step]] * 2, rel=1e-6), step
    assert sched.get_last_lr() == pytest.approx([want[total + 2]] * 2, rel=1e-12)


def test_reapply_schedule_after_loading_uses_the_new_lr_and_length():
    old_lr, new_lr, warmup, floor, done = 1e-3, 3e-3, 2, 0.1, 5
    params, opt = _sgd(old_lr, n_groups=2)
    sched = build_scheduler(opt, 10, warmup, "cosine", floor)
    _train(params, opt, sched, done)
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    # The resumed run: a longer cosine and a higher base lr.
    params, opt = _sgd(new_lr, n_groups=2)
    sched = build_scheduler(opt, 30, warmup, "cosine", floor)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    stale = old_lr * expected(done, 10, warmup, "cosine", floor)
    assert opt.param_groups[0]["lr"] == pytest.approx(stale, rel=1e-12)  # what loading alone gives

    reapply_schedule(sched, new_lr)
    want = [new_lr * expected(s, 30, warmup, "cosine", floor) for s in range(done, done + 3)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([want[0]] * 2, rel=1e-12)
    assert sched.get_last_lr() == pytest.approx([want[0]] * 2, rel=1e-12)
    assert sched.base_lrs == [new_lr, new_lr]
    used = _train(params, opt, sched, 3)
    for k, lrs in enumerate(used):
        assert lrs == pytest.approx([want[k]] * 2, rel=1e-6), k
