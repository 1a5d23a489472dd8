"""train.precision: bf16 = bf16 compute over fp32 masters on every engine; bf16_pure = bf16
weights (lomo/adalomo), optionally with stochastic rounding; the combinations that do not fit
are refused with one line."""
from __future__ import annotations

import pytest
import torch

from test_training import _cfg, _losses, _torchrun


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=bf16_pure", "optimizer.name=adamw"],
     "config key 'train.precision': bf16_pure (bf16 weights, no fp32 masters) is for lomo/adalomo; with "
     "optimizer.name=adamw use train.precision=bf16 (bf16 compute, fp32 masters)"),
    (["train.precision=bf16_pure", "engine.kind=deepspeed"],
     "config key 'train.precision': bf16_pure does not fit engine.kind=deepspeed, whose bf16 mode keeps fp32 "
     "masters anyway: use train.precision=bf16, or engine.kind=single/ddp/fsdp2"),
    (["train.precision=bf16", "optimizer.hparams={stochastic_rounding: true}"],
     "config key 'train.precision': optimizer.hparams.stochastic_rounding rounds updates into bf16 weights, "
     "which bf16 does not have: set train.precision=bf16_pure, or drop stochastic_rounding"),
])
def test_combinations_that_do_not_fit_are_one_line_errors(tmp_path, overrides, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, *overrides)
    assert str(e.value) == message


def test_auto_engine_resolved_to_deepspeed_is_refused_by_the_trainer(tmp_path, monkeypatch):
    from pretrain.config import ConfigError
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    cfg = _cfg(tmp_path, "train.precision=bf16_pure")  # engine.kind=auto passes the config check
    monkeypatch.setenv("MEMOPT_LAUNCHED_BY_DEEPSPEED", "1")
    with pytest.raises(ConfigError, match="bf16_pure does not fit engine.kind=deepspeed"):
        train(cfg, GPT)


class _Probe:
    """Records the dtypes the model's weights and its linear layers' outputs have in training."""

    def __init__(self):
        self.built_dtypes, self.output_dtypes = set(), set()

    def on_model_built(self, trainer, model):
        self.built_dtypes = {p.dtype for p in model.parameters()}
        for m in model.modules():
            if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear"):
                m.register_forward_hook(lambda mod, inp, out: self.output_dtypes.add(
                    (out[0] if isinstance(out, tuple) else out).dtype))

    def __getattr__(self, name):  # every other hook: nothing to do
        return lambda *args, **kwargs: None


def _train(tmp_path, *overrides):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import Trainer

    probe = _Probe()
    trainer = Trainer(_cfg(tmp_path, "train.steps=3", *overrides), GPT, callbacks=[probe])
    trainer.fit()
    return trainer, probe, _losses(tmp_path)


@pytest.mark.parametrize("optimizer", ["adalomo", "adamw"])
def test_bf16_single_computes_in_bf16_over_fp32_masters(tmp_path, optimizer):
    _, probe32, fp32 = _train(tmp_path / "fp32", f"optimizer.name={optimizer}")
    trainer, probe, bf16 = _train(tmp_path / "bf16", f"optimizer.name={optimizer}", "train.precision=bf16")
    assert probe.built_dtypes == {torch.float32} and probe32.output_dtypes == {torch.float32}
    # The linears' matmuls ran under autocast (those that add their bias inside promote it to
    # fp32, as megatron's layers do on a GPU under autocast).
    assert torch.bfloat16 in probe.output_dtypes
    assert {p.dtype for p in trainer.engine.module.parameters()} == {torch.float32}  # masters stay fp32
    # The same run up to bf16 compute: close to the fp32 losses, but not equal to them.
    assert all(abs(bf16[s] - fp32[s]) < 0.05 for s in fp32) and bf16 != fp32


def test_bf16_pure_trains_bf16_weights_and_resumes_bit_exactly_with_stochastic_rounding(tmp_path):
    sr = ["train.precision=bf16_pure", "optimizer.hparams={stochastic_rounding: true}", "train.steps=4"]
    trainer, probe, straight = _train(tmp_path / "straight", *sr)
    assert probe.built_dtypes == {torch.bfloat16} and probe.output_dtypes == {torch.bfloat16}  # no autocast
    assert {p.dtype for p in trainer.engine.module.parameters()} == {torch.bfloat16}
    _train(tmp_path / "split", *sr, "checkpoint.every=2")
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000002"
    _, _, resumed = _train(tmp_path / "resumed", *sr, f"checkpoint.resume={ckpt}")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in (3, 4))
    _, _, nearest = _train(tmp_path / "nearest", "train.precision=bf16_pure", "train.steps=4")
    assert nearest[1] == straight[1] and nearest[4] != straight[4]  # same start, other rounding


def test_fsdp2_bf16_keeps_fp32_sharded_masters(tmp_path):
    """Two processes, MixedPrecisionPolicy (bf16 compute, fp32 reduction): the checkpointed
    weights are fp32 and the losses follow the fp32 run's."""
    from pretrain.checkpoint.model_state import load_model_state

    _torchrun(tmp_path / "bf16", 2, "engine.kind=fsdp2", "train.precision=bf16", "train.steps=3")
    _torchrun(tmp_path / "fp32", 2, "engine.kind=fsdp2", "train.steps=3")
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert sorted(bf16) == [1, 2, 3] and all(abs(bf16[s] - fp32[s]) < 0.05 for s in fp32) and bf16 != fp32
    state, _ = load_model_state(tmp_path / "bf16" / "checkpoints" / "step_00000003")
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_ddp_bf16_autocast_keeps_fp32_weights(tmp_path):
    """Two processes under DDP (all-reduce of fp32 gradients), the forward under autocast."""
    from pretrain.checkpoint.model_state import load_model_state

    _torchrun(tmp_path / "bf16", 2, "engine.kind=ddp", "train.precision=bf16", "train.steps=3")
    _torchrun(tmp_path / "fp32", 2, "engine.kind=ddp", "train.steps=3")
    bf16, fp32 = _losses(tmp_path / "bf16"), _losses(tmp_path / "fp32")
    assert sorted(bf16) == [1, 2, 3] and all(abs(bf16[s] - fp32[s]) < 0.05 for s in fp32) and bf16 != fp32
    state, _ = load_model_state(tmp_path / "bf16" / "checkpoints" / "step_00000003")
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
