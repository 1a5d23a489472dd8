"""One rank of tests/memopt/test_hf_trainer.py, started by torch.distributed.run (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 hf_trainer_worker.py OUT MODE

MODE ``deepspeed``: three runs in turn on a tiny GPT2LMHeadModel with AdaLomo under DeepSpeed
ZeRO-2 (each rank records the batches it trains on, and the loss of every step):
  1. ``MemoptTrainer`` for STEPS steps, saving a Trainer checkpoint at step SAVE_AT;
  2. a fresh ``MemoptTrainer`` resumed from that checkpoint to STEPS;
  3. the project's own route: ``memopt.integrations.deepspeed.initialize`` with the same DeepSpeed
     config, replaying run 1's batches (``loss = engine(**batch).loss; engine.backward; engine.step``).
MODE ``ddp`` (CPU) / ``fsdp2`` (accelerators: accelerate runs FSDP on those only): ``MemoptTrainer``
  with ordinary and with fused backward; the test replays the batches on a single process.
Rank 0 writes OUT/result_MODE.pt with what the test compares.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

STEPS, SAVE_AT, MICRO_BATCH, SEQ, VOCAB = 4, 2, 2, 16, 64
LR = 3e-2


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def dataset(n: int = 32):
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


class Recorder:
    """Each training forward's inputs and loss on this rank (Trainer rounds the logged loss).

    The inputs include Trainer's ``num_items_in_batch`` (the loss is the token sum over it), so a
    replay computes the same loss."""

    def __init__(self, model):
        self.batches, self.losses = [], []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        if module.training:
            self.batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()
                                 if k in ("input_ids", "labels", "attention_mask", "num_items_in_batch")})
            self.losses.append(float(out.loss.detach()))


def training_args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=MICRO_BATCH,
                learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="steps",
                save_steps=SAVE_AT, save_only_model=False, average_tokens_across_devices=False,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
}


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def deepspeed_runs(out: Path) -> dict:
    import deepspeed.ops

    from memopt.integrations.hf import MemoptTrainer

    # CPU: keep DeepSpeed from JIT-compiling its shared-memory all-reduce (gloo is enough).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    res = {"errors": {}}
    # 0. what Trainer cannot honour under DeepSpeed is refused before anything runs
    refused = {"optimizer_section": (dict(DS_CONFIG, optimizer={"type": "AdamW", "params": {"lr": LR}}), {}),
               "fused": (dict(DS_CONFIG), {"fused_backward": True})}
    for case, (cfg, kw) in refused.items():
        try:
            MemoptTrainer(tiny_gpt2(), args=training_args(out / "refused", deepspeed=cfg, max_grad_norm=0.0),
                          train_dataset=dataset(), memopt_optimizer="adalomo", **kw)
        except ValueError as e:
            res["errors"][case] = str(e)
    # 1. MemoptTrainer under ZeRO-2, uninterrupted, a checkpoint at SAVE_AT
    model = tiny_gpt2()
    rec = Recorder(model)
    trainer = MemoptTrainer(model, args=training_args(out / "run", deepspeed=dict(DS_CONFIG)), train_dataset=dataset(),
                            memopt_optimizer="adalomo")
    trainer.train()
    opt = trainer.memopt_optimizer
    res["trainer"] = params_of(model)
    res["trainer_losses"], batches = rec.losses, rec.batches
    res["bound"] = len(opt.fragments)
    res["state_bytes"] = opt.state_bytes()
    res["optimizer_type"] = type(trainer.optimizer.optimizer.optimizer).__name__  # accelerate > ZeRO > client
    res["logged_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["checkpoints"] = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
    # 2. a fresh MemoptTrainer resumed from the step-SAVE_AT checkpoint
    model = tiny_gpt2(seed=123)  # other initial weights: the checkpoint must bring them back
    rec = Recorder(model)
    trainer = MemoptTrainer(model, args=training_args(out / "run", deepspeed=dict(DS_CONFIG)), train_dataset=dataset(),
                            memopt_optimizer="adalomo")
    trainer.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{SAVE_AT}"))
    res["resumed"] = params_of(model)
    res["resumed_losses"] = rec.losses
    # 3. the project's own DeepSpeed route on run 1's batches
    from memopt.integrations.deepspeed import initialize

    model = tiny_gpt2()
    cfg = dict(DS_CONFIG, train_micro_batch_size_per_gpu=MICRO_BATCH, gradient_accumulation_steps=1,
               gradient_clipping=1.0)
    engine, *_ = initialize(model=model, optimizer="adalomo", optimizer_params={"lr": LR}, config=cfg)
    losses = []
    for b in batches:
        loss = engine(**b).loss
        losses.append(float(loss.detach()))
        engine.backward(loss)
        engine.step()
    res["reference"] = params_of(model)
    res["reference_losses"] = losses
    return res


def data_parallel_runs(out: Path, fsdp2: bool) -> dict:
    """``MemoptTrainer`` with ordinary and with fused backward, under accelerate's DDP (on CPU,
    where accelerate turns an FSDP request into DDP) or FSDP2 (on accelerators)."""
    from torch.distributed.tensor import DTensor

    from memopt.integrations.hf import MemoptTrainer

    res = {}
    kw = dict(max_grad_norm=0.0, save_strategy="no")
    if fsdp2:
        kw.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True}, use_cpu=False)
    for fused in (False, True):
        model = tiny_gpt2()
        rec = Recorder(model)
        trainer = MemoptTrainer(model, args=training_args(out / f"dp_{fused}", **kw), train_dataset=dataset(),
                                memopt_optimizer="adalomo", fused_backward=fused)
        trainer.train()
        res[("wrapper", fused)] = type(trainer.model_wrapped).__name__
        res[("sharded", fused)] = all(isinstance(p, DTensor) for g in trainer.memopt_optimizer.param_groups
                                      for p in g["params"])
        res[("params", fused)] = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
                                  for n, p in trainer.model.named_parameters()}
        res[("losses", fused)] = rec.losses
        res[("batches", fused)] = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in rec.batches]
    return res


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "deepspeed":
        res = deepspeed_runs(out)
    else:
        res = data_parallel_runs(out, fsdp2=mode == "fsdp2")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, res)
    if dist.get_rank() == 0:
        torch.save(gathered, out / f"result_{mode}.pt")


if __name__ == "__main__":
    main()
