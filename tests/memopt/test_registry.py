"""memopt.registry: names and hyperparameters are checked at the edge, with the valid choices.

(test_optim_behaviour.py checks that every name builds its class and the two error messages'
beginnings; this file checks the hyperparameter lists themselves.)
"""
import inspect

import pytest
import torch

import memopt
from memopt.registry import FUSED_BACKWARD, OPTIMIZERS, create_optimizer, optimizer_class, optimizer_hparams


def _params():
    return [torch.nn.Parameter(torch.randn(3, 4))]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hparams_are_the_constructor_arguments_after_params(name):
    cls = optimizer_class(name)
    assert isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    signature = list(inspect.signature(cls.__init__).parameters)
    assert signature[:2] == ["self", "params"]
    assert optimizer_hparams(name) == signature[2:]


def test_hparams_of_the_memopt_optimizers():
    assert optimizer_hparams("adafactor") == [
        "lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
        "relative_step", "warmup_init", "on_nonfinite", "foreach", "fused",
    ]
    assert optimizer_hparams("came") == ["lr", "eps", "clip_threshold", "betas", "weight_decay", "on_nonfinite", "foreach", "fused"]
    assert optimizer_hparams("lomo") == [
        "lr", "weight_decay", "clip_grad_norm", "clip_grad_value", "loss_scale", "loss_scale_growth_interval",
        "on_nonfinite", "foreach", "fused", "stochastic_rounding", "rounding_seed", "heap_trim_every",
    ]
    assert optimizer_hparams("adalomo") == [
        "lr", "eps", "clip_threshold", "decay_rate", "weight_decay", "clip_grad_norm", "clip_grad_value",
        "loss_scale", "loss_scale_growth_interval", "on_nonfinite", "foreach", "fused", "stochastic_rounding",
        "rounding_seed", "heap_trim_every",
    ]
    adapprox = optimizer_hparams("adapprox")
    assert {"lr", "betas", "k_max", "k_min", "xi", "seed", "on_nonfinite"} <= set(adapprox)
    assert "params" not in adapprox and "self" not in adapprox


def test_names_are_case_insensitive_everywhere():
    assert optimizer_class("CAME") is memopt.CAME
    assert optimizer_hparams("AdaFactor") == optimizer_hparams("adafactor")
    assert type(create_optimizer("ADAPPROX", _params())) is memopt.Adapprox


def test_unknown_name_lists_every_valid_name():
    for call in (lambda: optimizer_class("rmsprop"), lambda: optimizer_hparams("rmsprop"),
                 lambda: create_optimizer("rmsprop", _params())):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "unknown optimizer 'rmsprop'" in message
        assert "did you mean" not in message  # nothing close: no guess
        assert message.endswith("valid choices: " + ", ".join(sorted(OPTIMIZERS)))


@pytest.mark.parametrize("name", ["adafactor", "came", "lomo", "adalomo", "adapprox", "adamw", "sgd"])
def test_unknown_hparam_lists_every_valid_hparam(name):
    with pytest.raises(ValueError) as err:
        create_optimizer(name, _params(), not_a_hparam=1)
    message = str(err.value)
    assert f"unknown hyperparameter 'not_a_hparam' for optimizer {name!r}" in message
    assert message.endswith("valid: " + ", ".join(optimizer_hparams(name)))


def test_unknown_hparam_suggests_the_closest_one():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'k_maxx' for optimizer 'adapprox' \(did you mean 'k_max'\?\)"):
        create_optimizer("adapprox", _params(), k_maxx=4)
    with pytest.raises(ValueError, match=r"did you mean 'weight_decay'"):
        create_optimizer("lomo", _params(), wieght_decay=0.1)


def test_hparams_reach_the_optimizer_and_its_groups():
    opt = create_optimizer("adalomo", _params(), lr=0.25, clip_grad_norm=2.0, weight_decay=0.1)
    assert opt.clip_grad_norm == 2.0
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["weight_decay"] == 0.1
    groups = [{"params": _params(), "lr": 0.5}, {"params": _params()}]
    opt = create_optimizer("came", groups, lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 1e-3]


def test_invalid_hparam_values_are_the_optimizers_errors():
    # Known names with bad values pass the registry and are refused by the optimizer itself.
    with pytest.raises(ValueError, match="k_min .* must be <= k_max"):
        create_optimizer("adapprox", _params(), k_min=8, k_max=4)


def test_fused_backward_names_are_registered_fused_optimizers():
    assert FUSED_BACKWARD <= set(OPTIMIZERS)
    for name in FUSED_BACKWARD:
        assert hasattr(optimizer_class(name), "fused_backward")
