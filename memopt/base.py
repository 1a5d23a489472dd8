"""Machinery shared by every memopt optimizer.

Each optimizer only writes ``_init_state`` and ``_update`` for *one* parameter; this base class
supplies the rest, identically for all of them:

* fp32 math: bf16/fp16 parameters and gradients are upcast for the update and the result is
  written back, so low-precision training keeps fp32 optimizer arithmetic.
* non-finite gradients never reach the state: ``_update`` checks a cheap statistic it computes
  anyway (e.g. the row sums of G*G) before it mutates anything and returns False when that is not
  finite; the step is then skipped for that parameter and counted in its state
  (``state["nonfinite_skips"]``), or ``on_nonfinite="raise"`` raises instead.
* a per-parameter step counter (``state["step"]``) that only advances on applied updates, so it
  counts optimizer steps, never micro-batches or skipped steps.
* ``update_param(p, grad)``: the update of a single parameter with an explicit gradient, which
  ``step()`` loops over and fused-backward hooks call from inside backward.
* sharded parameters (``memopt.sharding``): FSDP2 DTensors placed Shard(0), and DeepSpeed ZeRO
  flat partitions bound with ``bind_fragments`` (``memopt.integrations.deepspeed``). Their step
  runs in phases across all parameters (``_sharded_update``), with one all-reduce per phase, and
  computes exactly the single-process update. Plain local tensors keep the per-parameter fast path.
* ``step()`` itself, once: a subclass that changes gradients first (clipping, loss scaling:
  ``memopt.fused``) returns a transform from ``_gradient_transform`` instead of its own step.
* two execution paths with torch.optim's meaning of ``foreach`` / ``fused`` (``resolve_foreach``):
  the per-parameter, cache-blocked *reference* path (``foreach=False``; the CPU default) and the
  *sync-free* multi-tensor path (``foreach=True``; the default on accelerators), where the
  parameters of one group with the same shape and dtype are stepped together as one stack
  (``_foreach_update``), every skip decision is a device-side mask, and the counters
  ``state["step"]`` / ``state["nonfinite_skips"]`` are 0-d device tensors, so ``step()`` never
  waits for the device. ``on_nonfinite="raise"`` must look at the mask, so it syncs once per step.
* the public contract that checkpoints and engines use (``memopt.sharding.LayoutOptimizer``):
  ``logical_params()``, ``ensure_state()``, ``suspended()``, ``bind_fragments()``, ``fragments``.
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch.optim import Optimizer

from .hparams import check_beta, check_nonnegative, check_positive  # noqa: F401 (re-exported)
from .paths import held_whole, resolve_fused
from .sharding import Layout, LogicalParam, Unit, is_dtensor, local_layout, tensor_parallel_split
from .stochastic_rounding import IndexTensors, write_back_, write_back_stack_

#: What ``_gradient_transform`` returns: the gradient (a local piece of it for a sharded
#: parameter) and its group -> the gradient the update uses.
GradTransform = Callable[[torch.Tensor, dict], torch.Tensor]

NONFINITE_POLICIES = ("skip", "raise")

def check_foreach_fused(foreach, fused) -> None:
    """torch.optim's ``foreach`` / ``fused`` flags: None or a bool, and (as torch) not both True."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be None, True or False, got {value!r}")
    if foreach and fused:
        raise ValueError("foreach=True and fused=True cannot both be set; pick one (or leave both None)")


def resolve_foreach(group: dict, device: torch.device) -> bool:
    """The path a parameter of ``group`` on ``device`` takes (torch's meaning of None: the
    fastest correct choice for the device). None -> the sync-free multi-tensor path on any
    accelerator, where a host sync drains the stream; the per-parameter path on CPU, where
    it measured faster (docs/benchmarks/optimizers_foreach.md) and there is no stream to drain.
    ``fused=True`` always takes the per-parameter path (its kernels are per parameter)."""
    foreach = group.get("foreach")
    if foreach is None:
        return device.type != "cpu" and group.get("fused") is not True
    return foreach


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``on_nonfinite="raise"`` when a gradient holds inf or nan."""


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over the whole tensor (a 0-d tensor)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class MemoptOptimizer(Optimizer):
    """Base class: subclasses implement ``_init_state`` and ``_update`` for one parameter."""

    #: True when the subclass implements ``_init_sharded_state`` and ``_sharded_update``.
    supports_sharding = False
    #: True for ``memopt.fused_path.FusedKernelOptimizer``'s subclasses (False: fused=True refused).
    has_fused_kernels = False

    def __init__(self, params: Iterable, defaults: dict[str, Any], on_nonfinite: str = "skip",
                 foreach: bool | None = None, fused: bool | None = None):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        check_foreach_fused(foreach, fused)
        self._check_fused_supported(fused)
        defaults = dict(defaults, on_nonfinite=on_nonfinite, foreach=foreach, fused=fused)
        self._group_shapes: dict[int, list] = {}
        self._fragments: dict[torch.Tensor, list] = {}
        self._fragment_group: dict[torch.Tensor, dict] = {}
        self._fragment_index: dict[str, int] = {}
        self._index_of: dict[torch.Tensor, int] | None = None
        self._suspended = False  # True while an engine runs its initialization steps
        self._index_tensors = IndexTensors(self.logical_index)  # stochastic rounding's keys
        super().__init__(params, defaults)
        self._group_of: dict[torch.Tensor, dict] | None = None

    # -- hooks for subclasses -------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Create the state tensors of ``p`` (fp32, on p's device)."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, step: int) -> bool:
        """Update fp32 ``p`` in place with fp32 ``grad`` at 1-based ``step``.

        Must return False, having changed nothing, when the gradient is not finite.
        """
        raise NotImplementedError

    def _foreach_update(self, ws: list[torch.Tensor], grads: torch.Tensor, states: list[dict], group: dict,
                        t: torch.Tensor) -> torch.Tensor:
        """The sync-free update of N parameters of one group with the same shape.

        ``ws``: the N fp32 tensors to update in place (the parameters, or views of one fp32 stack
        for low-precision ones); ``grads``: their fp32 gradients stacked, (N, *shape), the
        caller's copy (free to overwrite); ``t``: (N,) float32 1-based steps of this update.
        Returns ok, (N,) bool on the device: parameter i and its state must be left unchanged
        where ok[i] is False, by masks rather than branches, and nothing may be read back to the
        host (no .item(), float(), bool(), .tolist() of a device value).
        """
        raise NotImplementedError

    def _init_sharded_state(self, layout: Layout, state: dict, group: dict, device=None) -> None:
        """Create the state of one sharded parameter (local pieces; see ``memopt.sharding``)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO "
            "partitions) yet; use it with whole parameters (single process, DDP, ZeRO stage 0)"
        )

    def _sharded_update(self, units: list[Unit], pg) -> list[bool]:
        """Update every unit (same process group) in phases; one all-reduce per phase.

        Returns, per unit, whether it was applied. A unit is skipped (False, nothing changed)
        when its *reduced* statistic is not finite, so all ranks skip it alike.
        """
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def _check_fused_supported(self, fused) -> None:
        if fused and not self.has_fused_kernels:
            raise NotImplementedError(
                f"{type(self).__name__}: fused=True (memopt.kernels) is not available for this optimizer; "
                "use foreach=True (the sync-free multi-tensor path) or leave fused=None"
            )

    def add_param_group(self, param_group: dict) -> None:
        check_foreach_fused(param_group.get("foreach"), param_group.get("fused"))
        self._check_fused_supported(param_group.get("fused"))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._group_shapes[id(group)] = [tuple(p.shape) for p in group["params"]]
        self._group_of = None
        self._index_of = None

    def load_state_dict(self, state_dict: dict) -> None:
        old_shapes = [self._group_shapes.get(id(g)) for g in self.param_groups]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype on load; memopt keeps its state in
        # fp32 for bf16/fp16 parameters (a bf16 cast would lose precision for good on resume).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None or p.dtype == torch.float32:
                continue
            for key, value in saved.items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        # The loader replaces the group dicts: caches keyed by group must follow them.
        self._group_shapes = {id(g): s for g, s in zip(self.param_groups, old_shapes) if s is not None}
        self._group_of = None
        self._index_of = None

    def bind_fragments(self, flat: torch.Tensor, fragments: list[tuple[str, int, Layout]], group: dict | None = None) -> None:
        """Declare that ``flat`` (a 1-D tensor in ``param_groups``) holds pieces of logical parameters.

        ``fragments``: (name, offset in ``flat``, layout) for *every* logical parameter of the
        group in the same order on all ranks (length 0 where this rank holds nothing): the
        collectives of a step are matched across ranks by that order. Used by
        ``memopt.integrations.deepspeed`` for ZeRO's flat fp32 partitions.
        """
        self._fragments[flat] = list(fragments)
        for name, _off, _layout in fragments:
            self._fragment_index.setdefault(name, len(self._fragment_index))
        self._fragment_group[flat] = group if group is not None else self.param_groups[0]
        self._group_of = None

    def _check_not_replaced(self, group: dict) -> bool:
        """Raise if DeepSpeed replaced this group's parameters by unbound flat partitions.

        Returns True for DeepSpeed's state-creating initialization step (all-zero gradients on
        unbound partitions), which is then skipped, so the error comes at the first real step.
        """
        shapes = self._group_shapes.get(id(group))
        params = group["params"]
        if shapes is None or not params or all(p in self._fragments for p in params):
            return False
        if [tuple(p.shape) for p in params] != shapes:
            if all(p.grad is None or not bool(p.grad.any()) for p in params):
                return True
            raise RuntimeError(
                f"{type(self).__name__}: the parameters of this optimizer were replaced by tensors of other "
                f"shapes ({len(shapes)} parameters became {[tuple(p.shape) for p in params][:4]}...): this is "
                "DeepSpeed ZeRO (stage >= 1) handing the optimizer flat partitions. A factored optimizer "
                "would silently become a different (dense) optimizer there. Create the engine with "
                "memopt.integrations.deepspeed.initialize(model=..., optimizer=<memopt optimizer or name>, "
                "config=...) instead of deepspeed.initialize(...): it gives the optimizer the layout of every "
                "parameter so that the update stays exact and factored."
            )
        return False

    def _new_state(self, key, local, layout: Layout | None, state: dict, group: dict, device) -> None:
        """Create the (empty) ``state`` of one logical parameter: the one place that does it.

        ``key`` is what the state belongs to: the parameter itself, or its name for a fragment
        of a bound flat partition. ``layout`` None or whole: ``local`` is the full tensor.
        """
        state["step"] = 0
        state["nonfinite_skips"] = 0
        if layout is not None and layout.sharded:
            self._init_sharded_state(layout, state, group, device)
        else:
            # A whole fragment of a flat partition arrives flat: its state follows the full shape.
            shaped = local if layout is None or local.shape == layout.full_shape else local.view(layout.full_shape)
            self._init_state(shaped, state, group)
        self._state_created(key, state)

    def _state_created(self, key, state: dict) -> None:
        """Hook after a new state is created (Adapprox records the parameter's position)."""

    def logical_index(self, key) -> int | None:
        """Position of a logical parameter (a parameter, or a bound fragment's name) in the
        flattened parameter list of the single-process optimizer; None when unknown.

        Bound fragments are numbered in binding order, which follows DeepSpeed's parameter
        order, i.e. the order of the parameters the optimizer was created with."""
        if isinstance(key, str):
            return self._fragment_index.get(key)
        if self._index_of is None:
            self._index_of = {q: i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self._index_of.get(key)

    # -- the contract with layouts' users (memopt.sharding.LayoutOptimizer) ---------------
    @property
    def fragments(self) -> Mapping[torch.Tensor, list[tuple[str, int, Layout]]]:
        """The bound flat partitions: {flat tensor: [(name, offset, layout), ...]} as given to
        ``bind_fragments`` (empty unless an engine such as DeepSpeed ZeRO bound some). Read-only."""
        return types.MappingProxyType(self._fragments)

    def logical_params(self) -> Iterator[LogicalParam]:
        """Every logical parameter, in the same order on every rank: the fragments of bound flat
        partitions first, in binding order (ZeRO-3 empties ``param_groups`` between steps), then
        the other parameters of ``param_groups`` (whole tensors or DTensors)."""
        for flat, frags in self._fragments.items():
            group = self._fragment_group[flat]
            st = self.state[flat]
            for name, _off, layout in frags:
                yield LogicalParam(name, layout, group, flat.device, None, st, name)
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._fragments:
                    continue
                local, layout = local_layout(p)
                yield LogicalParam(p, layout, group, p.device, local, self.state, p)

    def ensure_state(self, lp: LogicalParam) -> dict:
        """The state of ``lp``, created first if it has none (e.g. before loading a checkpoint
        into an optimizer that has not stepped yet)."""
        state = lp.state
        if not state:
            self._new_state(lp.key, lp.local, lp.layout, state, lp.group, lp.device)
        return state

    @contextmanager
    def suspended(self):
        """Within it ``step()`` runs the closure only and changes nothing: for an engine's own
        initialization steps (DeepSpeed steps its client with zero gradients to create states)."""
        before = self._suspended
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = before

    # -- sharded parameters ---------------------------------------------------------------
    def _is_sharded(self, p: torch.Tensor) -> bool:
        # ``p in dict`` hashes through Tensor.__hash__ (Python): skip it when nothing is bound.
        return ((bool(self._fragments) and p in self._fragments) or is_dtensor(p)
                or tensor_parallel_split(p) is not None)

    def _units_for(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> list[Unit]:
        """The units of a sharded parameter (a DTensor, or a bound flat partition)."""
        frags = self._fragments.get(p)
        if frags is not None:
            st = self.state[p]
            flat_p = p.detach().view(-1)
            flat_g = grad.reshape(-1)
            units = []
            for name, off, layout in frags:
                sub = st.get(name)
                if sub is None:
                    sub = st[name] = {}
                units.append(self._make_unit(
                    name, flat_p.narrow(0, off, layout.length), flat_g.narrow(0, off, layout.length), layout, sub, group
                ))
            return units
        local, layout = local_layout(p)
        glocal = grad.to_local() if is_dtensor(grad) else grad
        return [self._make_unit(p, local, glocal, layout, self.state[p], group)]

    def _make_unit(self, key, local, glocal, layout, state, group) -> Unit:
        if not state:
            self._new_state(key, local, layout, state, group, local.device)
        flat = local.detach().reshape(-1)
        work = flat if flat.dtype == torch.float32 else flat.float()
        g = glocal.reshape(-1)
        g = g if g.dtype == torch.float32 else g.float()
        return Unit(key=key, param=work, grad=g, layout=layout, state=state, group=group,
                    target=None if work is flat else flat)

    def _fused_whole(self, u: Unit) -> bool:
        """A unit held whole by a group of one whose update runs the fused kernels: the kernels
        read the sharded state (flat vectors) as the local state, so it takes the local path."""
        return held_whole(u.layout) and self.has_fused_kernels and resolve_fused(u.group, u.param.device)

    def _step_units(self, units: list[Unit]) -> None:
        """Run the sharded (phased) step of ``units``; whole-layout units take the plain path."""
        by_pg: dict[int, list[Unit]] = {}
        pgs = {}
        for u in units:
            if not u.layout.sharded or self._fused_whole(u):
                self._apply_local(u.param.view(u.layout.full_shape), u.grad.view(u.layout.full_shape),
                                  u.state, u.group, u.layout.full_shape, target=u.target, key=u.key)
                continue
            by_pg.setdefault(id(u.layout.group), []).append(u)
            pgs[id(u.layout.group)] = u.layout.group
        failed = None
        for k, us in by_pg.items():
            for u in us:
                u.step = host_int(u.state["step"]) + 1
            applied = self._sharded_update(us, pgs[k])
            for u, ok in zip(us, applied):
                if ok:
                    u.state["step"] = u.step
                    if u.target is not None:
                        write_back_(u.target, u.param, u.group, self.logical_index(u.key), u.step, u.layout.start,
                                    u.layout.column_window)
                else:
                    u.state["nonfinite_skips"] += 1
                    if u.group["on_nonfinite"] == "raise" and failed is None:
                        failed = u
        if failed is not None:
            raise NonFiniteGradientError(
                f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                f"{tuple(failed.layout.full_shape)} at step {failed.step}; pass on_nonfinite='skip' to skip such steps"
            )

    def group_of(self, p: torch.Tensor) -> dict:
        """The parameter group that holds ``p``."""
        if self._group_of is None:
            self._group_of = {q: g for g in self.param_groups for q in g["params"]}
        try:
            return self._group_of[p]
        except KeyError:
            raise ValueError("this parameter is not managed by this optimizer") from None

    def _gradient_transform(self, with_grad: list[tuple[torch.Tensor, dict]]) -> GradTransform | None:
        """Hook, once per ``step()`` before any update: ``with_grad`` holds the (parameter, group)
        pairs about to be updated. Return a function applied to every gradient (a sharded
        parameter's local piece, flat fp32) before its update, or None to use them as they are.
        ``memopt.fused`` clips and clamps here."""
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._suspended:
            return loss
        # Every group is checked before any update, so a refused step changes no group.
        live = [group for group in self.param_groups if not self._check_not_replaced(group)]
        with_grad = [(p, group) for group in live for p in group["params"] if p.grad is not None]
        transform = self._gradient_transform(with_grad)
        units: list[Unit] = []
        stacked: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
        for p, group in with_grad:
            if self._is_sharded(p):
                for u in self._units_for(p, p.grad, group):
                    if transform is not None:
                        u.grad = transform(u.grad, group)
                    units.append(u)
            elif resolve_foreach(group, p.device):
                stacked.append((p, p.grad, group))
            else:
                self._update_whole(p, p.grad if transform is None else transform(p.grad, group), group)
        if stacked:
            self._step_foreach(stacked, transform)
        if units:
            self._step_units(units)
        return loss

    def _step_foreach(self, items: list[tuple[torch.Tensor, torch.Tensor, dict]],
                      transform: GradTransform | None = None, gate: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The sync-free path for whole (unsharded) parameters: (param, grad, group) items.

        Parameters of one group with the same shape and dtype form one class and are stepped
        together (``_foreach_update``), so a step dispatches a fixed number of ops per class,
        whatever the depth of the model. ``gate`` (a 0-d bool on the device, e.g. "the fp16 loss
        scale did not overflow") turns the whole step into a no-op that counts no skip.
        Returns the ok mask of every item, in order.
        """
        classes: dict[tuple, tuple[dict, list]] = {}
        oks: list[torch.Tensor | None] = [None] * len(items)
        for i, (p, g, group) in enumerate(items):
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._new_state(p, p, None, state, group, p.device)
            device_counters(state, p.device)
            if p.numel() == 0:  # an empty parameter: nothing to update, its step counts
                state["step"] += 1
                oks[i] = torch.ones((), dtype=torch.bool, device=p.device)
                continue
            key = (id(group), tuple(p.shape), p.dtype, g.dtype, p.device)
            classes.setdefault(key, (group, []))[1].append((i, p, g, state))
        raising = []
        for group, members in classes.values():
            ps = [m[1] for m in members]
            states = [m[3] for m in members]
            # The stack is a copy, so an update may overwrite it: a gradient is never modified.
            grads = torch.stack([m[2] for m in members])
            if grads.dtype != torch.float32:
                grads = grads.float()
            if transform is not None:
                grads = transform(grads, group)
            if gate is not None:
                grads.masked_fill_(~gate, float("nan"))
            low_precision = ps[0].dtype != torch.float32
            ws = list(torch.stack(ps).float().unbind(0)) if low_precision else ps
            steps = [st["step"] for st in states]
            t = torch.stack(steps) + 1
            ok = self._foreach_update(ws, grads, states, group, t)
            torch._foreach_add_(steps, ok.to(torch.float32).unbind(0))
            skipped = ~ok if gate is None else ~ok & gate
            torch._foreach_add_([st["nonfinite_skips"] for st in states], skipped.to(torch.int64).unbind(0))
            if low_precision:
                write_back_stack_(ps, ws, group, self._index_tensors, t)
            for (i, *_), o in zip(members, ok.unbind(0)):
                oks[i] = o
            if group["on_nonfinite"] == "raise":
                raising.append((ps[0], ok, states))
        for p, ok, states in raising:
            if not bool(ok.all()):  # the one host sync of this path: "raise" has to know
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient for a parameter of shape {tuple(p.shape)}; "
                    "pass on_nonfinite='skip' to skip such steps"
                )
        return oks

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict | None = None):
        """Apply one update to ``p`` from ``grad``; returns False if it was skipped (non-finite).

        On a sync-free path (``foreach``; ``fused`` on Triton, memopt.fused_path) it returns that
        answer as a 0-d bool tensor on the device instead (reading it is the caller's sync)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if group is None:
            group = self.group_of(p)
        sharded = self._is_sharded(p)
        if not sharded and resolve_foreach(group, p.device):
            return self._step_foreach([(p, grad, group)])[0]
        if sharded:
            # A sharded parameter alone (fused backward): its phases' collectives run for it alone.
            units = self._units_for(p, grad, group)
            skips = sum(u.state["nonfinite_skips"] for u in units)
            self._step_units(units)
            return sum(u.state["nonfinite_skips"] for u in units) == skips
        return self._update_whole(p, grad, group)

    def _update_whole(self, p: torch.Tensor, grad: torch.Tensor, group: dict):
        """``update_param`` of a whole (unsharded) parameter on the per-parameter path, once the
        caller has decided that path (``step()`` has: it skips update_param's checks, which cost
        tens of microseconds per parameter, a tenth of a fused CPU step of GPT-2's 148 tensors)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        state = self.state[p]
        if not state:
            self._new_state(p, p, None, state, group, p.device)
        return self._apply_local(p, grad, state, group, p.shape)

    def _apply_local(self, p, grad, state, group, shape, target=None, key=None) -> bool:
        work = p if p.dtype == torch.float32 else p.detach().float()
        g32 = grad if grad.dtype == torch.float32 else grad.float()
        step = host_int(state["step"]) + 1
        if work.numel() == 0:  # an empty parameter: nothing to update (factored maths would divide by 0)
            state["step"] = step
            return True
        if not self._update(work, g32, state, group, step):
            state["nonfinite_skips"] += 1
            if group["on_nonfinite"] == "raise":
                raise NonFiniteGradientError(
                    f"{type(self).__name__}: non-finite gradient for a parameter of shape "
                    f"{tuple(shape)} at step {step}; pass on_nonfinite='skip' to skip such steps"
                )
            return False
        state["step"] = step
        if work is not p:  # a low-precision weight (stochastic rounding: memopt.stochastic_rounding)
            write_back_(p, work, group, self.logical_index(p), step)
        if target is not None:
            write_back_(target, work.reshape(-1), group, self.logical_index(key), step)
        return True

    @property
    def nonfinite_skips(self) -> int:
        """Total number of per-parameter updates skipped because the gradient was not finite."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def state_bytes(self) -> int:
        """Bytes of tensor state really held by this optimizer (what a user pays in memory)."""
        return optimizer_state_bytes(self)


def optimizer_state_bytes(opt: Optimizer) -> int:
    """Bytes of the tensor storages in ``opt.state`` (any torch optimizer), each counted once."""
    seen: set[int] = set()
    total = 0

    def visit(v):
        nonlocal total
        if torch.is_tensor(v):
            # A DTensor (torch optimizers' states under FSDP2) counts its local shard: the bytes
            # this rank holds.
            storage = (v.to_local() if is_dtensor(v) else v).untyped_storage()
            key = storage.data_ptr()
            if key and key in seen:
                return
            seen.add(key)
            total += storage.nbytes()
        elif isinstance(v, dict):  # per-fragment states of a bound flat partition
            for x in v.values():
                visit(x)

    for s in opt.state.values():
        visit(s)
    return total


def host_int(x) -> int:
    """A counter as a Python int: the reference path's counters are ints, the sync-free path's
    0-d device tensors (a parameter may move between the two, e.g. through a checkpoint)."""
    return int(x) if torch.is_tensor(x) else x


def device_counters(state: dict, device: torch.device) -> None:
    """Make ``state["step"]`` / ``state["nonfinite_skips"]`` 0-d tensors on ``device`` (float32 as
    torch's capturable step; int64), so the sync-free path can advance them by masks."""
    for key, dtype in (("step", torch.float32), ("nonfinite_skips", torch.int64)):
        v = state[key]
        if torch.is_tensor(v):
            if v.device != device or v.dtype != dtype:
                state[key] = v.to(device=device, dtype=dtype)
        else:
            # torch.full, not torch.tensor: a fill on the device, no host-to-device copy.
            state[key] = torch.full((), v, dtype=dtype, device=device)


def all_finite(xs: list[torch.Tensor]) -> list[bool]:
    """Finiteness of each (small) statistic, with one host sync for all of them."""
    if not xs:
        return []
    return torch.isfinite(torch.stack([x.reshape(-1).sum() for x in xs])).tolist()


def is_finite(x: torch.Tensor) -> bool:
    """True when the (small) statistic ``x`` holds no inf/nan. One host sync."""
    return bool(torch.isfinite(x).all())
