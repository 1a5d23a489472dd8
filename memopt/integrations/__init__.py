"""Integrations of memopt optimizers with data-parallel engines (DeepSpeed ZeRO, DDP, FSDP2).

* ``memopt.integrations.deepspeed.initialize``: DeepSpeed engines whose ZeRO-1/2/3 flat fp32
  partitions are bound to the logical parameters, so factored states stay exact (docs/sharding.md).
* ``memopt.integrations.ddp.register_fused_backward``: AdaLomo/LOMO fused backward under DDP.
* ``memopt.integrations.hf.MemoptTrainer``: ``transformers.Trainer`` keeping a memopt optimizer
  (bound to ZeRO partitions under ``deepspeed=``; FSDP2; fused backward) (docs/hf_trainer.md).
* FSDP2 needs no integration: memopt optimizers take its Shard(0) DTensor parameters directly,
  and ``optimizer.fused_backward(loss)`` runs its updates after FSDP2's reduce-scatter.
"""
