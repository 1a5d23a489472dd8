"""Measurements the trainer logs (the logging itself is done by callbacks: callbacks.py)."""
from __future__ import annotations

import resource

import torch


def peak_memory_bytes() -> int:
    """Peak GPU memory when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
