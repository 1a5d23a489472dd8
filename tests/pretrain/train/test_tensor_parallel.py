"""Tensor parallelism in the trainer: TP runs equal TP=1 runs of the same global batch, their
checkpoints hold full TP=1 tensors (resume at another TP size, export unchanged), and the config
refuses TP sizes the model cannot split. Multi-process runs use torchrun with gloo on CPU."""
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
COMMON = [f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false",
          "train.eval_every=0", "checkpoint.every=0"]
TOL = 1e-5  # losses of TP and TP=1 runs: the same sums in another order


def _cfg(out, *overrides):
    from pretrain.config import load_run_config

    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [f"output_dir={out}", *COMMON, *overrides])


def _train(out, *overrides) -> dict:
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    return train(_cfg(out, *overrides), GPT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, nproc, *overrides, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/gpt_tiny.yaml"),
           f"output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def _assert_close_losses(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) <= TOL, (step, a[step], b[step])


def _model(ckpt) -> dict:
    return torch.load(Path(ckpt) / "model.pt", weights_only=True)


# -- config errors (no processes) ----------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("parallel.tensor_parallel_size=3", "config key 'parallel.tensor_parallel_size': num_attention_heads=4 is not "
                                        "divisible by tensor_parallel_size=3; choose a tensor_parallel_size that divides it"),
    ("parallel.tensor_parallel_size=0", "config key 'parallel.tensor_parallel_size': Input should be greater than or "
                                        "equal to 1 (got 0)"),
])
def test_a_tp_size_the_model_cannot_split_is_a_one_line_error(tmp_path, override, message):
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, override)
    assert str(err.value) == message


def test_padded_vocab_is_tp_independent_and_checked():
    from pretrain.models.config import check_tensor_parallel, get_preset

    cfg = get_preset("tiny", "gpt", vocab_size=8000)
    assert cfg.padded_vocab_size == 8064  # 8000 rounded up to 128, whatever the TP size
    check_tensor_parallel(cfg, 2)
    odd = get_preset("tiny", "gpt", vocab_size=8000, make_vocab_size_divisible_by=63)  # 8001 = 127 * 63
    with pytest.raises(ValueError, match="padded vocabulary .8001.*make_vocab_size_divisible_by to a multiple of 2"):
        check_tensor_parallel(odd, 2)


def test_tp_size_must_divide_the_processes(tmp_path):
    from pretrain.config import ConfigError
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import Trainer

    cfg = _cfg(tmp_path, "parallel.tensor_parallel_size=2", "optimizer.name=adamw")  # one process here
    with pytest.raises(ConfigError, match="tensor_parallel_size': 2 does not divide the 1 processes"):
        Trainer(cfg, GPT).fit()


# -- TP=2 x DP=1 against TP=1: training, resume both ways, export --------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adafactor", marks=pytest.mark.slow)])
def test_tp2_trains_like_tp1_resumes_at_either_size_and_exports(tmp_path, optimizer):
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    steps = ["train.steps=4", "checkpoint.every=2", f"optimizer.name={optimizer}"]
    _train(tp1, *steps)
    _torchrun(tp2, 2, "parallel.tensor_parallel_size=2", *steps)
    a, b = _losses(tp1), _losses(tp2)
    assert sorted(b) == [1, 2, 3, 4]
    _assert_close_losses(a, b, [1, 2, 3, 4])
    # Token counts are the DP replicas' tokens (one replica here), not the TP ranks'.
    assert [r["tokens"] for r in _rows(tp2) if "loss" in r] == [r["tokens"] for r in _rows(tp1) if "loss" in r]

    # The TP=2 checkpoint holds full (TP=1) tensors, with the TP=1 run's names and shapes.
    # AdamW's first steps are sign-like (m / sqrt(v)) and amplify round-off in tiny gradients;
    # memopt's TP layouts keep Adafactor's factored statistics exact (measured 5e-6).
    m1, m2 = _model(tp1 / "checkpoints/step_00000004"), _model(tp2 / "checkpoints/step_00000004")
    assert m1.keys() == m2.keys()
    for k, v in m1.items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert v.shape == m2[k].shape, k
            assert (v - m2[k]).abs().max() <= (1e-4 if optimizer == "adamw" else 1e-5), k

    # TP=2 -> TP=1: resume TP=2's step 2 in one process; steps 3, 4 continue the TP=2 run.
    resumed1 = tmp_path / "resumed1"
    _train(resumed1, *steps[::2], f"checkpoint.resume={tp2 / 'checkpoints/step_00000002'}")
    assert sorted(_losses(resumed1)) == [3, 4]
    _assert_close_losses(b, _losses(resumed1), [3, 4])
    # TP=1 -> TP=2: resume TP=1's step 2 on two TP ranks.
    resumed2 = tmp_path / "resumed2"
    _torchrun(resumed2, 2, "parallel.tensor_parallel_size=2", *steps[::2],
              f"checkpoint.resume={tp1 / 'checkpoints/step_00000002'}")
    assert sorted(_losses(resumed2)) == [3, 4]
    _assert_close_losses(a, _losses(resumed2), [3, 4])

    # Export reads the TP=2 checkpoint as it reads a TP=1 one; HF's logits match the model's.
    assert _export(tp2 / "checkpoints/step_00000004", tmp_path / "hf")["max_abs_diff"] <= 1e-4


def _export(ckpt, out) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_to_hf.py"), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


# -- TP=2 x DP=2 (4 processes), FSDP2 and DeepSpeed under TP ------------------------------------

@pytest.mark.slow
def test_tp2_dp2_trains_like_tp1_dp2(tmp_path):
    """The same global batch (micro 4 x DP 2): 4 processes at TP=2 equal 2 processes at TP=1."""
    dp2, tp2dp2 = tmp_path / "dp2", tmp_path / "tp2dp2"
    steps = ["train.steps=3", "optimizer.name=adamw", "engine.kind=ddp"]
    _torchrun(dp2, 2, *steps)
    _torchrun(tp2dp2, 4, "parallel.tensor_parallel_size=2", *steps)
    _assert_close_losses(_losses(dp2), _losses(tp2dp2), [1, 2, 3])
    assert [r["tokens"] for r in _rows(tp2dp2) if "loss" in r] == [r["tokens"] for r in _rows(dp2) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("engine, optimizer", [("fsdp2", "adamw"), ("fsdp2", "adafactor"), ("deepspeed", "adamw"),
                                               ("deepspeed", "adafactor")])
def test_fsdp2_and_deepspeed_under_tp2(tmp_path, engine, optimizer):
    """TP=2 under FSDP2 (a (dp, tp) mesh) and DeepSpeed (megatron's groups as its mpu) trains like
    TP=1, its checkpoint exports; FSDP2's resumes at TP=1, DeepSpeed's through memopt_full.pt (memopt
    optimizers), with AdamW it refuses another layout in one line."""
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    steps = ["train.steps=3", "checkpoint.every=2", f"optimizer.name={optimizer}"]
    _train(tp1, *steps)
    _torchrun(tp2, 2, "parallel.tensor_parallel_size=2", f"engine.kind={engine}", "engine.zero_stage=1", *steps)
    a, b = _losses(tp1), _losses(tp2)
    _assert_close_losses(a, b, [1, 2, 3])
    assert _export(tp2 / "checkpoints/step_00000003", tmp_path / "hf")["max_abs_diff"] <= 1e-4
    resumed = tmp_path / "resumed"
    ckpt2 = tp2 / "checkpoints/step_00000002"
    if engine == "fsdp2":
        _train(resumed, *steps, "engine.kind=fsdp2", f"checkpoint.resume={ckpt2}")
        _assert_close_losses(b, _losses(resumed), [3])
    elif optimizer == "adamw":  # DeepSpeed's files are per (DP, TP) rank; AdamW has no name-keyed full state
        proc = _torchrun(resumed, 1, *steps, "engine.kind=deepspeed", "engine.zero_stage=1",
                         f"checkpoint.resume={ckpt2}", check=False)
        assert proc.returncode == 1
        assert "written by 2 DeepSpeed ranks at tensor_parallel_size=2 and this run has 1 at 1" in proc.stderr
    else:  # memopt_full.pt: full weights and the optimizer state by name
        proc = _torchrun(resumed, 1, *steps, "engine.kind=deepspeed", "engine.zero_stage=1",
                         f"checkpoint.resume={ckpt2}")
        assert "resumed on 1 from memopt_full.pt" in proc.stderr + proc.stdout
        _assert_close_losses(b, _losses(resumed), [3])


# -- gradient-norm clipping under TP (2 gloo processes, no trainer) --------------------------------

def _clipped_grads(max_norm: float):
    """The tiny GPT's gradient norm and clipped full gradients on a fixed batch, at this process's TP."""
    from pretrain.models import build_gpt, get_preset, gpt_loss, tensor_parallel_size
    from pretrain.models.tp_state import gather_full, split_dims
    from pretrain.train.engines.grad_norm import clip_grad_norm_tensor_parallel

    cfg = get_preset("tiny", "gpt", vocab_size=1000, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_gpt(cfg, seed=7)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 16)}
    gpt_loss(model, batch)[0].backward()
    dims = split_dims(model)
    if tensor_parallel_size() > 1:
        norm = clip_grad_norm_tensor_parallel(model.named_parameters(), max_norm, dims)
    else:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm), gather_full({n: p.grad for n, p in model.named_parameters()}, dims)


def _clip_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from pretrain.models import destroy_model_parallel, init_model_parallel

    init_model_parallel(tensor_parallel_size=world)
    out = _clipped_grads(max_norm=0.5)
    if rank == 0:
        torch.save(out, path)
    destroy_model_parallel(destroy_process_group=True)


@pytest.mark.usefixtures("model_parallel_tp1")
def test_grad_norm_clipping_counts_split_and_replicated_parameters_once(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "tp2.pt")
    mp.spawn(_clip_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    norm2, grads2 = torch.load(path)
    norm1, grads1 = _clipped_grads(max_norm=0.5)
    assert norm1 > 1.0  # the clip is active: the gradients are scaled by 0.5 / norm
    assert abs(norm2 - norm1) <= 1e-5 * norm1
    for name, g in grads1.items():
        assert torch.allclose(g, grads2[name], atol=1e-6, rtol=1e-4), name


def test_fsdp2_checkpoint_after_validation_resumes(tmp_path):
    """Validation (a forward without backward) leaves FSDP2's root module unsharded; the checkpoint
    written right after it must still name the optimizer's parameters and resume."""
    steps = ["engine.kind=fsdp2", "optimizer.name=adafactor", "train.eval_every=2", "logging.norms=false"]
    assert _train(tmp_path, "train.steps=2", *steps)["steps"] == 2
    assert (tmp_path / "checkpoints/step_00000002/optimizer_full.pt").is_file()
    assert _train(tmp_path, "train.steps=3", *steps)["steps"] == 3
    assert sorted(_losses(tmp_path)) == [1, 2, 3]
