"""Logged step scalars (pretrain/train/step_norms.py): grad_norm against torch's
clip_grad_norm_ on the same gradients (a twin model), update_norm against a before/after
parameter diff, optimizer_state_bytes against memopt.base.optimizer_state_bytes; single engine
(ordinary steps, fused backward with and without two-pass clipping) and FSDP2 on 2 ranks; and
the scalars in metrics.jsonl, TensorBoard and an offline W&B run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")

# (optimizer, hparams, train.clip_grad_norm): ordinary steps with clipping; fused backward in
# one pass; fused with two-pass global-norm clipping (the optimizer's own clip_grad_norm).
CASES = {
    "adafactor_step": ("adafactor", {}, 1.0),
    "adalomo_fused": ("adalomo", {}, None),
    "adalomo_fused_clip": ("adalomo", {"clip_grad_norm": 0.5}, None),
}


def _run_config(case):
    from pretrain.config import RunConfig

    name, hparams, clip = CASES[case]
    return RunConfig.model_validate({"optimizer": {"name": name, "lr": 1e-2, "hparams": hparams},
                                     "train": {"clip_grad_norm": clip, "steps": 10}})


def _model():
    from pretrain.models import build_gpt, get_preset

    cfg = get_preset("tiny", "gpt", vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0)
    return build_gpt(cfg, seed=5)


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    t = torch.randint(0, 300, (2, 17), generator=g)
    return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(2, 16)}


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _measure(engine_cls, case, rank=0, world=1):
    """Two steps (the first unmeasured, so optimizer state exists); the second measured. Returns
    the engine's scalars and the expected ones, computed without the code under test."""
    from pretrain.models import gpt_loss
    from pretrain.train.step_norms import step_scalars

    engine = engine_cls(_model(), _run_config(case))
    engine.train_step([_batch(0, rank)], gpt_loss)
    assert engine.last_norms is None  # not a logging step: nothing measured

    # The twin: the engine's weights after step 1, gradients of step 2's global batch (the
    # mean of the ranks' losses, as DDP/FSDP2 average gradients), norm from torch.
    twin = _model()
    names = [n for n, _ in engine.module.named_parameters()]
    before = {n: _full(p) for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.copy_(before[n])
    loss = sum(gpt_loss(twin, _batch(1, r))[0] for r in range(world)) / world
    loss.backward()
    expected_grad_norm = float(torch.nn.utils.clip_grad_norm_(twin.parameters(), math.inf))

    engine.train_step([_batch(1, rank)], gpt_loss, measure=True)
    after = {n: _full(p) for n, p in engine.module.named_parameters()}
    expected_update_norm = math.sqrt(sum(float((after[n] - before[n]).double().square().sum()) for n in names))
    from memopt.base import optimizer_state_bytes

    return dict(got=step_scalars(engine), grad_norm=expected_grad_norm, update_norm=expected_update_norm,
                local_state_bytes=optimizer_state_bytes(engine.optimizer), fused=engine.fused)


def _check(result, world_state_bytes):
    got = result["got"]
    assert got["grad_norm"] == pytest.approx(result["grad_norm"], rel=1e-5)
    assert got["update_norm"] == pytest.approx(result["update_norm"], rel=1e-4)
    assert got["update_norm"] > 0
    assert got["optimizer_state_bytes"] == world_state_bytes > 0


@pytest.mark.parametrize("case", list(CASES))
def test_single_engine_scalars_are_right(model_parallel_tp1, case):
    from pretrain.train.engines import SingleEngine

    result = _measure(SingleEngine, case)
    assert result["fused"] == case.startswith("adalomo")
    _check(result, result["local_state_bytes"])


def _fsdp2_worker(rank, world, cases):
    from pretrain.models import destroy_model_parallel, init_model_parallel
    from pretrain.train.engines import FSDP2Engine

    init_model_parallel(1)
    try:
        return {case: _measure(FSDP2Engine, case, rank, world) for case in cases}
    finally:
        destroy_model_parallel()


def test_fsdp2_scalars_are_right_over_two_ranks():
    cases = ["adafactor_step", "adalomo_fused"]
    from dist_helpers import run_world

    results = run_world(_fsdp2_worker, 2, cases)
    for case in cases:
        assert results[0][case]["fused"] == (case == "adalomo_fused")
        state_bytes = sum(r[case]["local_state_bytes"] for r in results)  # each rank: its shards
        for r in results:
            _check(r[case], state_bytes)
        assert results[0][case]["got"] == results[1][case]["got"]  # the global values on every rank


def _train_cfg(out, *overrides):
    from pretrain.config import load_run_config

    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [
        f"output_dir={out}", f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false",
        "checkpoint.every=0", "checkpoint.save_final=false", "train.eval_every=0", *overrides])


SCALARS = ("grad_norm", "update_norm", "optimizer_state_bytes")


def test_scalars_reach_metrics_file_tensorboard_and_an_offline_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever the test does
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _train_cfg(tmp_path, "train.steps=3", "train.log_every=2", "logging.wandb=true",
                     "logging.wandb_mode=offline", "logging.wandb_run_name=norms-test")
    train(cfg, GPT)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["grad_norm"] > 0 and r["update_norm"] > 0 and r["optimizer_state_bytes"] > 0

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for key in SCALARS:
        assert [round(e.value, 3) for e in acc.Scalars(key)] == [round(float(r[key]), 3) for r in rows]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    history = _wandb_history_when_written(runs[0], len(rows))
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, r in zip(history, rows):
        for key in SCALARS + ("loss",):
            assert h[key] == pytest.approx(r[key], rel=1e-6), key


def _wandb_records(path: Path):
    """The protobuf records of a .wandb transaction log: W&B's documented LevelDB-log layout (a
    7-byte file header, then 32 KiB blocks of chunks, each ``crc32 u32, length u16, type u8``:
    1 = a whole record, 2/3/4 = its first/middle/last piece)."""
    import struct

    data, block, pos, pieces = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pieces
            pieces = b""


def _wandb_history_when_written(run_dir: Path, rows: int, timeout_s: float = 60.0) -> list[dict]:
    """The run's history once it holds ``rows`` rows (or whatever is there after ``timeout_s``).
    wandb's service process writes the .wandb log: in the full test session it was once found
    with no history right after ``finish()`` returned (the test passes alone), so wait for the
    writer instead of racing it."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        history = _wandb_history(run_dir)
        if len(history) >= rows or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def _wandb_history(run_dir: Path) -> list[dict]:
    """The logged rows of an offline W&B run, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    rows = []
    for data in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_norms_off_logs_state_bytes_only(tmp_path):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    train(_train_cfg(tmp_path, "train.steps=1", "logging.norms=false"), GPT)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "grad_norm" not in row and "update_norm" not in row and row["optimizer_state_bytes"] > 0


def test_wandb_missing_is_a_one_line_error(monkeypatch):
    import importlib.util

    from pretrain.config import ConfigError, load_run_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install wandb") as e:
        load_run_config(None, ["logging.wandb=true", f"data.tokenizer={TOKENIZER}"])
    assert "\n" not in str(e.value)
