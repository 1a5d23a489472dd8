"""The CUDA backend of ``memopt.kernels``: Triton kernels with the signatures of that package's
docstring (``factored_step_``, ``came_step_``, ``lomo_step_``) and ``ready()``.

Every decision of a step (skip a non-finite gradient, the RMS clip, lr_t = step_size * RMS(W),
the new factors) is made on the device: no function here reads a device value back to the host.
The kernels live in ``triton_factored`` (Adafactor, AdaLomo), ``triton_came``, ``triton_lomo`` and
``triton_dense`` (parameters of fewer than two dims). They also run on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how the
parity tests check them without a GPU (tests/memopt/test_triton_kernels.py).

Adapprox has no kernel here: its step is dominated by the S-RSI sketch's GEMMs and QRs, which
``memopt.lowrank`` already runs as batched ``torch.bmm`` / ``torch.linalg.qr`` over every matrix
of a parameter (cuBLAS / cuSOLVER on CUDA); a hand-written Triton GEMM would not beat them.
"""
from __future__ import annotations

import warnings

import torch

from .triton_came import came_step_
from .triton_factored import factored_rows_kernel, factored_step_
from .triton_lomo import lomo_step_

__all__ = ["SYNC_FREE", "came_step_", "factored_step_", "interpreted", "lomo_step_", "ready"]

#: No wrapper reads a device value (``memopt.kernels.sync_free``).
SYNC_FREE = True

_warned = False


def interpreted() -> bool:
    """True when the kernels run under Triton's interpreter (CPU tensors, slow, for tests).
    Triton decides it when a kernel is decorated, i.e. when these modules were imported."""
    return type(factored_rows_kernel).__name__ == "InterpretedFunction"


def ready() -> bool:
    """True when the kernels can run here: a CUDA device, or the interpreter. Warns once if not."""
    global _warned
    if interpreted() or torch.cuda.is_available():
        return True
    if not _warned:
        warnings.warn("memopt Triton kernels need a CUDA device (or TRITON_INTERPRET=1); using the torch path")
        _warned = True
    return False
