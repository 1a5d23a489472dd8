"""Randomized low-rank approximation of Adapprox's second moment, as pure functions.

Adapprox (ALGORITHMS.md) keeps its second moment as Q (m x k) and U (n x k) with V ~ Q U^T.
Each step the new second moment is the operator

    V = beta2 * Q U^T + (1 - beta2) * S,        S = G*G (element-wise),

and S-RSI compresses it back to rank k. Everything here works on *stacks* of matrices, shapes
(B, m, n), (B, m, k), (B, n, k), so a tensor with leading dims is handled in one batched call
(B = 1 for a plain matrix).

V is never formed here: the sketch only needs the products V X and V^T Y, applied through the
pieces. Both are sums of contributions, which is what the sharded step uses
(``Adapprox._sharded_update``):

* (V X)_i   = beta2 * Q_i (U^T X) + (1 - beta2) * sum_j S_ij X_j  -- row i only needs row i of
  Q and S, so a rank holding some rows of W computes exactly its rows of V X; a rank holding an
  arbitrary set of elements (a ZeRO flat fragment) computes partial row sums, and one all-reduce
  (SUM) of the m x r block completes them.
* (V^T Y)_j = beta2 * U_j (Q^T Y) + (1 - beta2) * sum_i S_ij Y_i  -- a sum over rows i: every
  rank computes the contribution of the rows (elements) it holds, and one all-reduce of the
  n x r block completes it.
The QRs act on small m x r blocks that every rank holds in full after the all-reduce, and the
sketch is drawn from a shared seed, so they run identically everywhere. ``s_rsi_steps`` is the
iteration as a generator of product requests, so one process and a sharded run share it.
"""
from __future__ import annotations

import math
from typing import Callable, Generator

import torch

MatMul = Callable[[torch.Tensor], torch.Tensor]


def v_matmul(Q: torch.Tensor, U: torch.Tensor, S: torch.Tensor, X: torch.Tensor, beta2: float) -> torch.Tensor:
    """V @ X for V = beta2 * Q U^T + (1 - beta2) * S, without forming V.

    Q (B, m, k), U (B, n, k), S (B, m, n), X (B, n, r) -> (B, m, r). k may be 0 (no history yet).
    """
    # Scale the thin X rather than the result or S: it is the cheapest place for the scalar.
    out = torch.bmm(S, X * (1.0 - beta2))
    if Q.shape[-1] > 0 and beta2 != 0.0:
        out.baddbmm_(Q, torch.bmm(U.mT, X), alpha=beta2)
    return out


def vt_matmul(Q: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, beta2: float) -> torch.Tensor:
    """V^T @ Y for V = beta2 * Q U^T + (1 - beta2) * S, without forming V.

    Q (B, m, k), U (B, n, k), S (B, m, n), Y (B, m, r) -> (B, n, r).
    """
    # Computed as (Y^T S)^T: with S row-major that GEMM streams S in its storage order and
    # measured ~2x faster on CPU than S^T @ Y for the tall 50257 x 768 embedding.
    out = torch.bmm(Y.mT * (1.0 - beta2), S)  # (B, r, n)
    if Q.shape[-1] > 0 and beta2 != 0.0:
        out.baddbmm_(torch.bmm(Y.mT, Q), U.mT, alpha=beta2)
    return out.mT


def second_moment_operator(
    Q: torch.Tensor, U: torch.Tensor, S: torch.Tensor, beta2: float
) -> tuple[MatMul, MatMul]:
    """The pair (X -> V X, Y -> V^T Y) for V = beta2 * Q U^T + (1 - beta2) * S."""
    return (lambda X: v_matmul(Q, U, S, X, beta2)), (lambda Y: vt_matmul(Q, U, S, Y, beta2))


def s_rsi_steps(
    k: int,
    power_iters: int,
    *,
    omega: torch.Tensor | None = None,
    q_start: torch.Tensor | None = None,
) -> Generator[tuple[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """S-RSI as a generator of product requests: it yields ("v", X) or ("vt", Y), is sent back
    V X or V^T Y, and returns (Q, U).

    The iteration itself (see ``s_rsi``) never touches V, so the same code runs in one process
    (``s_rsi`` answers the requests directly) and sharded (``Adapprox._sharded_update`` answers
    the requests of all parameters at once with one all-reduce per round).
    """
    if (omega is None) == (q_start is None):
        raise ValueError("s_rsi needs exactly one of omega (cold start) or q_start (warm start)")
    q = torch.linalg.qr((yield "v", omega)).Q if q_start is None else q_start
    for _ in range(power_iters):
        z = yield "vt", q
        q = torch.linalg.qr((yield "v", z)).Q
    # QR of a subspace iterate orders its columns by convergence, the leading ones first, so
    # keeping the first k columns keeps the dominant directions (ALGORITHMS.md step 2).
    # A copy: a slice would keep the whole (m, r) storage alive in the optimizer state (and
    # .contiguous() is not enough: at k = 1 the slice already counts as contiguous).
    if q.shape[-1] > k:
        q = q[..., :k].clone(memory_format=torch.contiguous_format)
    u = yield "vt", q
    return q, u.contiguous()


def project_steps(q: torch.Tensor) -> Generator[tuple[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The amortized step between sketches, as a request generator like ``s_rsi_steps``: keep the
    orthonormal basis ``q`` (B, m, k) and return (q, U = V^T q), one product. Q U^T = q q^T V is
    then the exact projection of this step's V onto last sketch's column space."""
    u = yield "vt", q
    return q, u.contiguous()


def s_rsi(
    apply_v: MatMul,
    apply_vt: MatMul,
    k: int,
    power_iters: int,
    *,
    omega: torch.Tensor | None = None,
    q_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamlined randomized subspace iteration: Q (B, m, k) orthonormal and U = V^T Q (B, n, k).

    Cold start (``omega``, a Gaussian (B, n, r) with r = k + oversampling):
        Y = V omega; repeat power_iters times: Q = qr(Y).Q; Z = V^T Q; Y = V Z;
        Q = qr(Y).Q truncated to k columns; U = V^T Q.
    Warm start (``q_start``, an orthonormal (B, m, r) basis, e.g. last step's Q plus random
    columns): the same iteration with the first QR replaced by q_start, so it costs one V
    product less and starts from a subspace that is already close when V changes slowly.

    Q U^T = Q Q^T V is then the projection of V onto the sketched k-dim column space.
    Products: 2 * power_iters + 2 (cold) or 2 * power_iters + 1 (warm); all of them are of
    V with a thin (., r) block.
    """
    return answer_requests(s_rsi_steps(k, power_iters, omega=omega, q_start=q_start), apply_v, apply_vt)


def answer_requests(steps, apply_v: MatMul, apply_vt: MatMul):
    """Run a generator of ("v", X) / ("vt", Y) requests (``s_rsi_steps``) to its end, answering
    each with ``apply_v`` / ``apply_vt``; returns what it returns."""
    request = next(steps)
    while True:
        kind, x = request
        try:
            request = steps.send(apply_v(x) if kind == "v" else apply_vt(x))
        except StopIteration as done:
            return done.value


def residual_norms_(
    S: torch.Tensor,
    Q_prev: torch.Tensor,
    U_prev: torch.Tensor,
    Q: torch.Tensor,
    U: torch.Tensor,
    beta2: float,
    scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||V||_F, ||V - Q U^T||_F) / scale per matrix, V = beta2*Q_prev U_prev^T + (1-beta2)*S.

    S (B, b, n) holds G*G for b rows (all of them, or a block) of each matrix, Q_prev (B, b, k')
    and Q (B, b, k) the same rows of the factors, U_prev (B, n, k') and U (B, n, k) whole.
    Returns two (B,) tensors. Squared norms are sums over rows, so the error over several
    row blocks is ``relative_error`` of their stacked norms, and a sharded version
    all-reduces two scalars per matrix.

    Destroys S: it is the scratch space for V / scale and then the residual / scale, so no
    memory beyond the G*G buffer is needed. ``scale`` (> 0, e.g. mean(G*G)) cancels in the
    error; it keeps the squares inside the norms away from fp32 underflow (V ~ 1e-20 when
    |G| ~ 1e-10) and overflow.

    Why the explicit residual and not the cheap identity e^2 = 1 - ||U||^2 / ||V||^2: in fp32
    the cancellation leaves noise of ~1e-7 in e^2, an error floor near 3e-4 on e. Measured on a
    768 x 768 matrix with a known tail: true e = 4.3e-4 read as 3.3e-4, true 1.7e-4 read as 0.
    That is right at the thresholds in use (xi = 1e-3, 5e-4), so the rank decision would be
    noise. The residual is accurate down to ~1e-6 for two rank-k GEMMs and two norms.
    """
    if torch.is_tensor(scale):
        # A device scale (the sync-free path): baddbmm's alpha/beta must be numbers, so the
        # scalars go onto the thin factors instead.
        V = S.mul_((1.0 - beta2) / scale)
        if Q_prev.shape[-1] > 0 and beta2 != 0.0:
            V.baddbmm_(Q_prev * (beta2 / scale), U_prev.mT)
        v_norm = torch.linalg.vector_norm(V, dim=(-2, -1))
        R = V.baddbmm_(Q * (-1.0 / scale), U.mT)
        return v_norm, torch.linalg.vector_norm(R, dim=(-2, -1))
    if Q_prev.shape[-1] > 0 and beta2 != 0.0:
        # One pass: S * (1 - beta2)/scale + Q_prev U_prev^T * beta2/scale.
        V = S.baddbmm_(Q_prev, U_prev.mT, beta=(1.0 - beta2) / scale, alpha=beta2 / scale)
    else:
        V = S.mul_((1.0 - beta2) / scale)
    v_norm = torch.linalg.vector_norm(V, dim=(-2, -1))
    R = V.baddbmm_(Q, U.mT, alpha=-1.0 / scale)
    return v_norm, torch.linalg.vector_norm(R, dim=(-2, -1))


def relative_error(v_norms: torch.Tensor, r_norms: torch.Tensor) -> torch.Tensor:
    """sqrt(sum r^2 / sum v^2) over the last dim (the row blocks of one matrix), in float64.

    An all-zero V (zero gradient, no history) is represented exactly: error 0, not 0/0. The
    test is == 0, not > 0, so that a nan norm stays nan for the caller's finiteness check.
    """
    v2 = v_norms.double().square().sum(-1)
    r2 = r_norms.double().square().sum(-1)
    return torch.where(v2 == 0, 0.0, (r2 / v2).sqrt())


def worst_error(v2: list[float], r2: list[float]) -> float:
    """``relative_error`` of a stack from its matrices' squared norms (as Python floats): the
    worst matrix's sqrt(r2 / v2), 0 for an all-zero V, nan when any norm is not finite."""
    errors = [0.0 if v == 0 else math.sqrt(r / v) if math.isfinite(r / v) else math.nan for v, r in zip(v2, r2)]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)


def next_rank(k: int, error: float, xi: float, dk: int, k_min: int, k_max: int) -> int:
    """AS-RSI rank rule: grow by dk while the error exceeds xi, otherwise shrink by dk."""
    if error > xi:
        return min(k + dk, k_max)
    return max(k - dk, k_min)
