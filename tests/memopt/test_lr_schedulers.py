"""Every memopt optimizer with every torch LR scheduler at its defaults: it steps, or the
scheduler's construction fails with one line that names the argument to change."""
import pytest
import torch
from torch.optim import lr_scheduler as sched

from memopt.registry import OPTIMIZERS

SCHEDULERS = {
    "StepLR": lambda o: sched.StepLR(o, step_size=1),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[1]),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=3),
    "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=1e-4, max_lr=1e-3),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=1e-3, total_steps=5),
    "LinearLR": lambda o: sched.LinearLR(o),
    "ConstantLR": lambda o: sched.ConstantLR(o),
    "PolynomialLR": lambda o: sched.PolynomialLR(o),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=2),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o),
    "LambdaLR": lambda o: sched.LambdaLR(o, lambda epoch: 0.5**epoch),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda epoch: 0.5),
}
CYCLING = ("CyclicLR", "OneCycleLR")
MEMOPT = sorted(n for n, cls in OPTIMIZERS.items() if not cls.__module__.startswith("torch."))
# Constructor arguments beyond the defaults: CAME has no default lr.
EXTRA = {"came": {"lr": 1e-3}}
# Optimizers whose groups hold momentum/betas for a cycling scheduler to cycle.
HAS_BETAS = {"came", "adapprox"}

# (optimizer, hparams, id): the defaults, plus Adafactor with an external lr.
CASES = [(n, EXTRA.get(n, {}), n) for n in MEMOPT] + [
    ("adafactor", {"relative_step": False, "lr": 1e-3}, "adafactor-lr"),
]


def _expected_error(case_id: str, name: str, sched_name: str):
    """None where the combination must work, else a pattern its one-line message must match."""
    if sched_name in CYCLING and name not in HAS_BETAS:
        return r"`cycle_momentum`"  # torch's own message, which already says so
    if case_id == "adafactor" and sched_name != "ReduceLROnPlateau":
        return r"relative_step=False, lr=\.\.\."
    return None


def _run(opt, model, make_sched, sched_name):
    s = make_sched(opt)
    for _ in range(3):
        model(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if sched_name == "ReduceLROnPlateau":
            s.step(1.0)
        else:
            s.step()
    return s


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("name,hparams,case_id", CASES, ids=[c[2] for c in CASES])
def test_scheduler_steps_or_names_the_argument(name, hparams, case_id, sched_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = OPTIMIZERS[name](model.parameters(), **hparams)
    before = [p.detach().clone() for p in model.parameters()]
    expected = _expected_error(case_id, name, sched_name)
    if expected is None:
        s = _run(opt, model, SCHEDULERS[sched_name], sched_name)
        lr = s.get_last_lr()[0]
        if case_id == "adafactor":
            # ReduceLROnPlateau only reads lr when it reduces it; until then the relative step runs.
            assert lr is None
        else:
            assert isinstance(lr, float) and lr >= 0  # CosineAnnealingLR(T_max=3) ends at 0
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        if sched_name in CYCLING:
            # The cycled momentum is the first beta; CAME's third one survives.
            betas = opt.param_groups[0]["betas"]
            assert len(betas) == len(opt.defaults["betas"]) and betas[0] != opt.defaults["betas"][0]
        return
    with pytest.raises(ValueError, match=expected) as err:
        _run(opt, model, SCHEDULERS[sched_name], sched_name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", [n for n in MEMOPT if n not in HAS_BETAS])
@pytest.mark.parametrize("sched_name", CYCLING)
def test_cycling_without_momentum_works(name, sched_name):
    """The change the error asks for (cycle_momentum=False) is enough."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    hparams = {"relative_step": False, "lr": 1e-3} if name == "adafactor" else {}
    opt = OPTIMIZERS[name](model.parameters(), **hparams)
    make = {
        "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=1e-4, max_lr=1e-3, cycle_momentum=False),
        "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=1e-3, total_steps=5, cycle_momentum=False),
    }[sched_name]
    s = _run(opt, model, make, sched_name)
    assert s.get_last_lr()[0] > 0
