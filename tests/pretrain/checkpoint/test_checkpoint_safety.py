"""Checkpoints that cannot be subverted or silently corrupted, and resumes that are exact.

- crafted pickles in any checkpoint file never run (every engine's load path);
- flipped bytes and truncation are refused by the manifest, naming the file; resume=auto falls
  back to the newest checkpoint that verifies;
- with dropout on, an interrupted run continues bit-exactly (single, DDP, FSDP2, DeepSpeed);
- changed lr / schedule on resume are applied (and said), changed optimizers refused.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, list_checkpoints, resolve_resume, write_manifest

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = str(ROOT / "data/tokenizer/spm_bpe_8k.model")
CACHE = str(ROOT / "data/cache")
PY = sys.executable
DROPOUT = "model.overrides={hidden_dropout: 0.1, attention_dropout: 0.1}"
BASE = [f"data.tokenizer={TOKENIZER}", f"data.cache_dir={CACHE}", "train.progress_bar=false", "train.eval_every=0"]


def _cfg(out, *overrides):
    from pretrain.config import load_run_config

    return load_run_config(str(ROOT / "configs/gpt_tiny.yaml"), [f"output_dir={out}", *BASE, "checkpoint.every=0",
                                                                   *overrides])


def _train(out, *overrides):
    from pretrain.train.tasks import GPT
    from pretrain.train.trainer import train

    return train(_cfg(out, *overrides), GPT)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


class _Payload:
    """Pickles to a call of ``exec``: loading it with weights_only=False writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


def _plant(path: Path, marker: Path, keep_manifest_valid: bool = True) -> None:
    """Replace ``path`` by a crafted pickle and, as an attacker with write access would, make the
    manifest agree with it (so only the safe unpickling stands in the way)."""
    torch.save({"state": _Payload(marker)}, path)
    if keep_manifest_valid:
        ckpt = next(p for p in path.parents if p.name.startswith("step_"))
        write_manifest(ckpt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, nproc: int, out, *overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    script = [str(ROOT / "launch/pretrain_gpt.py"), "--config", str(ROOT / "configs/gpt_tiny.yaml"),
              f"output_dir={out}", *BASE, *overrides]
    if launcher == "deepspeed":
        ds = Path(PY).parent / "deepspeed"
        if not ds.exists():
            pytest.skip("the deepspeed launcher is not installed in this environment")
        cmd = [str(ds), "--num_gpus", str(nproc), "--master_port", str(_free_port()), *script]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
               *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(out.parent))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _error_lines(proc) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]


# -- exact resume with dropout ----------------------------------------------------------------

def test_single_process_resume_is_bit_exact_with_dropout(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, "train.steps=6", DROPOUT, "checkpoint.every=3")
    ckpt3 = straight / "checkpoints" / "step_00000003"
    _train(resumed, "train.steps=6", DROPOUT, f"checkpoint.resume={ckpt3}")
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    # dropout really is on: the same run without it gives other losses
    _train(tmp_path / "nodrop", "train.steps=1")
    assert _losses(tmp_path / "nodrop")[1] != a[1]


@pytest.mark.parametrize("launcher, engine, optimizer", [
    ("torchrun", "ddp", "adafactor"),
    ("torchrun", "fsdp2", "adalomo"),
    ("deepspeed", "deepspeed", "adalomo"),
])
def test_multiprocess_resume_is_bit_exact_with_dropout(tmp_path, launcher, engine, optimizer):
    common = [f"engine.kind={engine}", f"optimizer.name={optimizer}", DROPOUT, "train.steps=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    _launch(launcher, 2, straight, *common, "checkpoint.every=2")
    ckpt2 = straight / "checkpoints" / "step_00000002"
    _launch(launcher, 2, resumed, *common, f"checkpoint.resume={ckpt2}")
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [3, 4]
    assert a[3] == b[3] and a[4] == b[4], (a, b)


# -- no code execution from checkpoint files --------------------------------------------------

@pytest.mark.parametrize("victim", ["model.pt", "optimizer.pt", "scheduler.pt", "rng_rank0.pt"])
def test_crafted_pickle_in_a_single_process_checkpoint_never_runs(tmp_path, victim):
    _train(tmp_path / "run", "train.steps=2")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    _plant(ckpt / victim, marker)
    with pytest.raises(CheckpointError, match=victim) as err:
        _train(tmp_path / "run", "train.steps=4")
    assert not marker.exists()
    assert "\n" not in str(err.value)


def test_crafted_pickle_in_init_from_never_runs(tmp_path):
    _train(tmp_path / "src", "train.steps=1")
    ckpt = tmp_path / "src" / "checkpoints" / "step_00000001"
    marker = tmp_path / "pwned"
    _plant(ckpt / "model.pt", marker)
    with pytest.raises(Exception, match="model.pt"):
        _train(tmp_path / "dst", "train.steps=1", f"model.init_from={ckpt}")
    assert not marker.exists()


def test_weights_only_torch_load_refuses_payloads_and_keeps_deepspeed_data(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pretrain.checkpoint import weights_only_torch_load

    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, tmp_path / "bad.pt")
    torch.save({"stage": ZeroStageEnum.gradients, "w": torch.ones(2)}, tmp_path / "good.pt")
    with weights_only_torch_load():
        # what DeepSpeed's own loader asks for
        good = torch.load(tmp_path / "good.pt", map_location="cpu", weights_only=False)
        with pytest.raises(CheckpointError, match="bad.pt"):
            torch.load(tmp_path / "bad.pt", map_location="cpu", weights_only=False)
    assert good["stage"] == ZeroStageEnum.gradients
    assert not marker.exists()
    assert torch.load.__module__.startswith("torch")  # restored on exit


def test_crafted_dcp_metadata_never_runs(tmp_path):
    import pickle

    from pretrain.checkpoint import safe_dcp_reader

    marker = tmp_path / "pwned"
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="refusing to load builtins.exec"):
        safe_dcp_reader(tmp_path / "dcp").read_metadata()
    assert not marker.exists()


@pytest.mark.parametrize("launcher, engine, victim", [
    ("torchrun", "fsdp2", "dcp/.metadata"),
    ("deepspeed", "deepspeed", "deepspeed/mp_rank_00_model_states.pt"),
    ("deepspeed", "deepspeed", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
def test_crafted_distributed_checkpoint_never_runs_on_resume(tmp_path, launcher, engine, victim):
    out = tmp_path / "run"
    out.mkdir()
    common = [f"engine.kind={engine}", "optimizer.name=adalomo"]
    _launch(launcher, 2, out, *common, "train.steps=2")
    ckpt = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    if victim.endswith(".metadata"):
        import pickle

        (ckpt / victim).write_bytes(pickle.dumps(_Payload(marker)))
        write_manifest(ckpt)
    else:
        _plant(ckpt / victim, marker)
    proc = _launch(launcher, 2, out, *common, "train.steps=4", check=False)
    assert proc.returncode != 0
    assert not marker.exists()
    errors = _error_lines(proc)
    assert errors and Path(victim).name in errors[0], proc.stderr[-3000:]


def test_crafted_memopt_full_never_runs_on_resharded_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    common = ["engine.kind=deepspeed", "optimizer.name=adalomo"]
    _launch("deepspeed", 2, out, *common, "train.steps=2")
    ckpt = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    _plant(ckpt / "memopt_full.pt", marker)
    proc = _launch("deepspeed", 1, out, *common, "train.steps=4", check=False)
    assert proc.returncode != 0 and not marker.exists()
    errors = _error_lines(proc)
    assert errors and "memopt_full.pt" in errors[0], proc.stderr[-3000:]


# -- checksums ----------------------------------------------------------------------------------

def test_flipped_bytes_are_refused_naming_the_file_and_auto_falls_back(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3")
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    manifest = json.loads((ckpts[-1] / "manifest.json").read_text())
    assert {"model.pt", "optimizer.pt", "scheduler.pt", "trainer.json", "rng_rank0.pt"} <= set(manifest["files"])
    model = ckpts[-1] / "model.pt"
    data = bytearray(model.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])  # same size, other bytes
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt: sha256 differs"):
        resolve_resume(run / "checkpoints", str(ckpts[-1]))
    notes = []
    assert resolve_resume(run / "checkpoints", "auto", warn=notes.append) == ckpts[0]
    assert len(notes) == 1 and "step_00000002" in notes[0] and "model.pt" in notes[0]
    # The resumed run continues from step 2, exactly as the uninterrupted run did.
    _train(tmp_path / "straight", "train.steps=4")
    summary = _train(run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3")
    assert summary["steps"] == 4
    straight = _losses(tmp_path / "straight")
    rows = [r for r in _rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]
    assert rows[-1]["loss"] == straight[4]
    assert resolve_resume(run / "checkpoints", "auto") == ckpts[-1]  # re-saved step 4 verifies


def test_truncated_or_emptied_files_are_refused_naming_them(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=2")
    ckpt = run / "checkpoints" / "step_00000002"
    for victim in ("optimizer.pt", "rng_rank0.pt"):
        backup = (ckpt / victim).read_bytes()
        (ckpt / victim).write_bytes(backup[: len(backup) // 3] if victim == "optimizer.pt" else b"")
        with pytest.raises(CheckpointError, match=f"{victim}: .* bytes, manifest.json says"):
            _train(run, "train.steps=3")
        (ckpt / victim).write_bytes(backup)
    # every rejected start left the checkpoint as it was: it resumes now
    assert _train(run, "train.steps=3")["steps"] == 3


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=2")
    ckpt = run / "checkpoints" / "step_00000002"
    (ckpt / "scheduler.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        _train(run, "train.steps=4")
    assert ckpt.is_dir()  # nothing was deleted or overwritten


def test_checkpoint_without_manifest_still_resumes_with_a_warning(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=2")
    ckpt = run / "checkpoints" / "step_00000002"
    (ckpt / "manifest.json").unlink()  # as written by the previous version
    notes = []
    assert resolve_resume(run / "checkpoints", "auto", warn=notes.append) == ckpt
    assert notes and "without checksum verification" in notes[0]


# -- what may change on resume ------------------------------------------------------------------

def test_changed_lr_and_longer_schedule_are_applied_on_resume(tmp_path):
    from pretrain.optim import lr_multiplier

    run = tmp_path / "run"
    _train(run, "train.steps=4", "optimizer.lr=1e-3", "schedule.warmup_steps=0")
    # Extend 4 -> 8 steps at twice the lr: the cosine is recomputed over 8 steps from step 4.
    _train(run, "train.steps=8", "optimizer.lr=2e-3", "schedule.warmup_steps=0")
    lrs = {r["step"]: r["lr"] for r in _rows(run) if "lr" in r}
    for step in (5, 6, 8):
        assert lrs[step] == pytest.approx(2e-3 * lr_multiplier(step - 1, 8, 0, "cosine", 0.1), rel=1e-12), step
    saved = json.loads((run / "checkpoints" / "step_00000008" / "config.json").read_text())
    assert saved["optimizer"]["lr"] == 2e-3 and saved["train"]["steps"] == 8


@pytest.mark.parametrize("override, message", [
    ("optimizer.name=adafactor", "holds adalomo optimizer state and this run has optimizer.name=adafactor"),
    ("optimizer.hparams={decay_rate: -0.5}", "optimizer.hparams.decay_rate is -0.5"),
    ("model.overrides={num_layers: 3}", r"holds another model: model.overrides.num_layers=3 \(checkpoint: unset\)"),
])
def test_incompatible_resume_is_a_one_line_refusal(tmp_path, override, message):
    run = tmp_path / "run"
    _train(run, "train.steps=2")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=message) as err:
        _train(run, "train.steps=4", override)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_engine_format_mismatch_is_refused(tmp_path):
    from pretrain.train.resume import check_resumable

    run = tmp_path / "run"
    _train(run, "train.steps=1")
    ckpt = run / "checkpoints" / "step_00000001"
    with pytest.raises(CheckpointError, match="engine.kind=single or ddp and this run uses fsdp2"):
        check_resumable(ckpt, _cfg(run), "fsdp2")
    assert check_resumable(ckpt, _cfg(run), "ddp")["optimizer"]["name"] == "adalomo"


# -- through the launcher: one line, exit status 1, checkpoints untouched ---------------------

def _cli(out, *overrides):
    from pretrain.train.cli import main

    return main(["--config", str(ROOT / "configs/gpt_tiny.yaml"), f"output_dir={out}", *BASE, *overrides], "gpt")


@pytest.mark.parametrize("damage, needle", [
    ("truncate model.pt", "model.pt: "),
    ("flip optimizer.pt", "optimizer.pt: sha256 differs"),
    ("empty rng_rank0.pt", "rng_rank0.pt: 0 bytes"),
    ("other optimizer", "optimizer.name=came"),
    ("other model size", "model.overrides.num_layers=3"),
])
def test_damaged_or_foreign_checkpoint_is_one_line_through_the_launcher(tmp_path, capsys, damage, needle):
    saved_env = dict(os.environ)
    try:
        run = tmp_path / "run"
        assert _cli(run, "train.steps=2", "checkpoint.every=0") == 0
        ckpt = run / "checkpoints" / "step_00000002"
        action, _, name = damage.partition(" ")
        extra = []
        if action == "truncate":
            data = (ckpt / name).read_bytes()
            (ckpt / name).write_bytes(data[: len(data) // 2])
        elif action == "flip":
            data = bytearray((ckpt / name).read_bytes())
            data[-100] ^= 0xFF
            (ckpt / name).write_bytes(bytes(data))
        elif action == "empty":
            (ckpt / name).write_bytes(b"")
        elif damage == "other optimizer":
            extra = ["optimizer.name=came"]
        else:
            extra = ["model.overrides={num_layers: 3, hidden_dropout: 0.0, attention_dropout: 0.0}"]
        before = {p.name: p.stat().st_size for p in ckpt.iterdir()}
        capsys.readouterr()
        code = _cli(run, "train.steps=4", *extra)
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
        assert {p.name: p.stat().st_size for p in ckpt.iterdir()} == before
        assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def test_deepspeed_torch_optimizer_at_another_world_size_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    common = ["engine.kind=deepspeed", "optimizer.name=adamw", "optimizer.lr=1e-4"]
    _launch("deepspeed", 2, out, *common, "train.steps=1")
    proc = _launch("deepspeed", 1, out, *common, "train.steps=2", check=False)
    assert proc.returncode == 1
    errors = _error_lines(proc)
    assert len(errors) == 1 and "ds_to_universal.py" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
