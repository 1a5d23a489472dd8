"""Pieces every memopt Triton kernel shares: scalar arguments that may live on the device,
deterministic reductions of per-program partial sums, and the per-parameter step scalars.

Why partial sums instead of ``tl.atomic_add``: a float atomic adds in whatever order the programs
finish, so two runs of the same step would differ in the last bits. Each program writes its
partial sum to its own slot and one program adds the slots in a fixed order: the step is
deterministic and costs one tiny extra pass over (number of programs) floats.

Layout of the ``sc`` buffer a finalize kernel writes for the update kernels of one parameter:
``sc[0]`` the RMS-clip divisor max(1, RMS(U)/clip_threshold), ``sc[1]`` the parameter scale
max(eps2, RMS(W)) (1 without ``scale_parameter``), ``sc[2]`` lr_t = step_size * scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per program of the one-dimensional (element-wise) kernels.
ELEMENT_BLOCK = 1024
#: Elements a finalize program reads per loop iteration.
FINAL_BLOCK = 1024

SC_DIV, SC_SCALE, SC_LR = 0, 1, 2
SC_SIZE = 4


@triton.jit
def load_scalar(x, IS_PTR: tl.constexpr):
    """``x`` itself (a number passed by value) or the fp32 value it points to (a device scalar)."""
    if IS_PTR:
        return tl.load(x).to(tl.float32)
    else:
        return x


@triton.jit
def is_finite(x):
    """True where x is neither inf nor nan (nan < inf is False)."""
    return tl.abs(x) < float("inf")


@triton.jit
def limit_if(limit, ok):
    """``limit`` where ``ok`` else 0: a bound for masks (``idx < limit_if(n, ok)``) that turns
    every store of a skipped step off. (An int bound, not ``mask & ok``: Triton's interpreter
    cannot broadcast a scalar bool into a block mask.)"""
    return limit * ok.to(tl.int32)


@triton.jit
def sum_parts(parts_ptr, count, BLOCK: tl.constexpr):
    """The sum of ``count`` fp32 partial sums, in slot order (deterministic)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(parts_ptr + idx, mask=idx < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def write_step_scalars(sc_ptr, ok_ptr, ok, scale, sum_u2, numel, clip_threshold, step_size):
    """Store the divisor, the scale and lr_t of one parameter (layout in the module docstring)."""
    div = tl.maximum(tl.sqrt_rn(sum_u2 / numel) / clip_threshold, 1.0)
    tl.store(sc_ptr + 0, div)
    tl.store(sc_ptr + 1, scale)
    tl.store(sc_ptr + 2, step_size * scale)
    tl.store(ok_ptr, ok)


@triton.jit
def masked_tile(pid, m, n, row_blocks, col_blocks, ok_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile of program ``pid`` of an update kernel over a stack of (m, n) matrices:
    (matrix, rows, cols, rows mask, cols mask, tile mask, element offsets), every mask off
    where the step is skipped (``ok_ptr`` False)."""
    mat = pid // (row_blocks * col_blocks)
    tile = pid % (row_blocks * col_blocks)
    rows = (tile // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tl.load(ok_ptr)
    row_in = rows < limit_if(m, ok)
    col_in = cols < limit_if(n, ok)
    offs = mat.to(tl.int64) * m * n + rows[:, None] * n + cols[None, :]
    return mat, rows, cols, row_in, col_in, row_in[:, None] & col_in[None, :], offs


@triton.jit
def decayed(w, lr_t, weight_decay, HAS_DECAY: tl.constexpr, MULT_DECAY: tl.constexpr):
    """Decoupled weight decay d = lr_t * weight_decay, rounded as ``w *= 1 - d`` (lomo_optim) with
    MULT_DECAY, else as ``w += -d * w`` (transformers, CAME): ``factored.apply_weight_decay``."""
    if HAS_DECAY:
        decay = lr_t * weight_decay
        if MULT_DECAY:
            w = w * (1.0 - decay)
        else:
            w = w + (-decay) * w
    return w


@triton.jit
def sumsq_parts_kernel(x_ptr, parts_ptr, numel, BLOCK: tl.constexpr):
    """parts[pid] = sum of x^2 over the program's block (LOMO's finiteness statistic)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
    tl.store(parts_ptr + pid, tl.sum(x * x, axis=0))


def scalar_arg(x, device) -> tuple[object, bool]:
    """(what to pass to a kernel, whether it is a pointer) for a number or a 0-d device tensor."""
    if torch.is_tensor(x):
        if x.numel() != 1 or x.device != device:
            raise ValueError(f"a tensor hyperparameter must be a 0-d tensor on {device}, got {tuple(x.shape)} on {x.device}")
        return (x if x.dtype == torch.float32 else x.float()), True
    return float(x), False


def beta_args(beta, one_minus_beta, device) -> tuple[object, object, bool]:
    """(beta, 1 - beta, is_ptr) for an EMA coefficient.

    For a number, 1 - beta is computed here in double precision, as the reference path does
    (its ``alpha=1.0 - beta``). For a device tensor it is taken from ``one_minus_beta`` when the
    caller has it (the sync-free path computes 1 - beta = t**decay_rate first: 1 - beta rounded
    from an fp32 beta near 1 would lose digits, 1e-5 relative at 0.999), else 1 - beta in fp32."""
    if not torch.is_tensor(beta):
        if torch.is_tensor(one_minus_beta):
            raise ValueError("one_minus_beta2 must be a tensor only when beta2 is one")
        return float(beta), 1.0 - float(beta), False
    beta, _ = scalar_arg(beta, device)
    if one_minus_beta is None:
        one_minus_beta = 1.0 - beta
    one_minus_beta, _ = scalar_arg(one_minus_beta, device)
    return beta, one_minus_beta, True


def check_operands(w: torch.Tensor, g: torch.Tensor, **state) -> None:
    """The backend contract's shape/dtype/layout rules; a one-line ValueError naming the culprit."""
    tensors = dict(w=w, g=g, **{k: v for k, v in state.items() if v is not None})
    for name, t in tensors.items():
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != w.device:
            raise ValueError(
                f"memopt Triton kernels need contiguous fp32 tensors on {w.device}; {name} is "
                f"{t.dtype}, {'contiguous' if t.is_contiguous() else 'not contiguous'}, on {t.device}"
            )
    if g.shape != w.shape:
        raise ValueError(f"gradient shape {tuple(g.shape)} differs from the parameter's {tuple(w.shape)}")


def empty_result(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ok=True, scale) for an empty parameter, made on the device without a host copy."""
    return (torch.ones((), dtype=torch.bool, device=w.device),
            torch.full((), scale, dtype=torch.float32, device=w.device))


def new_step_buffers(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sc, ok): the per-parameter scalars a finalize kernel writes."""
    return (torch.empty(SC_SIZE, dtype=torch.float32, device=device),
            torch.empty((), dtype=torch.bool, device=device))


def programs(numel: int, block: int) -> int:
    return triton.cdiv(numel, block)
