"""The trainer's callbacks: the hook order a user's callback sees, the metrics file, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")


def _cfg(out, *overrides):
    from pretrain.config import load_run_config

    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [
        f"output_dir={out}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false",
        "checkpoint.every=0", *overrides])


class Recorder:
    """Records every hook call as (hook, step), and what the metrics held when logged."""

    def __init__(self):
        self.calls, self.logged = [], []

    def _rec(self, name):
        def hook(trainer, *args):
            self.calls.append((name, trainer.state.step))
            if name == "log_metrics":
                self.logged.append(dict(args[0]))
        return hook

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._rec(name)


def test_hooks_run_in_the_documented_order_and_see_validation_metrics(tmp_path):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import Trainer

    rec = Recorder()
    cfg = _cfg(tmp_path, "train.steps=3", "train.log_every=2", "train.eval_every=3", "train.eval_iters=1")
    summary = Trainer(cfg, GPT, callbacks=[rec]).fit()
    assert summary["steps"] == 3
    names = [c[0] for c in rec.calls]
    assert names[:2] == ["on_model_built", "on_train_start"]
    assert names[-2:] == ["on_train_end", "close"]
    per_step = names[2:-2]
    # step 1 and 3 are logged (first, last), step 2 is logged by log_every=2
    expected = []
    for _ in range(3):
        expected += ["pre_step", "post_train_batch", "log_metrics", "post_step"]
    assert per_step == expected
    # the caller's callback runs before the default ones: at its post_train_batch the
    # evaluator has not added val_loss yet, but by log_metrics it has (step 3 = eval step)
    assert [m["step"] for m in rec.logged] == [1, 2, 3]
    assert "val_loss" in rec.logged[2] and "val_loss" not in rec.logged[0]
    # what the metrics file got is what the callbacks were shown
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == rec.logged


def test_close_runs_after_an_error(tmp_path):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import Trainer, TrainingError

    rec = Recorder()

    def nan_loss(model, batch):
        loss, extra = GPT.loss_fn(model, batch)
        return loss * float("nan"), extra

    cfg = _cfg(tmp_path, "train.steps=5", "train.max_nonfinite_in_a_row=2", "train.eval_every=0")
    with pytest.raises(TrainingError, match="2 non-finite losses in a row"):
        Trainer(cfg, GPT, loss_fn=nan_loss, callbacks=[rec]).fit()
    names = [c[0] for c in rec.calls]
    assert names.count("on_skipped_step") == 1  # the second skip stops the run before its hook
    assert "on_train_end" not in names and names[-1] == "close"


def test_metrics_file_appends_and_tensorboard_gets_every_numeric_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train.callbacks import MetricsFileCallback, TensorBoardCallback

    class FakeTrainer:
        pass

    for _ in range(2):  # a resumed run appends to the same file
        cbs = [MetricsFileCallback(tmp_path), TensorBoardCallback(tmp_path)]
        for cb in cbs:
            cb.on_train_start(FakeTrainer())
        for cb in cbs:
            cb.log_metrics(FakeTrainer(), {"step": 1, "loss": 2.5, "lr": 1e-3, "note": "text"})
            cb.log_metrics(FakeTrainer(), {"step": 2, "loss": 2.0, "lr": 5e-4})
        for cb in cbs:
            cb.close(FakeTrainer())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 1, 2] and rows[0]["note"] == "text"
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr"}  # strings and the step itself are not scalars
    assert [round(e.value, 6) for e in acc.Scalars("loss")][-2:] == [2.5, 2.0]
