"""Logging on rank 0: one JSON object per logged step in metrics.jsonl, TensorBoard events,
and a progress bar."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def peak_memory_bytes() -> int:
    """Peak GPU memory when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._file = open(out / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", file=sys.stderr, dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record.get('lr', 0):.2e}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def warn(self, message: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(f"warning: {message}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
