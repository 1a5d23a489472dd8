"""Model-config resolution (pretrain.checkpoint.run_config): the trainer's rules and the
export/eval rules build the same architecture, from the typed RunConfig and from its saved JSON;
where a checkpoint's run config and trainer state are found."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
# The fields that do not shape the weights: an inference rebuild may change them.
RUNTIME_FIELDS = {"hidden_dropout", "attention_dropout", "attention_backend"}


def _cfg(*overrides):
    from pretrain.config import load_run_config

    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [f"data.tokenizer={TOKENIZER}", *overrides])


def _architecture(model_cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in RUNTIME_FIELDS}


@pytest.mark.parametrize("overrides", [
    [],
    ["model.overrides={num_layers: 3, hidden_dropout: 0.1, attention_dropout: 0.1}", "train.seq_length=32"],
    ["model.kind=bert", "model.preset=tiny", "model.overrides={vocab_size: 4000}"],
])
def test_trainer_and_export_rules_agree_from_a_run_config_and_its_saved_json(overrides):
    from pretrain.checkpoint import model_config
    from pretrain.config import dump_config

    cfg = _cfg(*overrides)
    saved = json.loads(dump_config(cfg))
    trainer = model_config(cfg, 8192, kind=cfg.model.kind)
    assert model_config(saved, 8192) == trainer
    for source in (cfg, saved):
        rebuilt = model_config(source, 8192, for_inference=True)
        assert _architecture(rebuilt) == _architecture(trainer)
        assert (rebuilt.hidden_dropout, rebuilt.attention_dropout, rebuilt.attention_backend) == (0.0, 0.0, "sdpa")


def test_the_trainers_rules():
    from pretrain.checkpoint import model_config
    from pretrain.models import get_preset

    preset = get_preset("tiny", "gpt")
    cfg = _cfg("train.seq_length=null", "model.overrides={seq_length: 48}")
    # vocab_size from the tokenizer unless the overrides name one; no train.seq_length: the overrides' (or preset's)
    assert (model_config(cfg, 777).vocab_size, model_config(cfg, 777).seq_length) == (777, 48)
    assert model_config(cfg).vocab_size == preset.vocab_size
    assert model_config(_cfg("model.overrides={vocab_size: 500}"), 777).vocab_size == 500
    # train.seq_length wins over model.overrides.seq_length
    assert model_config(_cfg("train.seq_length=40", "model.overrides={seq_length: 48}"), 777).seq_length == 40
    # the trainer's task decides the kind
    assert model_config(cfg, 777, kind="bert").kind == "bert"
    # the dropout of the run, its attention backend, unless rebuilt for inference
    drop = _cfg("model.overrides={hidden_dropout: 0.2}")
    assert model_config(drop, 777).hidden_dropout == 0.2
    assert model_config(drop, 777, for_inference=True).hidden_dropout == 0.0


def test_a_saved_config_of_an_older_version_may_lack_sections():
    from pretrain.checkpoint import model_config
    from pretrain.models import get_preset

    assert model_config({}, 8192) == get_preset("demo", "gpt", vocab_size=8192)
    assert model_config({"model": {"preset": "tiny"}, "train": {"seq_length": None}}, None) == get_preset("tiny", "gpt")


def test_run_config_and_trainer_state_of_a_checkpoint(tmp_path):
    from pretrain.checkpoint import CheckpointError, find_run_config, read_trainer_state

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no run config.json found .*--run-config"):
        find_run_config(ckpt)
    (tmp_path / "run" / "config.json").write_text("{}")
    assert find_run_config(ckpt) == (tmp_path / "run" / "config.json").resolve()
    (ckpt / "config.json").write_text("{}")  # the config that wrote exactly this checkpoint wins
    assert find_run_config(ckpt) == (ckpt / "config.json").resolve()

    with pytest.raises(CheckpointError, match="trainer.json"):
        read_trainer_state(ckpt)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 4}))
    assert read_trainer_state(ckpt) == {"step": 4}
