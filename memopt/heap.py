"""Giving freed CPU memory back to the kernel during fused backward (glibc's ``malloc_trim``).

torch allocates CPU tensors with ``malloc``. With glibc's default settings, blocks above the mmap
threshold are their own mappings, returned on ``free``; but the threshold is dynamic: once a
mapped block is freed, blocks up to its size (at most 32 MiB) come from the heap from then on,
and freed heap memory stays resident. In a fused backward that is most of the traffic: every
weight gradient (a 768 x 3072 fp32 gradient is 9.4 MB) and the activations freed layer by layer
land in the heap, small requests split the freed gradient-sized blocks, so each new gradient
takes fresh pages while the freed ones stay resident. Measured at GPT-2 124M shapes, batch
1 x 128 (docs/benchmarks/memory.md): the RSS then rises through the backward instead of falling,
150 to 300 MB above the bytes torch holds.

``malloc_trim(0)`` returns the free pages inside the heap (not only its top) to the kernel,
leaving the allocator's settings alone; the next allocation there faults fresh zero pages in.
A call costs about 2 ms here, so ``HeapTrimmer`` calls it once per ``every`` bytes of freed
gradients instead of once per gradient. Where the C library is not glibc (musl, macOS) there is
no ``malloc_trim`` and every call is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

_UNLOADED = object()
_trim = _UNLOADED


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    global _trim
    if _trim is _UNLOADED:
        _trim = None
        name = ctypes.util.find_library("c")
        try:
            fn = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_size_t]
            fn.restype = ctypes.c_int
            _trim = fn
    return _trim


def trim_available() -> bool:
    """Whether this C library can return freed heap pages (glibc's ``malloc_trim``)."""
    return _malloc_trim() is not None


def release_free_memory() -> bool:
    """Return the free pages of the C heap to the kernel; False where that is not possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def check_trim_every(value) -> int | None:
    """``heap_trim_every``: None or 0 (off), or a positive number of bytes."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"heap_trim_every must be None, 0 or a positive number of bytes, got {value!r}")
    return value


class HeapTrimmer:
    """Calls ``release_free_memory`` once per ``every`` bytes of CPU gradients freed.

    GPU gradients are not counted: their memory belongs to the device allocator, which the C
    heap does not hold. ``calls`` and ``seconds`` count the trims made and the time spent in
    them (tests and tools/bench_memory.py read them)."""

    def __init__(self, every: int):
        self.every = every
        self.pending = 0
        self.calls = 0
        self.seconds = 0.0

    def release(self) -> None:
        self.pending = 0
        t0 = time.perf_counter()
        if release_free_memory():
            self.calls += 1
            self.seconds += time.perf_counter() - t0

    def freed(self, p: torch.Tensor) -> None:
        """``p``'s gradient (same size as ``p``) was just freed."""
        if p.device.type != "cpu":
            return
        self.pending += p.numel() * p.element_size()
        if self.pending >= self.every:
            self.release()
