"""The training loop: resume equality, non-finite losses, bad configs, engines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
PY = sys.executable


def _cfg(tmp_path, *overrides):
    from pretrain.config import load_run_config

    base = [
        f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}",
        "train.progress_bar=false", "train.eval_every=0", "checkpoint.every=0",
    ]
    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), base + list(overrides))


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("optimizer", ["adalomo", "adafactor"])
def test_resume_continues_the_same_loss_curve(tmp_path, optimizer):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    straight = tmp_path / "straight"
    train(_cfg(straight, "train.steps=6", f"optimizer.name={optimizer}"), GPT)
    # The same run, checkpointed at step 3 (as a job killed after step 3 would have left it),
    # then resumed in a fresh run for the last 3 steps.
    split2 = tmp_path / "split2"
    summary = train(_cfg(split2, "train.steps=6", f"optimizer.name={optimizer}", "checkpoint.every=3"), GPT)
    assert summary["steps"] == 6
    resumed = tmp_path / "resumed"
    ckpt3 = split2 / "checkpoints" / "step_00000003"
    assert (ckpt3 / "trainer.json").is_file()
    train(_cfg(resumed, "train.steps=6", f"optimizer.name={optimizer}", f"checkpoint.resume={ckpt3}"), GPT)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert a[step] == b[step], (step, a[step], b[step])
    assert _losses(split2) == a  # and the run with periodic checkpoints is the same run


def test_resume_auto_picks_the_latest_complete_checkpoint(tmp_path):
    from pretrain.checkpoint import list_checkpoints, resolve_resume
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    train(_cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=1"), GPT)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004"]  # keep_last=1 removed step 2
    # A crash mid-save leaves a .tmp directory and an incomplete one: both are ignored.
    (tmp_path / "checkpoints" / "step_00000006.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_00000008").mkdir()
    assert resolve_resume(tmp_path / "checkpoints", "auto") == ckpts[0]
    summary = train(_cfg(tmp_path, "train.steps=5"), GPT)
    assert summary["steps"] == 5
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5]  # steps 5 appended after the resume


def test_nonfinite_loss_is_skipped_then_stops(tmp_path):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import TrainingError, train

    calls = {"n": 0}
    bad_calls = {2, 5, 6, 7}

    def flaky_loss(model, batch):
        calls["n"] += 1
        loss, extra = GPT.loss_fn(model, batch)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), extra

    summary = train(_cfg(tmp_path / "a", "train.steps=4", "optimizer.name=adafactor"), GPT, loss_fn=flaky_loss)
    assert summary["nonfinite_skipped_steps"] == 1
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no nan logged as a loss
    calls["n"] = 0
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(_cfg(tmp_path / "b", "train.steps=8", "optimizer.name=adafactor", "train.max_nonfinite_in_a_row=3"), GPT, loss_fn=flaky_loss)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'steps'?)"),
        ("train.steps=many", "config key 'train.steps'"),
        ("optimizer.name=adamm", "unknown optimizer 'adamm' (did you mean 'adamw'?)"),
        ("engine.deepspeed_config=/nope.json", "file not found: /nope.json"),
        ("optimizer.hparams={betas: [0.9, 0.99]}", "unknown hyperparameter 'betas' for adalomo"),
    ],
)
def test_bad_config_is_a_one_line_error_before_any_work(tmp_path, override, message):
    out = tmp_path / "run"
    proc = subprocess.run(
        [PY, str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/gpt_tiny.yaml"),
         f"output_dir={out}", f"data.tokenizer={TOKENIZER}", override],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not out.exists()  # nothing was started


def test_missing_config_file_is_a_one_line_error(tmp_path):
    proc = subprocess.run([PY, str(ROOT / "launch/pretrain_gpt.py"), "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: config file not found: {tmp_path / 'nope.yaml'}"


def _torchrun(tmp_path, nproc, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/gpt_tiny.yaml"),
           f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}",
           "train.progress_bar=false", "train.eval_every=0", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine, optimizer", [("ddp", "adafactor"), ("fsdp2", "adalomo"), ("fsdp2", "adamw")])
def test_multiprocess_engines_train_and_resume_at_another_world_size(tmp_path, engine, optimizer):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    _torchrun(tmp_path, 2, f"engine.kind={engine}", f"optimizer.name={optimizer}", "train.steps=4", "checkpoint.every=2")
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # Resume the 2-process run in one process (the data position is counted in global samples;
    # FSDP2 checkpoints are resharded on load).
    kind = "single" if engine == "ddp" else "fsdp2"
    summary = train(_cfg(tmp_path, "train.steps=6", f"optimizer.name={optimizer}", f"engine.kind={kind}"), GPT)
    assert summary["steps"] == 6
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_bert_pretraining_runs_and_resumes(tmp_path):
    from pretrain.config import load_run_config
    from pretrain.train.tasks import BERT
    from pretrain.train.trainer import train

    def cfg(*extra):
        return load_run_config(str(ROOT / "configs/bert_tiny.yaml"), [
            f"output_dir={tmp_path}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}",
            "train.progress_bar=false", "train.eval_every=2", *extra])

    summary = train(cfg("train.steps=2"), BERT)
    assert summary["steps"] == 2 and summary["last_loss"] < 20
    summary = train(cfg("train.steps=3"), BERT)  # resume=auto from step 2
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("val_loss" in r for r in rows)


def test_fused_backward_with_gradient_accumulation_falls_back_or_fails_clearly(tmp_path):
    from pretrain.train.engines import use_fused_backward

    assert use_fused_backward(_cfg(tmp_path, "optimizer.name=adalomo")) is True
    assert use_fused_backward(_cfg(tmp_path, "optimizer.name=adalomo", "train.grad_accum_steps=2")) is False
    assert use_fused_backward(_cfg(tmp_path, "optimizer.name=adafactor")) is False
    with pytest.raises(ValueError, match="grad_accum_steps > 1"):
        use_fused_backward(_cfg(tmp_path, "optimizer.name=lomo", "optimizer.fused_backward=on", "train.grad_accum_steps=2"))
    # Engines without fused backward (DDP, DeepSpeed): auto falls back, on is a clear error.
    assert use_fused_backward(_cfg(tmp_path, "optimizer.name=adalomo"), False, "ddp") is False
    with pytest.raises(ValueError, match="not supported with engine.kind=ddp"):
        use_fused_backward(_cfg(tmp_path, "optimizer.name=adalomo", "optimizer.fused_backward=on"), False, "ddp")


def test_init_from_starts_from_other_weights_with_a_fresh_optimizer(tmp_path):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    src = tmp_path / "src"
    train(_cfg(src, "train.steps=3", "optimizer.name=adamw"), GPT)
    ckpt = src / "checkpoints" / "step_00000003"
    a = train(_cfg(tmp_path / "a", "train.steps=1", "optimizer.name=adafactor", f"model.init_from={ckpt}"), GPT)
    b = train(_cfg(tmp_path / "b", "train.steps=1", "optimizer.name=adafactor"), GPT)
    # Same seed, same first batch: the trained weights score it clearly better than a fresh init
    # (the source's loss fell by ~0.1 per step over its 3 steps).
    assert _losses(src)[3] < _losses(src)[1] - 0.05
    assert a["first_loss"] < b["first_loss"] - 0.1


def test_deepspeed_zero2_adalomo_trains_and_resumes(tmp_path):
    """The quickstart's path: `deepspeed` launcher, 2 CPU processes, ZeRO-2, AdaLomo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    deepspeed_bin = str(Path(PY).parent / "deepspeed")
    if not Path(deepspeed_bin).exists():
        pytest.skip("the deepspeed launcher is not installed in this environment")

    def run(steps, ranks=2):
        cmd = [deepspeed_bin, "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(ROOT / "launch/pretrain_gpt.py"),
               "--config", str(ROOT / "configs/quickstart.yaml"), f"output_dir={tmp_path}", "model.preset=tiny",
               f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false",
               "train.eval_every=0", "train.log_every=1", f"train.steps={steps}", "checkpoint.every=2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc

    run(2)
    run(4)  # resume=auto from step 2 at the same world size
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss" in r for r in rows)
    # ZeRO's own gradient norm, the update of the full weights, the state summed over both ranks
    assert all(r["grad_norm"] > 0 and r["update_norm"] > 0 and r["optimizer_state_bytes"] > 0 for r in rows)
    assert losses[4] < losses[1]  # AdaLomo at the quickstart's lr makes progress in 4 steps
    # Resume on 1 rank what 2 ranks wrote: through memopt_full.pt (weights, fp32 masters and the
    # optimizer state by parameter name), not DeepSpeed's per-rank files.
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    assert (ckpt / "memopt_full.pt").is_file()
    proc = run(6, ranks=1)
    assert "written by 2 DeepSpeed ranks, resumed on 1" in proc.stderr + proc.stdout
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    # the trained weights were restored (a fresh model would start again near losses[1])
    assert losses[5] < losses[1] - 0.5 * (losses[1] - losses[4])
