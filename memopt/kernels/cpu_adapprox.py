"""Adapprox's fused CPU passes (``cpu_adapprox.cpp``), built on first use and cached: the
element-wise passes of a step, and the ``lowrank_*`` passes that form G*G, V, the residual and
Vhat = Q U^T per row block instead of through an m x n buffer.

A separate extension from ``cpu_kernels.cpp`` (Adafactor, CAME, LOMO) because it is built with
``-ffp-contract=off``: its kernels reproduce the torch path's element-wise bits
(``memopt.adapprox_ops.uhat_`` and ``apply_update``), which a compiler-fused multiply-add would
change. Built like ``memopt.kernels.cpu`` into ``TORCH_EXTENSIONS_DIR``, named after a hash of
the source and flags. Without a compiler, or when the build fails, ``ready()`` is False after one
warning and Adapprox runs its torch ops.

The wrappers take the same arguments as the torch functions they replace, so
``memopt.adapprox`` calls either with one line.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_adapprox.cpp")
HEADER = Path(__file__).with_name("vec16.h")  # included by SOURCE: part of the build hash
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

#: Whether Adapprox forms V, the residual and Vhat = Q U^T per row block inside the kernels'
#: passes (the ``lowrank_*`` kernels: a projection step then needs no GEMM through the m x n
#: buffer, a sketch step two fewer), or takes them from torch GEMMs through the buffer (False:
#: the path before them, for measuring it).
LOWRANK_PASSES = True

_lock = threading.Lock()
_state: dict = {}  # "module" once built, or "error" (a one-line reason) once it failed


def _build():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH)")
    from torch.utils.cpp_extension import load as cpp_load

    digest = hashlib.sha256(SOURCE.read_bytes() + HEADER.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    try:
        return cpp_load(name=f"memopt_cpu_adapprox_{digest}", sources=[str(SOURCE)], extra_cflags=FLAGS,
                        extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the torch ops"
        last = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise RuntimeError(f"building {SOURCE.name} failed ({type(exc).__name__}: {last})") from None


def ready() -> bool:
    """True when the kernels are built (building them now if needed); False, warning once, if not."""
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _build()
            except RuntimeError as exc:
                _state["error"] = str(exc)
                warnings.warn(f"memopt Adapprox CPU kernels unavailable: {exc}; using torch ops", stacklevel=3)
        return "module" in _state


def unavailable_reason() -> str | None:
    """Why ``ready()`` is False (None while it is True or has not been asked)."""
    return _state.get("error")


def square_sum(g: torch.Tensor, out: torch.Tensor) -> float:
    """out = g*g; returns sum(g*g) (accumulated in double; inf/nan when g is not finite)."""
    return _state["module"].square_sum(g, out)


def uhat_sumsq_(vhat: torch.Tensor, g: torch.Tensor, group: dict, eps: float) -> float:
    """``memopt.adapprox_ops.uhat_`` in one pass: ``vhat`` (Q U^T) becomes Uhat in place.
    Returns sum Uhat^2 (double accumulation), which the torch path takes as a separate norm."""
    return _state["module"].uhat_sumsq(vhat, g, _floor_c(group), float(eps))


def apply_update_(w: torch.Tensor, uhat: torch.Tensor, exp_avg: torch.Tensor | None, u_scale: float, group: dict,
                  step_size: float) -> None:
    """``memopt.adapprox_ops.apply_update`` (steps 6-7) in one pass over W, Uhat and M."""
    decay, beta1, m_scale, w_scale = _update_scalars(exp_avg is not None, u_scale, group, step_size)
    has_m = exp_avg is not None
    _state["module"].apply_update(w, uhat, exp_avg if has_m else uhat, has_m, decay, beta1, m_scale, w_scale)


def _update_scalars(has_m: bool, u_scale: float, group: dict, step_size: float) -> tuple[float, float, float, float]:
    """(decay, beta1, m_scale, w_scale) of ``adapprox_ops.apply_update``: W = decay*W, then
    M = beta1*M + m_scale*Uhat, W += w_scale*M (or W += w_scale*Uhat without M)."""
    beta1 = group["betas"][0]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if not has_m:
        return decay, beta1, 0.0, -group["lr"] * u_scale
    return decay, beta1, (1.0 - beta1) * u_scale, -step_size


# -- projection steps (resketch_every > 1, between sketches): no m x n buffer -------------------
def lowrank_gram(g: torch.Tensor, q: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(sum G*G, Z = Q^T (G*G)) for g (B, m, n), q (B, m, k): Z is (B, k, n), G read once."""
    return _state["module"].lowrank_gram(g, q)


def _floor_c(group: dict) -> float:
    return 1.0 - group["betas"][1] if group["vhat_floor"] == "grad" else -1.0


def lowrank_uhat_sumsq_(g: torch.Tensor, q: torch.Tensor, ut: torch.Tensor, out: torch.Tensor, group: dict,
                        eps: float) -> float:
    """``out`` = Uhat for Vhat = Q U^T (``ut`` = U^T, (B, k, n)), floored as ``uhat_sumsq_``;
    returns sum Uhat^2. Vhat is formed in registers, 8 rows x 16 columns at a time, never stored."""
    return _state["module"].lowrank_uhat_sumsq(g, q, ut, out, _floor_c(group), float(eps))


def lowrank_sketch_uhat_(g: torch.Tensor, q: torch.Tensor, u: torch.Tensor, q_prev: torch.Tensor,
                         u_prev: torch.Tensor, out: torch.Tensor, group: dict, eps: float,
                         scale: float) -> tuple[float, list[float], list[float]]:
    """A sketch step's ``residual_norms_``, ``Q U^T`` and ``uhat_sumsq_`` in one pass over G:
    ``out`` = Uhat, and (sum Uhat^2, per matrix |V/scale|^2, per matrix |(V - Q U^T)/scale|^2)
    with V = (1-beta2) G*G + beta2 Q_prev U_prev^T formed per row block, never stored.
    q, q_prev (B, m, k), (B, m, k'); u, u_prev (B, n, k), (B, n, k'); k' may be 0."""
    ut = u.mT.contiguous()
    ut_prev = u_prev.mT.contiguous() if u_prev.shape[-1] else u_prev
    return _state["module"].lowrank_sketch_uhat(g, q.contiguous(), ut, q_prev.contiguous(), ut_prev, out,
                                                group["betas"][1], float(scale), _floor_c(group), float(eps))


def sum_squares(g: torch.Tensor) -> float:
    """sum(g*g) in double (inf/nan when g holds one, or when a square overflows)."""
    return _state["module"].sum_squares(g)


#: The widest block the S-RSI product kernels take (columns of X or Y): wider sketches use the
#: torch GEMMs through the buffer.
MAX_SKETCH_COLUMNS = 64


def lowrank_operator(g: torch.Tensor, q_prev: torch.Tensor, u_prev: torch.Tensor, beta2: float):
    """``lowrank.second_moment_operator`` for V = beta2 Q_prev U_prev^T + (1-beta2) G*G with the
    G*G products taken by the kernels from G itself (no m x n buffer): (X -> V X, Y -> V^T Y) for
    X (B, n, r), Y (B, m, r), r <= MAX_SKETCH_COLUMNS."""
    mod = _state["module"]
    history = q_prev.shape[-1] > 0 and beta2 != 0.0

    def apply_v(x):
        r = x.shape[-1]
        xp = x.new_zeros(*x.shape[:-1], -(-r // 16) * 16)  # padded to whole 16-float vectors
        xp[..., :r] = x
        out = mod.lowrank_sx(g, xp)[..., :r].mul_(1.0 - beta2)
        if history:
            out.baddbmm_(q_prev, torch.bmm(u_prev.mT, x), alpha=beta2)
        return out

    def apply_vt(y):
        z = mod.lowrank_gram(g, y.contiguous())[1].mul_(1.0 - beta2)  # (B, r, n)
        if history:
            z.baddbmm_(torch.bmm(y.mT, q_prev), u_prev.mT, alpha=beta2)
        return z.mT

    return apply_v, apply_vt
