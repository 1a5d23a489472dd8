"""tools/study_seq_models.py and tools/seq_tasks.py: the tasks, the lr sweep's extension and
resumption (stubbed runs), and real tiny runs of every optimizer in-process."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    sys.path.insert(0, str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


study = _load("study_seq_models")
tasks = _load("seq_tasks")


def test_lr_grid_is_half_decades_around_the_centre():
    assert study.lr_grid(1.0) == [0.178, 0.562, 1.78, 5.62]
    assert study.lr_grid(1e-2, 3) == [0.00316, 0.01, 0.0316]


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert study.lr_multiplier(0, 100) == pytest.approx(0.2)  # 5 warm-up steps
    assert study.lr_multiplier(4, 100) == pytest.approx(1.0)
    assert study.lr_multiplier(100, 100) == pytest.approx(0.1)


def fake_run(calls, best_lr):
    def run(spec):
        calls.append(spec["lr"])
        return dict(spec, final_val_loss=abs(math.log10(spec["lr"] / best_lr)), failed=False)
    return run


def test_sweep_extends_an_edge_optimum_and_a_rerun_trains_nothing(tmp_path):
    calls = []
    s = study.Study(tmp_path, fake_run(calls, best_lr=70.0), log=lambda *a, **k: None)
    base = dict(task="lstm_lm", steps=2, seed=1, size={})
    best, runs = study.sweep(s, base, "sgd", 1.0, max_extensions=3)
    # 17.8, 56.3 and 178 added above the grid's 5.62 (each half a decade above the last, 3 digits), until
    # the optimum (56.3) is interior
    assert best == 56.3 and [r["lr"] for r in runs] == [0.178, 0.562, 1.78, 5.62, 17.8, 56.3, 178.0]
    assert len(calls) == 7
    again = study.Study(tmp_path, fake_run(calls, best_lr=70.0), log=lambda *a, **k: None)
    assert study.sweep(again, base, "sgd", 1.0, max_extensions=3)[0] == best and len(calls) == 7


def test_a_failed_run_never_wins():
    assert study.score(dict(final_val_loss=None, failed=True)) == math.inf
    assert study.score(dict(final_val_loss=1.0, failed=False)) == 1.0


def test_reverse_task_targets_are_the_reversed_sources():
    t = tasks.ReverseTask(tasks.Size(vocab=100, embed=8, hidden=8, batch=2, train_words=2000, val=5))
    src, tgt_in, tgt = t.tensors([[5, 6, 7], [8, 9]])
    assert tgt[0].tolist() == [7, 6, 5, t.eos] and tgt[1].tolist() == [9, 8, t.eos, t.pad]
    assert tgt_in[0].tolist() == [t.bos, 7, 6, 5]
    assert all(4 <= len(s) <= 10 for s in t.train) and len(t.val) == 5


def test_validation_text_is_held_out():
    assert not set(tasks.heldout_words(600)) <= set(tasks.training_words(3000))


@pytest.mark.parametrize("task", ["lstm_lm", "seq2seq_reverse"])
def test_tiny_runs_of_every_optimizer(task):
    results = {}
    for key in study.OPTIMIZERS:
        spec = dict(task=task, optimizer=key, lr=study.OPTIMIZERS[key][1], seed=1, steps=2, evals=1,
                    size=study.TINY_SIZE[task])
        results[key] = r = study.train_run(spec)
        assert not r["failed"] and math.isfinite(r["final_val_loss"]) and len(r["val_curve"]) == 1
    assert results["adalomo"]["fused_backward"] and not results["adam"]["fused_backward"]
    # Adam: two full moments; AdaLomo: factored second moments; SGD: nothing
    assert results["adam"]["optimizer_state_bytes"] > 4 * results["adalomo"]["optimizer_state_bytes"] > 0
    assert results["sgd"]["optimizer_state_bytes"] == 0
