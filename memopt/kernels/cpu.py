"""The CPU backend of ``memopt.kernels``: ``cpu_kernels.cpp``, built on first use and cached.

Built with ``torch.utils.cpp_extension.load`` (like DeepSpeed's ops) into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so the compile (a minute on two
cores) happens once per machine and torch version; later processes load the cached library.
Flags: ``-O3 -march=native -fopenmp`` (the loops are written for the vectoriser, rows are split
over torch's OpenMP threads). The build is named after a hash of the source, so an edited
kernel is never served from a stale cache.

Without a C++ compiler (or when the build fails) ``ready()`` is False after one warning line,
and the optimizers' ``fused=None`` takes the torch reference path; ``fused=True`` then raises
``memopt.kernels.KernelUnavailable``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADER = Path(__file__).with_name("vec16.h")  # included by SOURCE: part of the build hash
FLAGS = ["-O3", "-march=native", "-fopenmp"]

#: The wrappers read 0-d tensor scalars on the host and return ``ok`` from a host bool: free on
#: CPU, so the optimizers keep their host path here (``memopt.kernels.sync_free``).
SYNC_FREE = False

_lock = threading.Lock()
#: Whether Adafactor/AdaLomo let the factored kernel take RMS(W) from the row sums it wrote last
#: step (checked and repaired in pass 2). False makes pass 1 read W, as before: for measuring it.
SPECULATE_WEIGHT_NORM = True
#: How many factored steps found W changed since their last update and repaired it (tests read it).
repairs = 0
_module = None
_failed: str | None = None


def build_name() -> str:
    """The extension's name: the source and flags hashed, so a change rebuilds."""
    digest = hashlib.sha256(SOURCE.read_bytes() + HEADER.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    return f"memopt_cpu_kernels_{digest}"


def load():
    """The compiled module (building it if needed); raises RuntimeError when it cannot be built."""
    global _module, _failed
    if _module is not None:  # the common case, asked once per parameter per step: no lock
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failed is not None:
            raise RuntimeError(_failed)
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            _failed = f"no C++ compiler ({compiler!r} not on PATH)"
            raise RuntimeError(_failed)
        from torch.utils.cpp_extension import load as cpp_load

        try:
            _module = cpp_load(name=build_name(), sources=[str(SOURCE)], extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure means "no fused CPU kernels"
            _failed = f"building {SOURCE.name} failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]})"
            raise RuntimeError(_failed) from None
        return _module


def ready() -> bool:
    """True when the kernels are built (or build now); False, warning once, when they cannot be."""
    if _module is not None:
        return True
    already_failed = _failed is not None
    try:
        load()
        return True
    except RuntimeError as exc:
        if not already_failed:
            warnings.warn(f"memopt fused CPU kernels unavailable: {exc}; using the torch path", stacklevel=3)
        return False


def _ok(value: bool) -> torch.Tensor:
    return torch.tensor(bool(value))


def _scalar(x) -> float:
    """A hyperparameter as a Python float (a 0-d CPU tensor is read: no device to wait for)."""
    return float(x)


def factored_step_host(w, g, *, sq_row=None, sq_col=None, sq=None, exp_avg=None, beta2, eps1, eps2, step_size,
                       clip_threshold, weight_decay=0.0, multiplicative_decay=False, scale_parameter=True,
                       beta1=None, weight_row_sq=None, weight_row_sq_valid=False) -> tuple[bool, float]:
    """``factored_step_`` answering (ok, scale) as Python values (``memopt.kernels.factored_step_host``).

    ``weight_row_sq``: a float tensor of one entry per row of every (m, n) matrix of ``w``
    (``w.numel() // w.shape[-1]``), where the kernel keeps the row sums of squares of the W it
    wrote; with ``weight_row_sq_valid`` (it holds those of the last update) the kernel
    speculates from it and skips reading W in its first pass (cpu_kernels.cpp, factored_step:
    checked on every row, repaired when W was written in between)."""
    global repairs
    ok, scale, repaired = load().factored_step(
        w, g, _or(sq_row, _UNDEFINED), _or(sq_col, _UNDEFINED), _or(sq, _UNDEFINED), _or(exp_avg, _UNDEFINED),
        _scalar(beta2), float(eps1), float(eps2), _scalar(step_size), float(clip_threshold), float(weight_decay),
        bool(multiplicative_decay), bool(scale_parameter), 0.0 if beta1 is None else float(beta1), beta1 is not None,
        _or(weight_row_sq, _UNDEFINED), bool(weight_row_sq_valid),
    )
    if repaired:
        repairs += 1
    return ok, scale


def factored_step_(w, g, **kw):
    ok, scale = factored_step_host(w, g, **kw)
    return _ok(ok), torch.tensor(scale, dtype=torch.float32)


def came_step_host(w, g, *, exp_avg, sq_row=None, sq_col=None, res_row=None, res_col=None, sq=None, lr, beta1,
                   beta2, beta3, eps1, eps2, clip_threshold, weight_decay=0.0) -> bool:
    return load().came_step(
        w, g, exp_avg, _or(sq_row, _UNDEFINED), _or(sq_col, _UNDEFINED), _or(res_row, _UNDEFINED),
        _or(res_col, _UNDEFINED), _or(sq, _UNDEFINED), float(lr), float(beta1), float(beta2), float(beta3),
        float(eps1), float(eps2), float(clip_threshold), float(weight_decay),
    )


def came_step_(w, g, **kw):
    return _ok(came_step_host(w, g, **kw))


def lomo_step_host(w, g, *, lr, weight_decay=0.0) -> bool:
    return load().lomo_step(w, g, float(lr), float(weight_decay))


def lomo_step_(w, g, **kw):
    return _ok(lomo_step_host(w, g, **kw))


# The empty tensor passed for a state a call does not have (the C++ side reads no element of
# it): one object, not a new one per call.
_UNDEFINED = torch.Tensor()


def _or(t, default):
    return default if t is None else t
