"""memopt.Adafactor as a drop-in for transformers' Adafactor at its defaults (relative step):
with ``AdafactorSchedule`` and inside ``Trainer``, same losses, parameters and logged lr."""
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.optimization import Adafactor as HFAdafactor  # noqa: E402
from transformers.optimization import AdafactorSchedule  # noqa: E402

import memopt  # noqa: E402

HF_DEFAULTS = dict(scale_parameter=True, relative_step=True, warmup_init=False, lr=None)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp(min=1e-30))


def _close(a, b, tol=1e-6):
    return abs(a - b) <= tol * abs(b)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kw", [{}, {"warmup_init": True}, {"scale_parameter": False}], ids=["default", "warmup", "noscale"])
def test_schedule_reports_transformers_lr(foreach, kw):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [HFAdafactor(models[0].parameters(), **dict(HF_DEFAULTS, **kw)),
            memopt.Adafactor(models[1].parameters(), foreach=foreach, **kw)]
    scheds = [AdafactorSchedule(o) for o in opts]
    for step in range(4):
        x = torch.randn(4, 6)
        for m, o, s in zip(models, opts, scheds):
            m(x).square().mean().backward()
            o.step()
            s.step()
            o.zero_grad()
        hf_lr, mem_lr = (s.get_last_lr()[0] for s in scheds)
        # The sync-free path answers with a device tensor: no host sync inside the scheduler.
        assert torch.is_tensor(mem_lr) == foreach
        assert _close(float(mem_lr), hf_lr), (step, float(mem_lr), hf_lr)
    for a, b in zip(models[1].parameters(), models[0].parameters()):
        assert _rel(a, b) <= 1e-6


def _train(make_opt, with_schedule=True):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(24):
        ids = torch.randint(0, 64, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    # Trainer rounds the logged loss: the hook keeps it exact.
    losses = []
    model.register_forward_hook(lambda m, i, out: losses.append(float(out.loss.detach())))
    opt = make_opt(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=3, report_to=[], use_cpu=True, logging_steps=1,
                                 save_strategy="no")
        trainer = transformers.Trainer(model, args=args, train_dataset=data,
                                       optimizers=(opt, AdafactorSchedule(opt) if with_schedule else None))
        trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    return losses, lrs, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("foreach", [False, True])
def test_trainer_matches_transformers_adafactor(foreach):
    hf_losses, hf_lrs, hf_params = _train(lambda ps: HFAdafactor(ps, **HF_DEFAULTS))
    losses, lrs, params = _train(lambda ps: memopt.Adafactor(ps, foreach=foreach))
    assert len(losses) == len(hf_losses) == 3
    for a, b in zip(losses, hf_losses):
        assert _close(a, b), (losses, hf_losses)
    assert len(lrs) == len(hf_lrs) == 3 and hf_lrs[1] > 0
    for a, b in zip(lrs, hf_lrs):
        assert _close(a, b) or a == b == 0.0, (lrs, hf_lrs)
    for k in hf_params:
        a, b = params[k], hf_params[k]
        if k.endswith("attn.c_attn.bias"):
            # The softmax ignores the key bias (the middle third): its gradient is fp32 round-off,
            # which Adafactor normalizes into a full-size update in either implementation.
            n = b.numel() // 3
            a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
        assert _rel(a, b) <= 1e-6, k


def test_trainer_default_schedule_names_the_fix():
    # transformers' Adafactor fails here with "None * float"; memopt says what to change.
    with pytest.raises(ValueError, match=r"relative_step=False, lr=\.\.\.") as err:
        _train(lambda ps: memopt.Adafactor(ps), with_schedule=False)
    assert "\n" not in str(err.value)
