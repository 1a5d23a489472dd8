"""Stochastic rounding of fp32 updates into bf16 weights, from a counter-based RNG.

Pure-bf16 training (the LOMO papers' memory-minimal mode) loses every update smaller than half
a bf16 step of the weight (about 0.2-0.4% of it) when the fp32 result is rounded to nearest.
Rounding up with probability (x - down) / (up - down) instead keeps the expectation of the
written weight equal to the fp32 result, so small updates survive on average.

The random bits are a hash of (seed, parameter index, step, element index), never torch's global
RNG state: the same (seed, step) gives the same bits whatever the sharding layout (the element
index is the position in the full logical tensor, not in a shard), the same after a resume
(the step is the optimizer state's), and on every device. It is all integer tensor arithmetic on
the weights' device, so the sync-free path stays free of host syncs.

    w_bf16.copy_(stochastic_round_bf16(w32, seed=0, index=3, step=7))   # one parameter
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Elements rounded per block: bounds the int64 temporaries (about three of a block's size) to a
# few MiB on CPU whatever the parameter; larger on accelerators, where each block is ~25 launches.
_BLOCK_CPU = 1 << 18
_BLOCK_ACCELERATOR = 1 << 22


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (works on ints and tensors)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x):
    """A 32-bit integer mixer ("lowbias32", C. Wellons): a bijection with strong avalanche.

    ``x``: a Python int or an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32_(x: torch.Tensor, c: int) -> None:
    """``_mul32`` in place on an int64 tensor (one temporary)."""
    hi = x >> 16
    x.bitwise_and_(0xFFFF).mul_(c)
    hi.mul_(c).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    x.add_(hi).bitwise_and_(_MASK32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """``hash32`` in place on an int64 tensor (the per-element hot path); returns ``x``."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def rounding_key(seed: int, index, step):
    """The per-(parameter, step) key: ``index`` and ``step`` are ints or int/float tensors of one
    shape (one entry per stacked parameter); the result has that shape."""
    if torch.is_tensor(step):
        step = step.to(torch.int64)
    if torch.is_tensor(index):
        index = index.to(torch.int64)
    return hash32(hash32(hash32(seed & _MASK32) ^ (index & _MASK32)) ^ (step & _MASK32))


def random_bits16(key, start: int, numel: int, device, window: tuple[int, int, int] | None = None) -> torch.Tensor:
    """16 random bits (int64 in [0, 2**16)) for elements ``start .. start + numel`` of the logical
    tensor(s) under ``key`` (an int, or an (N,) tensor: then the result is (N, numel)).

    ``window`` = (width, n, first column): the positions count over a column window of a
    row-major (rows, n) tensor (a tensor-parallel slice of columns) and are mapped to the full
    tensor's, so a slice draws the bits the full tensor draws for the same elements."""
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    if window is not None:
        width, n, col0 = window
        idx = torch.div(idx, width, rounding_mode="floor") * n + col0 + torch.remainder(idx, width)
    if torch.is_tensor(key):
        key, idx = key.reshape(-1, 1), idx.reshape(1, -1)
    if start + numel > _MASK32:  # beyond 2**32 elements: the high word joins the key
        key = key ^ hash32(idx >> 32)
    return _hash32_(idx.bitwise_and(_MASK32) ^ key).bitwise_right_shift_(16)  # the better-mixed half


def round_with_bits(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """bf16 of fp32 ``x`` rounded up in magnitude with probability (dropped low 16 bits) / 2**16.
    ``bits16`` (int64, broadcastable to ``x``) is consumed.

    Adding a uniform 16-bit number to the low half of the fp32 pattern and truncating is exactly
    that (the pattern is sign-magnitude, so both signs round away from zero alike); the carry
    walks into the exponent correctly, inf stays inf, and NaN is kept as NaN."""
    bits = bits16.add_(x.view(torch.int32)).bitwise_and_(~0xFFFF)  # in place: the bits are used once
    rounded = bits.to(torch.int32).view(torch.float32)
    rounded = torch.where(torch.isnan(x), x, rounded)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def stochastic_round_bf16(x: torch.Tensor, seed: int, index, step, start: int = 0,
                          window: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x`` (fp32) stochastically rounded to bf16.

    One parameter: ``index`` and ``step`` are ints (or 0-d tensors) and ``x`` holds its elements
    ``start ..`` (a shard holds its own range of the flattened logical tensor). A stack of N
    parameters of one shape: ``x`` is (N, ...), ``index`` and ``step`` (N,) tensors. ``window``:
    see ``random_bits16`` (``start`` then counts over the window)."""
    stacked = torch.is_tensor(index) and index.dim() == 1
    key = rounding_key(seed, index, step)
    flat = x.detach().reshape(x.shape[0] if stacked else 1, -1)
    out = torch.empty(flat.shape, dtype=torch.bfloat16, device=x.device)
    rows, n = flat.shape
    block = _BLOCK_CPU if x.device.type == "cpu" else _BLOCK_ACCELERATOR
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        bits = random_bits16(key, start + lo, hi - lo, x.device, window).reshape(rows, hi - lo)
        out[:, lo:hi] = round_with_bits(flat[:, lo:hi].contiguous(), bits)
    return out.reshape(x.shape)


# -- what memopt.base calls where an fp32 result is written into a low-precision weight ---------
def rounds_stochastically(group: dict, dst: torch.Tensor) -> bool:
    return bool(group.get("stochastic_rounding")) and dst.dtype == torch.bfloat16


def write_back_(dst: torch.Tensor, work: torch.Tensor, group: dict, index: int | None, step, start: int = 0,
                window: tuple[int, int, int] | None = None) -> None:
    """``dst.copy_(work)``: rounded to nearest, or stochastically when the group asks for it
    (bf16 weights), ``work`` then holding elements ``start ..`` of logical parameter ``index``
    (of its column ``window``, if given: see ``random_bits16``)."""
    if rounds_stochastically(group, dst):
        work = stochastic_round_bf16(work, group["rounding_seed"], index, step, start, window)
    dst.copy_(work)


class IndexTensors:
    """Parameters' logical indices as cached 0-d int64 tensors on their device (made by a fill,
    not a host-to-device copy), so the sync-free path builds its rounding keys on the device."""

    def __init__(self, index_of):
        self.index_of = index_of
        self.cache: dict[torch.Tensor, torch.Tensor] = {}

    def stack(self, params) -> torch.Tensor:
        out = []
        for p in params:
            t = self.cache.get(p)
            if t is None or t.device != p.device:
                t = self.cache[p] = torch.full((), self.index_of(p), dtype=torch.int64, device=p.device)
            out.append(t)
        return torch.stack(out)


def write_back_stack_(ps: list, ws: list, group: dict, indices: IndexTensors, t: torch.Tensor) -> None:
    """``write_back_`` for N whole parameters of one shape at (N,) steps ``t`` (the sync-free path)."""
    if rounds_stochastically(group, ps[0]):
        ws = stochastic_round_bf16(torch.stack(ws), group["rounding_seed"], indices.stack(ps), t).unbind(0)
    torch._foreach_copy_(ps, ws)


def check_rounding_options(stochastic_rounding, rounding_seed) -> None:
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int) or rounding_seed < 0:
        raise ValueError(f"rounding_seed must be an integer >= 0, got {rounding_seed!r}")
