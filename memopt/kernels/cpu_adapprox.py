"""Adapprox's fused element-wise CPU passes (``cpu_adapprox.cpp``), built on first use and cached.

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
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict = {}  # "module" once built, or "error" (a one-line reason) once it failed


def _build():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH)")
    from torch.utils.cpp_extension import load as cpp_load

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
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
    floor_c = 1.0 - group["betas"][1] if group["vhat_floor"] == "grad" else -1.0
    return _state["module"].uhat_sumsq(vhat, g, floor_c, float(eps))


def apply_update_(w: torch.Tensor, uhat: torch.Tensor, exp_avg: torch.Tensor | None, u_scale: float, group: dict,
                  step_size: float) -> None:
    """``memopt.adapprox_ops.apply_update`` (steps 6-7) in one pass over W, Uhat and M."""
    beta1 = group["betas"][0]
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if exp_avg is None:
        m_scale, w_scale = 0.0, -group["lr"] * u_scale
    else:
        m_scale, w_scale = (1.0 - beta1) * u_scale, -step_size
    has_m = exp_avg is not None
    _state["module"].apply_update(w, uhat, exp_avg if has_m else uhat, has_m, decay, beta1, m_scale, w_scale)
