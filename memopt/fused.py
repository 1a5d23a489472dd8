"""Fused backward: update each parameter inside backward, as soon as its gradient is final.

This is where LOMO/AdaLomo save memory: the gradient of a parameter is consumed and freed by
its update during ``loss.backward()``, so the full set of gradients is never resident (at most
the gradients autograd is still accumulating plus one being consumed).

Usage (single process)::

    opt = memopt.AdaLomo(model.parameters(), lr=1e-3)
    for batch in loader:
        loss = model(batch)
        opt.fused_backward(loss)      # backward + update + free; no opt.step(), no zero_grad()

``opt.step()`` after an ordinary ``loss.backward()`` computes exactly the same update, so a
training loop can switch modes (gradient accumulation needs the ordinary mode: the update of a
fused step happens during the backward of each micro-batch).

Global-norm clipping (``clip_grad_norm``) needs the norm of *all* gradients before the first
update, so fused mode then runs two backward passes over the same graph: the first only sums
squared gradient norms (and frees each gradient at once), the second updates. It costs one extra
backward and keeps the autograd graph alive between the two (``retain_graph=True``); the
gradients are still never all resident. fp16 uses the same first pass to find overflows before
any parameter moves (dynamic loss scaling, below).

On CPU the freed gradients and activations go back to glibc's heap, which keeps them resident;
``heap_trim_every`` (bytes, default 32 MiB; None or 0: off) has fused backward return the heap's
free pages to the kernel before backward and once per that many bytes of gradients consumed
(``memopt.heap``), so the RSS follows the bytes torch holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import GradTransform, MemoptOptimizer, check_positive, resolve_foreach
from .fused_path import sync_free_fused
from .heap import HeapTrimmer, check_trim_every
from .sharding import Reducer, is_dtensor, local_layout

# The reference adds this to the norm before dividing (lomo_optim); kept for parity.
_NORM_EPS = 1e-6

# About one transformer layer's weight gradients at GPT-2 124M (28 MB): a trim (~2 ms) per layer.
DEFAULT_HEAP_TRIM_EVERY = 32 * 2**20


@dataclass
class DynamicLossScaler:
    """Loss scale for fp16 backward: halve on overflow, double after ``growth_interval`` clean steps.

    (The LOMO reference never grows its scale back; this one does, as torch.amp.GradScaler.)

    On the sync-free path (``foreach``) ``scale``, ``clean_steps`` and ``overflows`` are 0-d
    tensors on the parameters' device and ``update`` takes the overflow as a device bool, so the
    loss scale is decided without a host sync (read them with float()/int()).
    """

    scale: float = 2.0**16
    growth_interval: int = 1000
    factor: float = 2.0
    min_scale: float = 1.0
    clean_steps: int = 0
    overflows: int = 0

    def to_device(self, device: torch.device) -> None:
        """Hold the counters as 0-d tensors on ``device`` (the sync-free path)."""
        for key, dtype in (("scale", torch.float32), ("clean_steps", torch.int64), ("overflows", torch.int64)):
            v = getattr(self, key)
            if torch.is_tensor(v):
                if v.device != device:
                    setattr(self, key, v.to(device=device, dtype=dtype))
            else:
                setattr(self, key, torch.full((), v, dtype=dtype, device=device))

    def to_host(self) -> None:
        """Hold the counters as Python numbers again (the reference path; one sync)."""
        if torch.is_tensor(self.scale):
            self.scale = float(self.scale)
            self.clean_steps = int(self.clean_steps)
            self.overflows = int(self.overflows)

    def update(self, overflow) -> None:
        if torch.is_tensor(overflow):
            self.to_device(overflow.device)
            self.overflows = self.overflows + overflow.to(torch.int64)
            clean = torch.where(overflow, 0, self.clean_steps + 1)
            grow = clean >= self.growth_interval
            grown = torch.where(grow, self.scale * self.factor, self.scale)
            self.scale = torch.where(overflow, torch.clamp(self.scale / self.factor, min=self.min_scale), grown)
            self.clean_steps = torch.where(grow, 0, clean)
            return
        self.to_host()
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            self.scale = max(self.min_scale, self.scale / self.factor)
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= self.factor
                self.clean_steps = 0


class FusedBackwardOptimizer(MemoptOptimizer):
    """Adds ``fused_backward``, gradient clipping (value, global norm) and fp16 loss scaling.

    Subclasses pass ``clip_grad_norm``, ``clip_grad_value``, the loss-scaler settings and
    ``heap_trim_every`` through ``__init__``; the per-parameter rule stays in ``_update``.
    """

    def __init__(
        self,
        params,
        defaults: dict,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float = 2.0**16,
        loss_scale_growth_interval: int = 1000,
        on_nonfinite: str = "skip",
        foreach: bool | None = None,
        fused: bool | None = None,
        heap_trim_every: int | None = DEFAULT_HEAP_TRIM_EVERY,
    ):
        every = check_trim_every(heap_trim_every)
        check_positive("clip_grad_norm", clip_grad_norm, allow_none=True)
        check_positive("clip_grad_value", clip_grad_value, allow_none=True)
        check_positive("loss_scale", loss_scale)
        if loss_scale_growth_interval < 1:
            raise ValueError(f"loss_scale_growth_interval must be >= 1, got {loss_scale_growth_interval!r}")
        defaults = dict(defaults, clip_grad_value=clip_grad_value)
        super().__init__(params, defaults, on_nonfinite=on_nonfinite, foreach=foreach, fused=fused)
        self.clip_grad_norm = clip_grad_norm
        self.loss_scaler = DynamicLossScaler(scale=float(loss_scale), growth_interval=loss_scale_growth_interval)
        self.heap_trimmer = HeapTrimmer(every) if every is not None else None

    # -- gradient preprocessing, identical in both modes ------------------------------------
    def _params_in_order(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield p, group

    @staticmethod
    def _sq_norm(g: torch.Tensor) -> torch.Tensor:
        g = g.float()
        return torch.dot(g.reshape(-1), g.reshape(-1))

    def _clip_coef(self, sq_norms: list[torch.Tensor]) -> float | None:
        """min(1, max_norm / (||g|| + 1e-6)) from per-parameter squared norms in parameter order."""
        if self.clip_grad_norm is None or not sq_norms:
            return None
        total = math.sqrt(float(torch.stack(sq_norms).sum()))
        return min(1.0, self.clip_grad_norm / (total + _NORM_EPS))

    def prepare_grad(self, g: torch.Tensor, group: dict, coef: float | None = None,
                     unscale: float | None = None) -> torch.Tensor:
        """The gradient an update uses: fp32, divided by the loss scale ``unscale``, clamped to
        the group's ``clip_grad_value``, times the global-norm clip coefficient ``coef``.

        On the sync-free path ``coef`` and ``unscale`` are 0-d device tensors; a tensor ``coef``
        always multiplies (a factor of exactly 1 leaves g unchanged, bit for bit)."""
        g = g.float()
        if unscale is not None:
            g = g / unscale  # a power of two: exact
        if group["clip_grad_value"] is not None:
            g = g.clamp(-group["clip_grad_value"], group["clip_grad_value"])
        if coef is not None and (torch.is_tensor(coef) or coef < 1.0):
            g = g * coef
        return g

    # -- ordinary mode (MemoptOptimizer.step with this gradient transform) ----------------------
    def _grouped_sq_norms(self, p: torch.Tensor, g: torch.Tensor | None, sq: torch.Tensor | None = None):
        """[(process group, squared norm)] of ``p``'s local gradient ``g`` (or its given ``sq``),
        one entry per group its pieces are reduced over: None for a whole local parameter; for a
        bound flat partition, one per distinct group of its fragments (data-parallel shards of
        replicated parameters, tensor-parallel slices). Length-0 fragments count too, so every
        rank lists the same groups in the same order."""
        frags = self._fragments.get(p)
        if frags is None:
            pg = local_layout(p)[1].group if self._is_sharded(p) else None
            return [(pg, self._sq_norm(g) if sq is None else sq)]
        flat = g.reshape(-1)
        by_pg: dict[int, list] = {}
        for _name, off, layout in frags:
            part = self._sq_norm(flat.narrow(0, off, layout.length))
            entry = by_pg.setdefault(id(layout.group), [layout.group, torch.zeros((), dtype=torch.float32)])
            entry[1] = entry[1] + part.float().cpu()
        return [tuple(e) for e in by_pg.values()]

    @staticmethod
    def _global_sq_total(norms) -> float:
        """The squared global norm from [(group, squared norm)]: local parts (group None) as they
        are, the others summed over their group (one all-reduce per distinct group)."""
        plain = [sq for pg, sq in norms if pg is None]
        total = float(torch.stack(plain).sum()) if plain else 0.0
        by_pg: dict[int, list] = {}
        for pg, sq in norms:
            if pg is None:
                continue
            entry = by_pg.setdefault(id(pg), [pg, torch.zeros((), dtype=torch.float32)])
            entry[1] = entry[1] + sq.float().cpu()
        for pg, local in by_pg.values():
            red = Reducer(pg)
            h = red.add(local)
            red.run()
            total += float(red.get(h))
        return total

    def _global_clip_coef(self, norms) -> float | None:
        """Clip coefficient from [(group, squared norm of a local gradient)]; shards reduced."""
        if self.clip_grad_norm is None or not norms:
            return None
        total = self._global_sq_total(norms)
        return min(1.0, self.clip_grad_norm / (math.sqrt(total) + _NORM_EPS))

    @staticmethod
    def _local_grad(g):
        return g.to_local() if is_dtensor(g) else g

    def _all_sync_free(self, pairs) -> bool:
        """Every parameter takes a path without host syncs: foreach, or the fused kernels of a
        sync-free backend (``memopt.fused_path``)."""
        return bool(pairs) and all(
            not self._is_sharded(p) and (resolve_foreach(group, p.device) or sync_free_fused(self, p, group))
            for p, group in pairs)

    def _device_clip_coef(self, sq_total: torch.Tensor) -> torch.Tensor:
        """min(1, max_norm / (||g|| + 1e-6)) as a 0-d tensor from the squared global norm."""
        return torch.clamp(self.clip_grad_norm / (sq_total.sqrt() + _NORM_EPS), max=1.0)

    def _gradient_transform(self, with_grad) -> GradTransform:
        coef = None
        if self.clip_grad_norm and self._all_sync_free(with_grad):
            sq = torch._foreach_norm([p.grad for p, _ in with_grad], 2, dtype=torch.float32)
            coef = self._device_clip_coef(torch.stack(sq).square().sum())
        elif self.clip_grad_norm:
            coef = self._global_clip_coef(
                [e for p, _ in with_grad for e in self._grouped_sq_norms(p, self._local_grad(p.grad))])
        return lambda g, group: self.prepare_grad(g, group, coef, None)

    # -- fused mode ---------------------------------------------------------------------------
    def _uses_loss_scaling(self, loss: torch.Tensor) -> bool:
        return loss.dtype == torch.float16 or any(p.dtype == torch.float16 for p, _ in self._params_in_order())

    def fused_backward(self, loss: torch.Tensor, recompute_loss=None) -> bool:
        """Backward of ``loss`` with every parameter updated as soon as its gradient is final.

        When a first, norm-only pass is needed (``clip_grad_norm`` or fp16 loss scaling), the
        second pass normally reuses the graph (``retain_graph=True``). Pass ``recompute_loss``
        (a callable re-running the forward on the same batch, with the same RNG state) to
        recompute the graph instead: one extra forward, no retained graph, and it works with
        autograd functions that modify saved tensors in their backward (megatron's fused
        cross-entropy does).

        Returns False when the step was skipped because the fp16 loss scale overflowed.
        """
        params = [(p, g) for p, g in self._params_in_order() if p.requires_grad]
        if any(p.grad is not None for p, _ in params):
            raise RuntimeError(
                f"{type(self).__name__}.fused_backward: parameters already hold gradients; fused mode "
                "updates inside each backward, so it cannot accumulate micro-batches. Call "
                "zero_grad(set_to_none=True) first, or use loss.backward() + step() for accumulation."
            )
        if self.heap_trimmer is not None and any(p.device.type == "cpu" for p, _ in params):
            # What the forward freed (its temporaries; the last step's gradients) goes back
            # before backward adds the first gradients on top of the saved activations.
            self.heap_trimmer.release()
        if self._all_sync_free(params):
            return self._fused_backward_sync_free(loss, params, recompute_loss)
        scaled = self._uses_loss_scaling(loss)
        if scaled:
            self.loss_scaler.to_host()
        unscale = self.loss_scaler.scale if scaled else None
        scaled_loss = loss * unscale if scaled else loss

        coef = None
        if self.clip_grad_norm is not None or scaled:
            sq = {}

            def collect(p):
                g = p.grad
                p.grad = None
                g = self._local_grad(g)
                sq[p] = self._sq_norm(g if unscale is None else g.float() / unscale)

            self._run_backward(scaled_loss, params, collect, retain_graph=recompute_loss is None)
            sq_norms = [sq[p] for p, _ in params if p in sq]
            if any(self._is_sharded(p) for p, _ in params):
                pairs = [e for p, _ in params if p in sq for e in self._grouped_sq_norms(p, None, sq[p])]
                total = torch.tensor(self._global_sq_total(pairs))
                if scaled and not bool(torch.isfinite(total)):
                    self.loss_scaler.update(overflow=True)
                    return False
                coef = None if self.clip_grad_norm is None else min(
                    1.0, self.clip_grad_norm / (math.sqrt(float(total)) + _NORM_EPS))
            else:
                if scaled:
                    overflow = bool(sq_norms) and not bool(torch.isfinite(torch.stack(sq_norms).sum()))
                    if overflow:
                        self.loss_scaler.update(overflow=True)
                        return False
                coef = self._clip_coef(sq_norms)

        def update(p):
            g = p.grad
            p.grad = None
            group = self.group_of(p)
            self.update_param(p, self.prepare_grad(g, group, coef, unscale), group)

        if recompute_loss is not None and (self.clip_grad_norm is not None or scaled):
            scaled_loss = recompute_loss() * unscale if scaled else recompute_loss()
        self._run_backward(scaled_loss, params, update, retain_graph=False)
        if scaled:
            self.loss_scaler.update(overflow=False)
        return True

    def _fused_backward_sync_free(self, loss, params, recompute_loss):
        """``fused_backward`` on the sync-free path: the clip coefficient, the loss scale and the
        overflow decision stay on the device, and the hooks never wait for it. An fp16 overflow
        therefore cannot skip the second backward pass: it runs, with every update masked off
        (``gate``), and the return value is the device bool "applied"."""
        scaled = self._uses_loss_scaling(loss)
        unscale = None
        if scaled:
            self.loss_scaler.to_device(params[0][0].device)
            unscale = self.loss_scaler.scale
        scaled_loss = loss * unscale if scaled else loss
        coef = gate = None
        two_pass = self.clip_grad_norm is not None or scaled
        if two_pass:
            sq = {}

            def collect(p):
                g = self._local_grad(p.grad)
                p.grad = None
                sq[p] = self._sq_norm(g if unscale is None else g.float() / unscale)

            self._run_backward(scaled_loss, params, collect, retain_graph=recompute_loss is None)
            # Summed in parameter order, as the reference path does, for the same round-off.
            sq_norms = [sq[p] for p, _ in params if p in sq]
            total = torch.stack(sq_norms).sum() if sq_norms else torch.zeros((), device=params[0][0].device)
            if scaled:
                gate = torch.isfinite(total)
            if self.clip_grad_norm is not None:
                coef = self._device_clip_coef(total)

        def update(p):
            g = p.grad
            p.grad = None
            group = self.group_of(p)
            g = self.prepare_grad(g, group, coef, unscale)
            if resolve_foreach(group, p.device):
                self._step_foreach([(p, g, group)], gate=gate)
            else:  # the sync-free fused kernels: a FusedKernelOptimizer (memopt.fused_path)
                self.gated_update(p, g, group, gate)

        if recompute_loss is not None and two_pass:
            scaled_loss = recompute_loss() * unscale if scaled else recompute_loss()
        self._run_backward(scaled_loss, params, update, retain_graph=False)
        if scaled:
            self.loss_scaler.update(~gate)
            return gate
        return True

    def _run_backward(self, loss, params, fn, retain_graph: bool) -> None:
        trimmer = self.heap_trimmer
        if trimmer is not None:
            inner = fn

            def fn(p):
                inner(p)  # consumes p.grad and drops it: freed when inner returns
                trimmer.freed(p)

        handles = [p.register_post_accumulate_grad_hook(fn) for p, _ in params]
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            for h in handles:
                h.remove()

    # -- checkpointing: the loss scaler travels with the optimizer state ------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["loss_scaler"] = dict(vars(self.loss_scaler))
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)
        if scaler is not None:
            self.loss_scaler = DynamicLossScaler(**scaler)
