"""memopt.integrations.hf.MemoptTrainer: memopt optimizers inside transformers.Trainer.

* DeepSpeed ZeRO-2 through accelerate (2 CPU processes, gloo, started by torch.distributed.run):
  AdaLomo under Trainer(args=TrainingArguments(deepspeed=...)) stays memopt's (bound to ZeRO's
  partitions) and equals the project's own ``memopt.integrations.deepspeed.initialize`` run on the
  same batches; a fresh Trainer resumed from the step-2 checkpoint ends where the uninterrupted
  run ended.
* DDP through accelerate (2 CPU processes), ordinary and fused backward: both equal a
  single-process AdaLomo on the same global batches. (accelerate runs FSDP on accelerators only;
  on CPU it turns an FSDP request into DDP, so FSDP2 is checked by tools/gpu_check.sh.)
* single process: fused backward equals ordinary steps; Adafactor at its defaults gets
  AdafactorSchedule; bad requests are one-line errors.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hf_trainer_worker as w  # noqa: E402

TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, mode: str, nproc: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
           str(HERE / "hf_trainer_worker.py"), str(out), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out / f"result_{mode}.pt", weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _without_key_bias(params: dict) -> dict:
    """The parameters less the key third of each attention's c_attn bias: the softmax ignores it,
    so its gradient is fp32 round-off, which AdaLomo normalizes into a full-size update (another
    reduction order, as DDP's against one process, then moves it by ~1e-4 in any implementation)."""
    out = dict(params)
    for k, v in params.items():
        if k.endswith("attn.c_attn.bias"):
            n = v.numel() // 3
            out[k] = torch.cat([v[:n], v[2 * n:]])
    return out


def _moved(params: dict) -> float:
    return _max_diff(params, w.params_of(w.tiny_gpt2()))


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _launch(tmp_path_factory.mktemp("hf_ds"), "deepspeed")


def test_deepspeed_zero2_trainer_equals_memopt_initialize(deepspeed_results):
    for rank, r in enumerate(deepspeed_results):
        # Trainer kept memopt's AdaLomo as ZeRO's client and bound its flat partition.
        assert r["optimizer_type"] == "AdaLomo" and r["bound"] >= 1, rank
        assert _moved(r["trainer"]) > 1e-2
        assert _max_diff(r["trainer"], r["reference"]) <= TOL, rank
        assert len(r["trainer_losses"]) == w.STEPS
        for a, b in zip(r["trainer_losses"], r["reference_losses"]):
            assert abs(a - b) <= 1e-6 * abs(b), (rank, r["trainer_losses"], r["reference_losses"])
    # both ranks hold the same (replicated under ZeRO-2) weights
    assert _max_diff(deepspeed_results[0]["trainer"], deepspeed_results[1]["trainer"]) == 0.0


def test_deepspeed_refusals_are_one_line(deepspeed_results):
    for r in deepspeed_results:
        errors = r["errors"]
        assert "optimizer section" in errors["optimizer_section"] and "remove it" in errors["optimizer_section"]
        assert "not available under DeepSpeed" in errors["fused"]
        assert all("\n" not in e for e in errors.values())


def test_deepspeed_trainer_checkpoint_resumes_exactly(deepspeed_results):
    for rank, r in enumerate(deepspeed_results):
        assert r["checkpoints"] == [f"checkpoint-{w.SAVE_AT}", f"checkpoint-{w.STEPS}"]
        # the resumed run trained the last STEPS - SAVE_AT steps on the same batches
        assert r["resumed_losses"] == r["trainer_losses"][w.SAVE_AT:], rank
        assert _max_diff(r["resumed"], r["trainer"]) <= 1e-7, rank


def _single_process_replay(rank_batches: list[list[dict]], fused: bool) -> dict:
    """AdaLomo on one process: each step's loss is the mean over ranks of each rank's loss,
    which is what DDP's gradient average computes."""
    import memopt

    model = w.tiny_gpt2()
    opt = memopt.AdaLomo(model.parameters(), lr=w.LR)
    for step in range(w.STEPS):
        loss = sum(model(**b[step]).loss for b in rank_batches) / len(rank_batches)
        if fused:
            opt.fused_backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
    return w.params_of(model)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("hf_ddp"), "ddp")


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused_backward"])
def test_ddp_trainer_equals_single_process(ddp_results, fused):
    r0 = ddp_results[0]
    assert r0[("wrapper", fused)] == "DistributedDataParallel"
    ref = _single_process_replay([r[("batches", fused)] for r in ddp_results], fused)
    assert _moved(ref) > 1e-2
    for rank, r in enumerate(ddp_results):
        assert _max_diff(_without_key_bias(r[("params", fused)]), _without_key_bias(ref)) <= TOL, (rank, fused)


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("accelerate runs FSDP on accelerators only (on CPU it turns FSDP into DDP)")
    return _launch(tmp_path_factory.mktemp("hf_fsdp2"), "fsdp2", nproc=min(2, torch.cuda.device_count()))


@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused_backward"])
def test_fsdp2_trainer_equals_single_process(fsdp2_results, fused):
    results = fsdp2_results
    r0 = results[0]
    assert r0[("wrapper", fused)] != "DistributedDataParallel" and r0[("sharded", fused)]  # Shard(0) DTensors
    ref = _single_process_replay([r[("batches", fused)] for r in results], fused)
    for rank, r in enumerate(results):
        assert _max_diff(_without_key_bias(r[("params", fused)]), _without_key_bias(ref)) <= TOL, (rank, fused)


def _single_trainer(tmp: str, steps: int = 3, **kw):
    from memopt.integrations.hf import MemoptTrainer

    model = w.tiny_gpt2()
    rec = w.Recorder(model)
    args = w.training_args(Path(tmp), max_steps=steps, save_strategy="no", **kw.pop("args", {}))
    trainer = MemoptTrainer(model, args=args, train_dataset=w.dataset(), **kw)
    trainer.train()
    return trainer, rec, w.params_of(model)


def test_single_process_fused_backward_equals_steps():
    with tempfile.TemporaryDirectory() as tmp:
        _, rec_s, stepped = _single_trainer(tmp, memopt_optimizer="adalomo", args=dict(max_grad_norm=0.0))
        trainer, rec_f, fused = _single_trainer(tmp, memopt_optimizer="adalomo", fused_backward=True,
                                                args=dict(max_grad_norm=0.0))
    assert _moved(stepped) > 1e-2
    assert _max_diff(fused, stepped) <= 1e-6
    assert rec_f.losses == pytest.approx(rec_s.losses, rel=1e-6)
    assert all(p.grad is None for p in trainer.model.parameters())  # no gradient outlives its update


def test_adafactor_defaults_get_adafactor_schedule():
    from transformers.optimization import AdafactorSchedule

    import memopt

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, params = _single_trainer(tmp, memopt_optimizer="adafactor")
        # the same run through plain Trainer with the schedule passed by hand
        import transformers

        model = w.tiny_gpt2()
        opt = memopt.Adafactor(model.parameters())
        plain = transformers.Trainer(model, args=w.training_args(Path(tmp), max_steps=3, save_strategy="no"),
                                     train_dataset=w.dataset(), optimizers=(opt, AdafactorSchedule(opt)))
        plain.train()
    assert isinstance(trainer.lr_scheduler, AdafactorSchedule)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(lrs) == 3 and lrs[-1] > 0
    assert _max_diff(params, w.params_of(model)) <= 1e-6


@pytest.mark.parametrize("kw, args, match", [
    (dict(memopt_optimizer="adalomo", memopt_params={"lr": 1e-3}), {}, r"TrainingArguments\(learning_rate"),
    (dict(memopt_optimizer="adalomo", memopt_params={"weight_decay": 0.1}), {}, r"TrainingArguments\(weight_decay"),
    (dict(memopt_optimizer="adalomo", memopt_params={"betas": 1}), {}, r"'betas' is not a hyperparameter"),
    (dict(memopt_optimizer="adamw"), {}, "use transformers.Trainer"),
    (dict(memopt_optimizer="adafactor", fused_backward=True), {}, "needs LOMO or AdaLomo"),
    (dict(memopt_optimizer="adalomo", fused_backward=True), {"max_grad_norm": 1.0}, r"max_grad_norm=0"),
    (dict(memopt_optimizer="adalomo", fused_backward=True), {"max_grad_norm": 0.0, "gradient_accumulation_steps": 2},
     "gradient_accumulation_steps=1"),
    (dict(memopt_optimizer="adalomo", fused_backward=True, memopt_params={"clip_grad_norm": 1.0}),
     {"max_grad_norm": 0.0}, "drop clip_grad_norm"),
    (dict(), {}, "needs memopt_optimizer="),
], ids=["lr", "weight_decay", "unknown", "torch", "fused_adafactor", "fused_clip", "fused_accum", "fused_own_clip",
        "none"])
def test_bad_requests_are_one_line(kw, args, match):
    from memopt.integrations.hf import MemoptTrainer

    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ValueError, match=match) as err:
            MemoptTrainer(w.tiny_gpt2(), args=w.training_args(Path(tmp), save_strategy="no", **args),
                          train_dataset=w.dataset(), **kw)
    assert "\n" not in str(err.value)


def test_memopt_instance_in_optimizers_is_kept():
    import memopt
    from memopt.integrations.hf import MemoptTrainer

    model = w.tiny_gpt2()
    opt = memopt.AdaLomo(model.parameters(), lr=w.LR)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MemoptTrainer(model, args=w.training_args(Path(tmp), max_steps=1, save_strategy="no"),
                                train_dataset=w.dataset(), optimizers=(opt, None))
        trainer.train()
    assert trainer.optimizer.optimizer is opt and opt.state
