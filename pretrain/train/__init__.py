"""Training: engines (single, DDP, FSDP2, DeepSpeed), the loop, checkpoints, logging."""
