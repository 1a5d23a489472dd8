"""memopt.heap: the C heap's free pages returned during fused backward and after a model build."""
import ctypes
import ctypes.util
from pathlib import Path

import pytest
import torch

import memopt
from memopt import heap

GLIBC = heap.trim_available()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not GLIBC or not Path("/proc/self/status").exists(), reason="needs glibc on Linux")
def test_release_free_memory_returns_freed_heap_blocks():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 2 x 1,000 blocks of 60 kB (below any mmap threshold: heap blocks), every other one freed:
    # the live ones between them keep the freed ones from merging into the heap's top (which
    # free() itself may give back), so the freed 60 MB stays resident until malloc_trim.
    n, size = 1000, 60_000
    blocks = []
    for _ in range(2 * n):
        b = libc.malloc(size)
        ctypes.memset(b, 1, size)  # touch every page
        blocks.append(b)
    try:
        for b in blocks[0::2]:
            libc.free(b)
        resident = _rss()
        assert heap.release_free_memory() is True
        released = resident - _rss()
    finally:
        for b in blocks[1::2]:
            libc.free(b)
    assert released > 0.8 * n * size


def test_trimmer_counts_cpu_gradient_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: calls.append(1) or True)
    t = heap.HeapTrimmer(every=100)
    t.freed(torch.zeros(10))  # 40 bytes
    t.freed(torch.zeros(10))
    t.freed(torch.zeros(10, device="meta"))  # not CPU memory: not counted
    assert calls == [] and t.pending == 80
    t.freed(torch.zeros(5))  # 100 bytes: a trim, and the count starts again
    assert calls == [1] and t.pending == 0 and t.calls == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "32M"])
def test_heap_trim_every_is_checked(bad):
    with pytest.raises(ValueError, match="heap_trim_every"):
        memopt.AdaLomo([torch.nn.Parameter(torch.zeros(2, 2))], heap_trim_every=bad)


def _model_and_loss(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    loss = model(torch.randn(5, 8)).square().mean()
    return model, loss


@pytest.mark.parametrize("cls", [memopt.AdaLomo, memopt.Lomo])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_backward_trims_before_backward_and_per_gradient_bytes(monkeypatch, cls, clip):
    calls = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: calls.append(1) or True)
    model, loss = _model_and_loss()
    opt = cls(model.parameters(), lr=1e-2, clip_grad_norm=clip, heap_trim_every=1)
    opt.fused_backward(loss)
    n = len(list(model.parameters()))
    passes = 2 if clip else 1  # the norm-only pass frees every gradient too
    # every = 1 byte: one trim before backward, then one after each gradient is consumed
    assert len(calls) == 1 + passes * n == opt.heap_trimmer.calls

    # The default trims once per 32 MiB: here (a few hundred bytes of gradients) only before backward.
    calls.clear()
    model, loss = _model_and_loss()
    opt = cls(model.parameters(), lr=1e-2, clip_grad_norm=clip)
    assert opt.heap_trimmer.every == 32 * 2**20
    opt.fused_backward(loss)
    assert len(calls) == 1


def test_fused_backward_without_trims_is_the_same_update(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_free_memory", lambda: calls.append(1) or True)
    results = []
    for every in (None, 0, 1):
        model, loss = _model_and_loss()
        opt = memopt.AdaLomo(model.parameters(), lr=1e-2, heap_trim_every=every)
        assert (opt.heap_trimmer is None) == (not every)
        opt.fused_backward(loss)
        results.append([p.detach().clone() for p in model.parameters()])
    assert len(calls) == 1 + 4  # only the run with heap_trim_every=1 trimmed
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)
