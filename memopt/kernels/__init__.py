"""Fused optimizer kernels: the one interface the optimizers call when ``fused`` is on.

Each function is the *whole* update of one parameter (statistics, non-finite check, RMS clip,
step size, weight decay, write-back) in one or two passes over memory, instead of the
reference path's sequence of torch ops. The backend is chosen by the device of ``w``:

* ``"cpu"``  -> ``memopt.kernels.cpu``: C++ with OpenMP, compiled on first use with
  ``torch.utils.cpp_extension.load_inline`` and cached under ``TORCH_EXTENSIONS_DIR``
  (default ``~/.cache/torch_extensions``). No compiler: ``available("cpu")`` is False, with a
  one-line warning, and ``fused=None`` falls back to the reference path.
* ``"cuda"`` -> ``memopt.kernels.triton`` when it imports (Triton installed), same signatures.

Contract shared by every backend (the CPU one is the numerical reference for the others):

* ``w`` is the fp32 parameter (contiguous), updated in place; ``g`` its fp32 gradient, same
  shape, contiguous, **never modified**. State tensors are fp32, contiguous, on ``w``'s device,
  updated in place.
* The result is exactly (<= 1e-6 relative) the reference path's ``_update`` of
  ``memopt.adafactor`` / ``memopt.came`` / ``memopt.lomo`` (foreach=False): same order of
  operations per element, sums may be accumulated in a different order (or in fp64).
* A gradient holding inf/nan changes **nothing** (``w`` and every state tensor keep their old
  bits) and the call returns ok=False. ``ok`` is a 0-d bool tensor on ``w``'s device, so a
  CUDA backend need not synchronise; the caller counts the skip.
* Hyperparameters are Python numbers. ``beta2`` and ``step_size`` (they depend on the step count,
  a device tensor on the sync-free path) may also be 0-d fp32 tensors on ``w``'s device.
* Shapes: ``w.dim() >= 2`` is a batch of (m, n) matrices over the last two dims, each with its
  own factors (``sq_row`` shaped ``w.shape[:-1]``, ``sq_col`` shaped ``w.shape[:-2] + w.shape[-1:]``);
  the RMS clip and RMS(W) are over the whole tensor. ``w.dim() < 2`` uses the dense second moment
  ``sq`` (shape of ``w``). Empty tensors are allowed (nothing to update; ok=True).

Functions:

``factored_step_(w, g, *, sq_row, sq_col, sq, exp_avg, beta2, eps1, eps2, step_size,
clip_threshold, weight_decay, multiplicative_decay, scale_parameter, beta1) -> (ok, scale)``
    Adafactor and AdaLomo (ALGORITHMS.md). ``sq_row``/``sq_col`` for >= 2-D ``w`` (``sq`` None),
    ``sq`` for < 2-D (the others None). r = b2*r + (1-b2)*(rowmean(G^2)+eps1), likewise c (or
    v = b2*v + (1-b2)*(G^2+eps1)); U = G * rsqrt(r/mean(r)) * rsqrt(c) (or G*rsqrt(v));
    U /= max(1, RMS(U)/clip_threshold); lr_t = step_size * scale with scale = max(eps2, RMS(W))
    (W before the update) when ``scale_parameter``, else scale = 1; decay d = lr_t*weight_decay as
    ``w *= 1 - d`` when ``multiplicative_decay`` (lomo_optim) else ``w += -d*w`` (transformers);
    with ``beta1`` (not None) M = beta1*M + (1-beta1)*U into ``exp_avg`` and W -= lr_t*M, else
    W -= lr_t*U. Returns ok and ``scale`` (0-d fp32 tensor; Adafactor's ``_get_lr`` reports it).

``came_step_(w, g, *, exp_avg, sq_row, sq_col, res_row, res_col, sq, lr, beta1, beta2, beta3,
eps1, eps2, clip_threshold, weight_decay) -> ok``
    CAME: U as above with constant ``beta2`` (no parameter scale), clipped; M = b1*M + (1-b1)*U;
    for >= 2-D the instability (U-M)^2 + eps2 gets its own factored EMA (beta3) into
    ``res_row``/``res_col`` and W += -lr*wd*W; W -= lr * M * rsqrt(R/mean(R)) * rsqrt(C); for
    < 2-D (``sq`` given, res_* None) W += -lr*wd*W; W -= lr*M.

``lomo_step_(w, g, *, lr, weight_decay) -> ok``
    LOMO: W *= 1 - lr*weight_decay (when weight_decay), W -= lr*G, in one pass; non-finite G
    leaves W unchanged.

``available(device) -> bool`` says whether a backend exists for ``device`` (a str or
torch.device); the first CPU call compiles the C++ module (seconds to a minute, once per
machine). ``KernelUnavailable`` is what a call raises where none does. ``sync_free(device)``
says whether its backend reads nothing back to the host (Triton: the optimizers' ``fused=True``
then keeps step counters and step scalars on the device too, ``memopt.fused_path``, and makes no
host sync; the C++ backend reads its scalars itself, which costs nothing on CPU).
"""
from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["KernelUnavailable", "available", "backend", "came_step_", "came_step_host", "factored_step_",
           "factored_step_host", "lomo_step_", "lomo_step_host", "sync_free"]


class KernelUnavailable(RuntimeError):
    """No fused kernel backend for this device (no compiler, no Triton, or another device type)."""


_BACKEND_MODULES = {"cpu": "memopt.kernels.cpu", "cuda": "memopt.kernels.triton"}
_loaded: dict[str, object | None] = {}
# The same answers keyed by the device object the caller passed: the per-parameter path asks
# for every parameter on every step, and building torch.device(...) each time costs more.
_by_device: dict[object, object | None] = {}


def backend(device):
    """The backend module for ``device`` (one of ``_BACKEND_MODULES``), or None; cached.

    A backend module exposes ``ready() -> bool`` (False, having warned once, when it cannot run
    here), ``SYNC_FREE`` (``sync_free``) and the three step functions with the signatures of this
    module's docstring."""
    try:
        return _by_device[device]
    except (KeyError, TypeError):  # not asked yet, or an unhashable device spec
        pass
    mod = _backend_of_kind(torch.device(device).type)
    try:
        _by_device[device] = mod
    except TypeError:
        pass
    return mod


def _backend_of_kind(kind: str):
    if kind not in _loaded:
        name = _BACKEND_MODULES.get(kind)
        mod = None
        if name is not None:
            try:
                mod = importlib.import_module(name)
            except ImportError as exc:
                warnings.warn(f"memopt fused kernels for {kind} are unavailable ({exc}); using the torch path")
            if mod is not None and not mod.ready():
                mod = None
        _loaded[kind] = mod
    return _loaded[kind]


def available(device) -> bool:
    """True when fused kernels run on ``device`` (compiles the CPU module on first call)."""
    return backend(device) is not None


def sync_free(device) -> bool:
    """True when the backend for ``device`` reads no device value back to the host (Triton), so
    a caller gains by passing its step scalars as device tensors and leaving ``ok`` unread."""
    mod = backend(device)
    return mod is not None and mod.SYNC_FREE


def _require(w: torch.Tensor):
    mod = backend(w.device)
    if mod is None:
        raise KernelUnavailable(
            f"memopt fused kernels are not available for {w.device.type} tensors here; "
            "pass fused=False (or leave fused=None) to use the torch path"
        )
    return mod


def factored_step_(w, g, **kw):
    """Adafactor / AdaLomo update of one parameter (see the module docstring)."""
    return _require(w).factored_step_(w, g, **kw)


def came_step_(w, g, **kw):
    """CAME update of one parameter (see the module docstring)."""
    return _require(w).came_step_(w, g, **kw)


def lomo_step_(w, g, **kw):
    """LOMO update of one parameter (see the module docstring)."""
    return _require(w).lomo_step_(w, g, **kw)


# The host path's calls (the per-parameter path with a backend that is not ``sync_free``, i.e.
# the C++ one): the same updates, answering with Python values ((ok, scale) as bool and float,
# or ok as bool) instead of 0-d tensors the caller would read straight back. A backend without
# ``*_host`` functions is answered through its tensor functions.
def factored_step_host(w, g, **kw) -> tuple[bool, float]:
    mod = _require(w)
    if hasattr(mod, "factored_step_host"):
        return mod.factored_step_host(w, g, **kw)
    # The row-sum cache (weight_row_sq*) is the C++ backend's alone: others recompute RMS(W).
    kw.pop("weight_row_sq", None)
    kw.pop("weight_row_sq_valid", None)
    ok, scale = mod.factored_step_(w, g, **kw)
    return bool(ok), float(scale)


def came_step_host(w, g, **kw) -> bool:
    mod = _require(w)
    return mod.came_step_host(w, g, **kw) if hasattr(mod, "came_step_host") else bool(mod.came_step_(w, g, **kw))


def lomo_step_host(w, g, **kw) -> bool:
    mod = _require(w)
    return mod.lomo_step_host(w, g, **kw) if hasattr(mod, "lomo_step_host") else bool(mod.lomo_step_(w, g, **kw))
