"""Adapprox (Zhao et al., arXiv 2403.14958): Adam with a randomized low-rank second moment.

The numerical contract is the "Adapprox" section of ALGORITHMS.md; the low-rank math (S-RSI,
the products with V, the error) lives in ``memopt.lowrank`` as pure functions. See
docs/adapprox.md for measurements behind the defaults.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .base import (
    MemoptOptimizer,
    all_finite,
    is_finite,
    rms,
)
from .sharding import Reducer
from .adapprox_sync_free import AdapproxSyncFree
from .adapprox_ops import (  # noqa: F401  (sketch_seed, VHAT_FLOORS: part of this module's API)
    VHAT_FLOORS,
    apply_update,
    check_hparams,
    clip_scale,
    complete_product,
    corrections,
    cpu_kernels_for,
    first_moment,
    local_error_and_uhat,
    partial_product,
    sketch_seed,
    uhat_,
)
from .lowrank import (answer_requests, next_rank, project_steps, relative_error, residual_norms_, s_rsi_steps,
                      second_moment_operator, worst_error)


_FLT_MAX = torch.finfo(torch.float32).max


class Adapprox(AdapproxSyncFree, MemoptOptimizer):
    r"""Adapprox: AdamW whose second moment is kept as a randomized low-rank factorization.

    For every parameter with >= 2 dims, Adam's second moment V (m x n over the last two dims)
    is held as Q (m x k, orthonormal) and U (n x k) with V ~ Q U^T. Each step:

    1. V_t = beta2 * Q U^T + (1 - beta2) * G*G, applied only through products with thin blocks.
    2. S-RSI: a sketch with ``oversampling`` extra columns and power iterations gives the new
       rank-k Q, U (Q U^T = Q Q^T V_t).
    3. AS-RSI: the relative error e = ||V_t - Q U^T||_F / ||V_t||_F moves the rank for the next
       step by ``dk``: up (to ``k_max``) if e > ``xi``, else down (to ``k_min``).
    4. Vhat = max(Q U^T, (1 - beta2) * G*G) (default; see ``vhat_floor``),
       Uhat = G / (sqrt(Vhat) + eps).
    5. Uhat /= max(1, RMS(Uhat) / clip_threshold).
    6. M = beta1 * M + (1 - beta1) * Uhat   (beta1 = 0 keeps no M).
    7. W -= lr * (M + weight_decay * W).
    1-D parameters (biases, norms) keep a dense Adam second moment v = beta2*v + (1-beta2)*G*G
    and follow steps 4-7 with v in place of Q U^T.

    Tensors with more than 2 dims are a stack of independent (m, n) matrices over their last two
    dims (the convention of Adafactor/CAME here): Q is (*lead, m, k), U is (*lead, n, k), all
    sketched in one batched call. The rank k is shared by the stack and grows if any of its
    matrices misses ``xi``.

    Memory (fp32, really held, reported by ``state_bytes()``): per matrix (m, n) with B leading
    matrices, 4 * B * (m + n) * k bytes for Q and U, plus 4 * B * m * n for M when beta1 > 0;
    per vector of length n, 4 * n for v plus 4 * n for M when beta1 > 0. Q and U are allocated
    at the rank of the last sketch, not at k_max: every sketch builds them anew anyway, so a
    rank that falls to 1 really frees the memory (before the first step they hold 0 columns).
    k is capped at min(m, n). Scalars (step, rank, the last error, the skip count) are Python
    numbers. Per-step memory: one m x n fp32 buffer (G*G, then the residual, then the update)
    and a few thin (m or n) x (k + oversampling) blocks; on the fused CPU path (``fused``) the
    buffer is kept between steps, sized to the largest matrix (not in ``state_bytes()``),
    because allocating it anew cost more than a pass over it.

    Args:
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2). beta1 = 0 keeps no first moment (saves m*n per matrix).
        eps: added to sqrt(Vhat) in the denominator (default 1e-8).
        weight_decay: decoupled: W -= lr * weight_decay * W (default 0; the rebuttal runs used 0.01).
        clip_threshold: d of the RMS clip (default 1.0).
        k_max: largest rank (default 16, not the paper's 256: the authors' rebuttal found 16
            better on a 1.1B GPT-2 and mean ranks in training stay far below it;
            docs/adapprox.md, "Options and defaults").
        k_min: smallest rank (default 1).
        k_init: rank of the first sketch (default k_max: start accurate, let AS-RSI shrink it).
        xi: error threshold of the rank rule (default 1e-3). The error is computed from the
            explicit residual (``memopt.lowrank.residual_norms_``) and is reliable down to ~1e-6.
        dk: rank step (default ceil(0.02 * k_max), i.e. 1 for k_max <= 50).
        oversampling: extra sketch columns p (default 5).
        power_iters: power iterations l of a cold sketch (default 5; the authors' ablation:
            error 0.147 at l=1, 0.080 at l=5, 0.078 at l=10). Cold sketches are the first step
            of every matrix, and every step when ``warm_start=False``.
        warm_start: start the subspace iteration from last step's Q (plus ``oversampling`` and
            any newly granted rank columns of fresh Gaussian directions) instead of a fresh
            Gaussian sketch, for ``warm_power_iters`` iterations. Not in the paper; on by default
            because it measured as accurate as the cold l=5 sketch at a quarter of the products
            (docs/adapprox.md, "Warm-started sketches"). ``warm_start=False`` is the paper's procedure.
        warm_power_iters: power iterations of a warm sketch (default 1).
        resketch_every: sketch (and decide the rank) every this many steps of a parameter
            (default 1: every step, the paper's procedure). In between, the basis Q is kept
            and U = V_t^T Q is updated with one product (Q U^T is then the exact projection of
            V_t onto the last sketch's column space); the error and the rank are not recomputed
            (docs/adapprox.md, "Amortized sketches", has what it costs in approximation error).
        bias_correction: Adam's bias corrections, off by default (the paper's algorithm as far as
            it is public has none). When on, the update uses V_t / (1 - beta2^t) in place of V_t
            and M_t / (1 - beta1^t) in place of M_t, exactly as Adam does; the stored state is
            the uncorrected EMA either way. When off, the first steps' second moment is too
            small (V_1 = (1-beta2) G*G) and the RMS clip bounds the resulting large Uhat, while
            the uncorrected M starts at (1-beta1) Uhat, which acts as a short warm-up.
        vhat_floor: "grad" (default) uses Vhat = max(Q U^T, (1-beta2) G*G); "zero" is the
            contract's literal max(Q U^T, 0). The true V_t is never below (1-beta2) G*G, so the
            floor only moves Vhat towards the truth and restores Adam's bound on |Uhat|; without
            it training can stall where Q U^T dips to <= 0 (docs/adapprox.md, "Vhat floor").
        seed: global seed of the random sketches. The sketch of parameter i (its position in
            the flattened param_groups) at its step t is drawn from a private
            torch.Generator seeded with ``sketch_seed(seed, t, i)``: reproducible, identical on
            every rank of a sharded run, and the global RNG is never touched. Stored in each
            param group (so it is saved with the state dict); keep it equal across groups.
        on_nonfinite: "skip" (default: the parameter's step is skipped and counted in
            ``state["nonfinite_skips"]``) or "raise" (``memopt.base.NonFiniteGradientError``).
        foreach: None (default: True on accelerators, False on CPU), True, False. True is the
            sync-free path: every per-parameter decision (skip, scale, clip, error) is made on
            the device, and the one host sync of a step reads all the AS-RSI rank decisions (and
            skip flags) at once, at its end, because the rank sets the shapes of Q and U. The
            parameters are still sketched one by one (see docs/adapprox.md, "Step time").
        fused: None (default: on CPU, when foreach is None too and the C++ kernels build, the
            matrices' element-wise passes run as fused C++ loops, ``memopt.kernels.cpu_adapprox``;
            the GEMMs stay torch's), True (those kernels, raising ``KernelUnavailable`` where they
            do not run: another device, no compiler) or False (torch ops only). The kernels give
            the torch path's result within float round-off (docs/benchmarks/adapprox_speed.md).

    State per parameter (all fp32 tensors, full logical shapes): ``Q``, ``U`` (matrices),
    ``exp_avg_sq`` (vectors), ``exp_avg`` (when beta1 > 0); ``rank`` (the rank the next sketch
    uses; Q and U hold the rank used by the last one), ``rel_error`` (the last e, None before
    the first step), ``sketch_index`` (the parameter index in the sketch seed), ``step``,
    ``nonfinite_skips``.
    """

    supports_sharding = True
    has_fused_kernels = True
    # For memopt.checkpoint's name-keyed checkpoints: Q is indexed by rows, U by columns, and both
    # change their last dim (the rank) over training.
    state_kinds = {"Q": "row", "U": "col"}
    resizable_state = ("Q", "U")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_threshold: float = 1.0,
        k_max: int = 16,
        k_min: int = 1,
        k_init: int | None = None,
        xi: float = 1e-3,
        dk: int | None = None,
        oversampling: int = 5,
        power_iters: int = 5,
        warm_start: bool = True,
        warm_power_iters: int = 1,
        resketch_every: int = 1,
        bias_correction: bool = False,
        vhat_floor: str = "grad",
        seed: int = 0,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            clip_threshold=clip_threshold, k_max=k_max, k_min=k_min, k_init=k_init, xi=xi, dk=dk,
            oversampling=oversampling, power_iters=power_iters, warm_start=warm_start,
            warm_power_iters=warm_power_iters, resketch_every=resketch_every, bias_correction=bias_correction,
            vhat_floor=vhat_floor, seed=seed,
        )
        self._extra_indices = 0
        super().__init__(params, defaults, on_nonfinite=on_nonfinite, foreach=foreach, fused=fused)

    # -- hyperparameters ------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        # Validate the merged group *before* it is added, so a bad group leaves no trace.
        check_hparams({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _state_created(self, key, state: dict) -> None:
        """Record the index in the sketch seed of a new state: the parameter's position in the
        flattened param_groups (``logical_index``; for a ZeRO fragment, its name's binding order,
        which is the same position).

        ``_update`` sees an fp32 working copy for bf16/fp16 parameters, so the index is looked
        up once, at state creation (which sees the parameter or its name), and kept in the
        state (saved with it). A tensor that is not a managed parameter gets the next index after
        all parameters, in order of first update, which is the same on every rank of a
        data-parallel run.
        """
        index = self.logical_index(key)
        if index is None:
            index = sum(len(g["params"]) for g in self.param_groups) + len(self._fragment_index) + self._extra_indices
            self._extra_indices += 1
        state["sketch_index"] = index

    # -- state ----------------------------------------------------------------------------
    @staticmethod
    def _rank_limits(m: int, n: int, group: dict) -> tuple[int, int]:
        """(k_min, k_max) for an m x n matrix: a rank above min(m, n) adds nothing."""
        k_max = min(group["k_max"], m, n)
        return min(group["k_min"], k_max), k_max

    @classmethod
    def _initial_rank(cls, m: int, n: int, group: dict) -> int:
        """Rank of the first sketch: k_init (default k_max) within this matrix's limits."""
        k_min, k_max = cls._rank_limits(m, n, group)
        k_init = group["k_init"] if group["k_init"] is not None else group["k_max"]
        return max(k_min, min(k_init, k_max))

    def _init_state(self, p, state, group):
        kw = dict(dtype=torch.float32, device=p.device)
        if p.dim() >= 2:
            state["rank"] = self._initial_rank(p.shape[-2], p.shape[-1], group)
            state["rel_error"] = None
            # No history yet: rank-0 factors (zero bytes). V_1 = (1 - beta2) * G*G.
            state["Q"] = torch.zeros(*p.shape[:-1], 0, **kw)
            state["U"] = torch.zeros(*p.shape[:-2], p.shape[-1], 0, **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, **kw)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(p.shape, **kw)

    def _init_sharded_state(self, layout, state, group, device=None):
        """Local pieces (memopt.sharding): element-wise state for the local elements; Q for the
        row window (FSDP2 rows) or all rows (a ZeRO flat range, whose edge rows are partial),
        as (rows, k); U (B, n, k) replicated. Every rank of a flat layout keeps Q and U, also a
        rank holding no element: they are small, and identical everywhere after each step."""
        kw = dict(dtype=torch.float32, device=device)
        if layout.factored:
            state["rank"] = self._initial_rank(layout.m, layout.n, group)
            state["rel_error"] = None
            state["Q"] = torch.zeros(layout.window, 0, **kw)
            state["U"] = torch.zeros(*layout.full_shape[:-2], layout.n, 0, **kw)
        else:
            state["exp_avg_sq"] = torch.zeros(layout.length, **kw)
        if group["betas"][0] > 0:
            state["exp_avg"] = torch.zeros(layout.length, **kw)

    def _sharded_update(self, units, pg):
        """The single-process step of every unit, in rounds of one all-reduce each.

        Round 0: sum of G*G (finiteness, scale) and, for row-sharded Q, last step's Q rows.
        Sketch rounds: each parameter's S-RSI asks for V X or V^T Y; every rank adds the
        contribution of its local elements of G*G (partial row or column sums of thin blocks),
        the all-reduce completes them, and the low-rank term beta2 * Q U^T (Q, U known in full
        to every rank) is added after it. QRs then run on identical full blocks everywhere.
        The number of rounds is that of the longest sketch (3 warm, 12 cold by default), not
        the number of parameters. Last round: squared norms of V and the residual per matrix
        (the error), and of Uhat (the RMS clip); then the local update.
        """
        red = Reducer(pg)
        work = {}
        for u in units:
            s_loc = u.grad * u.grad
            w = work[id(u)] = {"s": s_loc, "g2": red.add(s_loc.sum())}
            L, st = u.layout, u.state
            if L.factored and L.row_sharded and st["Q"].shape[-1] > 0:
                full = torch.zeros(L.rows_total, st["Q"].shape[-1], dtype=torch.float32, device=s_loc.device)
                full[L.row_lo:L.row_hi] = st["Q"]
                w["q"] = red.add(full)
        red.run()
        ok = all_finite([red.get(work[id(u)]["g2"]) for u in units])

        # -- sketch rounds --------------------------------------------------------------------
        sketches = {}
        for u, fine in zip(units, ok):
            L, st, w = u.layout, u.state, work[id(u)]
            if not fine or not L.factored or L.numel == 0:
                continue
            B, m, n = L.B, L.m, L.n
            k_prev = st["Q"].shape[-1]
            q_rows = red.get(w["q"]) if "q" in w else st["Q"]
            w["q_prev"] = q_rows.reshape(B, m, k_prev)
            w["u_prev"] = st["U"].reshape(B, n, k_prev)
            # Typical size of G*G: keeps the error's norms in fp32 range (see _update_matrix).
            w["scale"] = float(red.get(w["g2"])) / L.numel or 1.0
            w["k"], sketch, w["fresh"] = self._sketch(w["q_prev"], (B, m, n), st, u.group, u.step, w["s"].device)
            sketches[id(u)] = (sketch, next(sketch))
        by_id = {id(u): u for u in units}
        while sketches:
            rnd = Reducer(pg)
            handles = {}
            for uid, (sketch, (kind, x)) in sketches.items():
                u = by_id[uid]
                handles[uid] = rnd.add(partial_product(u.layout, work[uid]["s"], kind, x, u.group["betas"][1]))
            rnd.run()
            for uid in list(sketches):
                u, w = by_id[uid], work[uid]
                sketch, (kind, x) = sketches[uid]
                reply = complete_product(u.layout, rnd.get(handles[uid]), kind, x, w["q_prev"], w["u_prev"],
                                          u.group["betas"][1])
                try:
                    sketches[uid] = (sketch, sketch.send(reply))
                except StopIteration as done:
                    w["q"], w["u"] = done.value
                    del sketches[uid]

        # -- last round: error norms and Uhat ------------------------------------------------
        red = Reducer(pg)
        for u, fine in zip(units, ok):
            if not fine:
                continue
            L, st, w, grp = u.layout, u.state, work[id(u)], u.group
            beta2 = grp["betas"][1]
            c2, eps, _ = corrections(grp, u.step)
            if not L.factored:
                v = st["exp_avg_sq"]
                v.mul_(beta2).add_(w["s"], alpha=1.0 - beta2)
                w["uhat"] = torch.div(u.grad, torch.sqrt(v, out=w["s"]).add_(eps), out=w["s"])
            elif L.numel == 0:
                continue
            else:
                w["uhat"], v2, r2 = local_error_and_uhat(
                    L, w["s"], u.grad, w["q_prev"], w["u_prev"], w["q"], w["u"], grp, eps, w["scale"],
                    with_error=w["fresh"])
                if w["fresh"]:
                    w["v2"], w["r2"] = red.add(v2), red.add(r2)
            w["u2"] = red.add(w["uhat"].square().sum())
        red.run()

        applied = []
        for u, fine in zip(units, ok):
            L, st, w, grp = u.layout, u.state, work[id(u)], u.group
            if not fine or L.numel == 0:
                applied.append(fine)
                continue
            c2, _, step_size = corrections(grp, u.step)
            u_sq = red.get(w["u2"]).double().sum()
            if L.factored:
                checks = [u_sq]
                if w["fresh"]:
                    v2, r2 = red.get(w["v2"]).double(), red.get(w["r2"]).double()
                    error = torch.where(v2 == 0, 0.0, (r2 / v2).sqrt()).max()
                    checks.append(error)
                if not is_finite(torch.stack(checks)):
                    applied.append(False)
                    continue
                k = w["k"]
                q = w["q"].reshape(L.rows_total, k)
                st["Q"] = q[L.row_lo:L.row_hi].clone() if L.row_sharded else q
                st["U"] = w["u"].view(*L.full_shape[:-2], L.n, k)
                if w["fresh"]:
                    self._next_rank(st, grp, k, float(error), *self._rank_limits(L.m, L.n, grp))
            u_scale = clip_scale(c2, math.sqrt(float(u_sq) / L.numel), grp)
            apply_update(u.param, w["uhat"], first_moment(u.param, st, grp), u_scale, grp, step_size)
            applied.append(True)
        return applied

    def rank_stats(self) -> dict[str, float]:
        """Current ranks over all factored parameters (for logging: the paper reports the mean)."""
        ranks = [s["rank"] for s in self.state.values() if "rank" in s]
        if not ranks:
            return {"mean": 0.0, "min": 0, "max": 0, "count": 0}
        return {"mean": sum(ranks) / len(ranks), "min": min(ranks), "max": max(ranks), "count": len(ranks)}

    # -- the update -----------------------------------------------------------------------
    def _sketch(self, q_prev, dims, state, group, step, device):
        """(k, request generator, fresh) of one parameter's sketch this step: S-RSI (fresh) or,
        between sketches, the projection onto last step's basis (``lowrank.project_steps``).

        ``q_prev`` is last step's full Q (B, m, k_prev); ``dims`` = (B, m, n). The random
        blocks are drawn at their full size from the parameter's private generator, so a
        sharded run draws exactly what the single process draws.
        """
        B, m, n = dims
        k_prev = q_prev.shape[-1]
        if not self._resketches(k_prev, group, step):
            return k_prev, project_steps(q_prev), False
        k_min, k_max = self._rank_limits(m, n, group)
        # Clamp: a loaded state or a changed group may carry a rank outside today's limits.
        k = max(k_min, min(state["rank"], k_max))
        r = min(k + group["oversampling"], m, n)
        gen = torch.Generator(device=device)
        gen.manual_seed(sketch_seed(group["seed"], step, state["sketch_index"]))
        if group["warm_start"] and k_prev > 0:
            # Last step's basis (its leading r columns if the rank fell below it with no
            # oversampling) plus fresh Gaussian directions, orthonormalized by a thin QR.
            keep = q_prev[..., :r]
            fill = torch.randn(B, m, r - keep.shape[-1], generator=gen, device=device)
            q_start = torch.linalg.qr(torch.cat([keep, fill], dim=-1)).Q
            return k, s_rsi_steps(k, group["warm_power_iters"], q_start=q_start), True
        omega = torch.randn(B, n, r, generator=gen, device=device)
        return k, s_rsi_steps(k, group["power_iters"], omega=omega), True

    @staticmethod
    def _resketches(k_prev: int, group: dict, step: int) -> bool:
        """Whether this step sketches anew (and decides the rank) or keeps last sketch's basis:
        the first step, then every ``resketch_every`` steps (``step`` counts from 1)."""
        return k_prev == 0 or (step - 1) % group["resketch_every"] == 0

    @staticmethod
    def _next_rank(state, group, k, error, k_min, k_max) -> None:
        """AS-RSI: record the error and the rank of the next sketch."""
        state["rel_error"] = error
        dk = group["dk"] if group["dk"] is not None else math.ceil(0.02 * group["k_max"])
        state["rank"] = next_rank(k, error, group["xi"], dk, k_min, k_max)

    def _fused_whole(self, u) -> bool:
        # A ZeRO partition holding whole parameters keeps the sharded step: its state is flat
        # (Q as (rows, k), M as a vector), which the local torch fallback cannot take.
        return False

    def _workspace(self, shape) -> torch.Tensor:
        """The m x n buffer of a fused (CPU) matrix update, kept between updates and sized to the
        largest matrix: a fresh buffer pays its page faults on every step (G*G into a fresh
        50257 x 768 buffer: 79 ms, into a kept one: 27 ms; docs/benchmarks/adapprox_speed.md)."""
        n = math.prod(shape)
        if getattr(self, "_scratch", None) is None or self._scratch.numel() < n:
            self._scratch = None  # free the old one before the larger one is allocated
            self._scratch = torch.empty(n, dtype=torch.float32)
        return self._scratch[:n].view(shape)

    def _update(self, p, grad, state, group, step):
        if p.numel() == 0:
            return True
        if p.dim() >= 2:
            return self._update_matrix(p, grad, state, group, step)
        return self._update_vector(p, grad, state, group, step)

    def _projected_update(self, p, g, state, group, step, kern) -> bool:
        """A step between sketches on the CPU kernels, with no m x n buffer: Q is kept and
        U_t^T = (1-beta2) Q^T (G*G) + beta2 (Q^T Q) U_{t-1}^T, the projection ``project_steps``
        asks for (V_t^T Q) written out through its two parts; Vhat = Q U_t^T is formed per row
        block where Uhat is written (kernels/cpu_adapprox.cpp, lowrank_*), so neither G*G nor
        Vhat passes through the buffer."""
        B, m, n = g.shape
        beta2 = group["betas"][1]
        k = state["Q"].shape[-1]
        q = state["Q"].reshape(B, m, k).contiguous()  # a QR's Q may be column-major
        u_prev = state["U"].view(B, n, k)
        g2_sum, ut = kern.lowrank_gram(g, q)
        if not math.isfinite(g2_sum) or g2_sum > _FLT_MAX:
            return False
        ut.mul_(1.0 - beta2)
        if beta2 != 0.0:
            ut.baddbmm_(q.mT @ q, u_prev.mT, alpha=beta2)
        c2, eps, step_size = corrections(group, step)
        uhat = self._workspace(g.shape)
        u_sq = kern.lowrank_uhat_sumsq_(g, q, ut, uhat, group, eps)
        if not math.isfinite(u_sq):
            return False
        state["U"] = ut.mT.contiguous().view(*p.shape[:-2], n, k)
        u_scale = clip_scale(c2, math.sqrt(u_sq / p.numel()), group)
        kern.apply_update_(p, uhat.view(p.shape), first_moment(p, state, group), u_scale, group, step_size)
        return True

    def _update_vector(self, p, grad, state, group, step):
        beta2 = group["betas"][1]
        g2 = grad * grad
        if not is_finite(g2.sum()):
            return False
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(g2, alpha=1.0 - beta2)
        c2, eps, step_size = corrections(group, step)
        uhat = torch.div(grad, torch.sqrt(v, out=g2).add_(eps), out=g2)
        u_scale = clip_scale(c2, float(rms(uhat)), group)
        apply_update(p, uhat, first_moment(p, state, group), u_scale, group, step_size)
        return True

    def _update_matrix(self, p, grad, state, group, step):
        m, n = p.shape[-2], p.shape[-1]
        g = grad.reshape(-1, m, n)
        B = g.shape[0]
        beta2 = group["betas"][1]

        # The one m x n buffer of the step: G*G for the sketch's products (unless the kernels form
        # it themselves), then V and the residual, then Vhat and Uhat. ``kern``: the fused C++
        # passes, or None for torch ops.
        kern = cpu_kernels_for(group, p, g)
        k_prev = state["Q"].shape[-1]  # 0 before the first step
        k_min, k_max = self._rank_limits(m, n, group)
        # The kernels form G*G, V and Vhat themselves when the widest block (the sketch, or a
        # rank carried over from another k_max) fits their width.
        widest = max(min(k_max + group["oversampling"], m, n), k_prev)
        lowrank = kern is not None and kern.LOWRANK_PASSES and widest <= kern.MAX_SKETCH_COLUMNS
        if lowrank and not self._resketches(k_prev, group, step):
            return self._projected_update(p, g, state, group, step, kern)
        buf = self._workspace(g.shape) if kern else torch.empty(g.shape, dtype=torch.float32, device=g.device)
        if lowrank:
            g2_sum = kern.sum_squares(g)
        else:
            g2_sum = kern.square_sum(g, buf) if kern else float(torch.mul(g, g, out=buf).sum())
        # > FLT_MAX: the kernel sums in double, where a float sum would have overflowed.
        if not math.isfinite(g2_sum) or g2_sum > _FLT_MAX:
            return False
        # Typical size of G*G, to keep the error's norms in fp32 range (any positive value is
        # correct; 1 when the gradient is all zero).
        g2_mean = g2_sum / buf.numel() or 1.0

        # -- S-RSI: Q, U of V_t = beta2 * Q_prev U_prev^T + (1 - beta2) * G*G -------------
        q_prev = state["Q"].view(B, m, k_prev)
        u_prev = state["U"].view(B, n, k_prev)
        if lowrank:
            apply_v, apply_vt = kern.lowrank_operator(g, q_prev.contiguous(), u_prev, beta2)
        else:
            apply_v, apply_vt = second_moment_operator(q_prev, u_prev, buf, beta2)
        k, sketch, fresh = self._sketch(q_prev, (B, m, n), state, group, step, p.device)
        q, u = answer_requests(sketch, apply_v, apply_vt)

        # -- error (sketch steps only), then Vhat and Uhat, all in the scratch buffer ---------
        c2, eps, step_size = corrections(group, step)
        error = 0.0
        if lowrank and fresh:
            # V, the residual and Vhat formed per row block in one pass over G (kernels/
            # cpu_adapprox.cpp, lowrank_sketch_uhat); only Uhat goes into the buffer.
            uhat = buf
            u_sq, v2, r2 = kern.lowrank_sketch_uhat_(g, q, u, q_prev, u_prev, uhat, group, eps, scale=g2_mean)
            error = worst_error(v2, r2)
        else:
            if fresh:
                v_norm, r_norm = residual_norms_(buf, q_prev, u_prev, q, u, beta2, scale=g2_mean)
                # AS-RSI. A stack's error is that of its worst matrix.
                error = float(relative_error(v_norm.unsqueeze(-1), r_norm.unsqueeze(-1)).max())
            uhat = torch.bmm(q, u.mT, out=buf)
            if kern:
                u_sq = kern.uhat_sumsq_(uhat, g, group, eps)
            else:
                u_sq = float(torch.linalg.vector_norm(uhat_(uhat, g, group, eps)).double().square())
        # The last guard before the state changes: an overflow inside the products or the
        # update shows up here as inf/nan.
        if not (math.isfinite(error) and math.isfinite(u_sq)):
            return False

        # -- commit ------------------------------------------------------------------------
        state["Q"] = q.view(*p.shape[:-1], k)
        state["U"] = u.view(*p.shape[:-2], n, k)
        if fresh:
            self._next_rank(state, group, k, error, k_min, k_max)
        u_scale = clip_scale(c2, math.sqrt(u_sq / p.numel()), group)
        (kern.apply_update_ if kern else apply_update)(
            p, uhat.view(p.shape), first_moment(p, state, group), u_scale, group, step_size)
        return True
