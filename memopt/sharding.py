"""Layouts: which elements of a parameter's full logical tensor this rank's local tensor holds.

An optimizer step only sees, per original parameter, the part this rank owns (DESIGN.md,
"Sharding"). Every layout here is described the same way: a contiguous range
``[start, start + length)`` of the row-major flattening of the full logical tensor, plus a kind:

* ``whole``  the full tensor (single process, DDP, DeepSpeed stage 0): no collectives at all.
* ``row``    FSDP2's ``Shard(0)``: whole rows (whole leading-dim slices), possibly uneven or empty.
             Every row is complete locally, so row statistics need no reduction and row-indexed
             factors (Adafactor's r, CAME's R) are stored only for the local rows.
* ``flat``   DeepSpeed ZeRO-1/2/3: any contiguous range, starting or ending mid-row. Rows at the
             edges are partial, so row statistics are reduced too; row factors are replicated.

A factored parameter of shape (*lead, m, n) is viewed as B = prod(lead) matrices; its "global
rows" are the B*m rows of that stack. The local range is cut into *pieces*: 2-D blocks
(rows x cols) of one matrix, either full-width rows or one partial row. Statistics are computed
per piece and scattered into full-length vectors (``row_sums``, ``col_sums``); factors are
broadcast back onto the local elements the same way (``scale``).

``Reducer`` gathers all of a phase's partial sums of all parameters into one flat fp32 buffer
and runs one all-reduce (SUM) over the data-parallel group: the number of collectives per
optimizer step is a small constant, independent of the number of parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

KINDS = ("whole", "row", "flat")

# Counters of the collectives the optimizers ran (tests and tools/bench_sharding.py read them).
COMM_STATS = {"collectives": 0, "bytes": 0}


def reset_comm_stats() -> None:
    COMM_STATS["collectives"] = 0
    COMM_STATS["bytes"] = 0


@dataclass(frozen=True)
class Piece:
    off: int  # offset in the local flat tensor
    row: int  # first global row
    rows: int
    col: int  # first column
    cols: int
    mat: int  # matrix index (global row // m)


class Layout:
    """The part of a full logical tensor held locally: flat range + kind + process group."""

    def __init__(self, full_shape, start: int = 0, length: int | None = None, kind: str = "whole", group=None):
        if kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}, got {kind!r}")
        self.full_shape = torch.Size(full_shape)
        self.numel = self.full_shape.numel()
        self.start = int(start)
        self.length = self.numel - self.start if length is None else int(length)
        if self.start < 0 or self.length < 0 or self.start + self.length > self.numel:
            raise ValueError(f"range [{start}, {start}+{length}) outside a tensor of {self.numel} elements")
        self.kind = kind
        self.group = group
        self.factored = len(self.full_shape) >= 2
        if self.factored:
            self.m, self.n = self.full_shape[-2], self.full_shape[-1]
            self.B = self.numel // max(self.m * self.n, 1)
            self.rows_total = self.B * self.m
            if kind == "row":
                if self.start % max(self.n, 1) or self.length % max(self.n, 1):
                    raise ValueError("a row layout must hold whole rows")
                self.row_lo = self.start // max(self.n, 1)
                self.row_hi = (self.start + self.length) // max(self.n, 1)
            else:
                self.row_lo, self.row_hi = 0, self.rows_total
        self._pieces = None
        self._row_mat = None

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def whole(cls, shape) -> "Layout":
        return cls(shape, 0, None, "whole", None)

    @classmethod
    def row_shard(cls, full_shape, row_start: int, row_stop: int, group) -> "Layout":
        full_shape = torch.Size(full_shape)
        inner = full_shape[1:].numel() if len(full_shape) > 1 else 1
        kind = "row" if len(full_shape) >= 2 else "flat"  # a sharded vector is just a range
        return cls(full_shape, row_start * inner, (row_stop - row_start) * inner, kind, group)

    @classmethod
    def flat(cls, full_shape, start: int, length: int, group) -> "Layout":
        return cls(full_shape, start, length, "flat", group)

    # -- properties --------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.kind != "whole"

    @property
    def rows_complete(self) -> bool:
        """Every local row is a full row (row sums need no reduction)."""
        return self.kind != "flat"

    @property
    def row_sharded(self) -> bool:
        """Row-indexed factors are stored for the local rows only."""
        return self.kind == "row"

    @property
    def holds_factors(self) -> bool:
        """False for a ``flat`` layout holding no element: it keeps no factor state at all."""
        return self.kind != "flat" or self.length > 0

    @property
    def window(self) -> int:
        """Length of the stored row-factor window."""
        return self.row_hi - self.row_lo

    def __repr__(self):
        return f"Layout({self.kind}, shape={tuple(self.full_shape)}, start={self.start}, length={self.length})"

    # -- pieces ------------------------------------------------------------------------------
    def pieces(self) -> list[Piece]:
        if self._pieces is None:
            out = []
            n, m = self.n, self.m
            f, end = self.start, self.start + self.length
            while f < end:
                row, j = divmod(f, n)
                if j or end - f < n:
                    cols = min(n - j, end - f)
                    out.append(Piece(f - self.start, row, 1, j, cols, row // m))
                    f += cols
                else:
                    mat = row // m
                    rows = min((end - f) // n, (mat + 1) * m - row)
                    out.append(Piece(f - self.start, row, rows, 0, n, mat))
                    f += rows * n
            self._pieces = out
        return self._pieces

    def _blocks(self, x: torch.Tensor):
        flat = x.reshape(-1)
        for pc in self.pieces():
            yield pc, flat[pc.off: pc.off + pc.rows * pc.cols].view(pc.rows, pc.cols)

    def row_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Partial row sums of local ``x`` over the row window (full length for ``flat``)."""
        out = torch.zeros(self.window, dtype=torch.float32, device=x.device)
        for pc, blk in self._blocks(x):
            lo = pc.row - self.row_lo
            out[lo: lo + pc.rows] += blk.sum(dim=1)
        return out

    def col_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Partial column sums of local ``x`` per matrix: (B, n)."""
        out = torch.zeros(self.B, self.n, dtype=torch.float32, device=x.device)
        for pc, blk in self._blocks(x):
            out[pc.mat, pc.col: pc.col + pc.cols] += blk.sum(dim=0)
        return out

    def scale(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x * a[row] * s[mat, col]`` on the local elements (a over the row window, s (B, n))."""
        out = torch.empty(self.length, dtype=torch.float32, device=x.device)
        o = out.view(-1)
        for pc, blk in self._blocks(x):
            lo = pc.row - self.row_lo
            dst = o[pc.off: pc.off + pc.rows * pc.cols].view(pc.rows, pc.cols)
            torch.mul(blk, a[lo: lo + pc.rows, None], out=dst)
            dst.mul_(s[pc.mat, pc.col: pc.col + pc.cols])
        return out

    def row_matrix(self, device=None) -> torch.Tensor:
        """Matrix index of every row of the window."""
        if self._row_mat is None:
            self._row_mat = torch.arange(self.row_lo, self.row_hi, device=device) // max(self.m, 1)
        return self._row_mat

    def matrix_row_sums(self, r: torch.Tensor) -> torch.Tensor:
        """Per-matrix sums (B,) of a row-window vector (a partial sum for ``row`` layouts)."""
        out = torch.zeros(self.B, dtype=torch.float32, device=r.device)
        out.index_add_(0, self.row_matrix(r.device), r.reshape(-1).float())
        return out

    # -- full <-> local (checkpoints) ----------------------------------------------------------
    def gather_full(self, local: torch.Tensor) -> torch.Tensor:
        """The full logical tensor from every rank's local element-wise piece (a collective)."""
        full = torch.zeros(self.numel, dtype=local.dtype, device=local.device)
        if self.length:
            full[self.start: self.start + self.length] = local.reshape(-1)
        if self.sharded and _world(self.group) > 1:
            dist.all_reduce(full, group=self.group)
        return full.view(self.full_shape)

    def local_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a full logical tensor (flat)."""
        return full.reshape(-1)[self.start: self.start + self.length].clone()

    def gather_rows(self, window: torch.Tensor, extra=()) -> torch.Tensor:
        """Full (B*m, *extra) row-indexed tensor from row windows (window, *extra) (a collective
        for ``row`` layouts). ``extra``: trailing dims per row, e.g. (k,) for Adapprox's Q."""
        if not self.row_sharded:
            return window.reshape(-1, *extra).clone()
        full = torch.zeros(self.rows_total, *extra, dtype=window.dtype, device=window.device)
        full[self.row_lo: self.row_hi] = window.reshape(-1, *extra)
        if _world(self.group) > 1:
            dist.all_reduce(full, group=self.group)
        return full

    def rows_of(self, full_rows: torch.Tensor, extra=()) -> torch.Tensor:
        """This rank's window (window, *extra) of a full row-indexed tensor."""
        return full_rows.reshape(self.rows_total, *extra)[self.row_lo: self.row_hi].clone()


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=group)


class Reducer:
    """Collects partial sums of one phase, all-reduces them in one flat buffer, hands them back."""

    def __init__(self, group):
        self.group = group
        self.parts: list[torch.Tensor] = []
        self.out: list[torch.Tensor] | None = None

    def add(self, t: torch.Tensor) -> int:
        self.parts.append(t.float().reshape(-1) if t.dim() else t.float().reshape(1))
        return len(self.parts) - 1

    def run(self) -> None:
        if not self.parts:
            self.out = []
            return
        shapes = [p.numel() for p in self.parts]
        flat = torch.cat(self.parts)
        if _world(self.group) > 1:
            dist.all_reduce(flat, group=self.group)
            COMM_STATS["collectives"] += 1
            COMM_STATS["bytes"] += flat.numel() * flat.element_size()
        self.out = list(flat.split(shapes))
        self.parts = []

    def get(self, h: int) -> torch.Tensor:
        return self.out[h]


@dataclass
class Unit:
    """One logical parameter's local piece in a sharded step."""

    key: object  # what the state is stored under (a parameter or a name)
    param: torch.Tensor  # local fp32 elements, flat (updated in place)
    grad: torch.Tensor  # local fp32 gradient, flat
    layout: Layout
    state: dict
    group: dict
    target: torch.Tensor | None = None  # the low-precision local tensor to write back into
    step: int = 0


def dtensor_layout(p) -> tuple[torch.Tensor, Layout]:
    """(local tensor, layout) of a DTensor parameter placed Shard(0) (FSDP2) or Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    placements = tuple(p.placements)
    local = p.to_local()
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    others_ok = all(isinstance(pl, (Replicate, Shard)) for pl in placements)
    if not others_ok or len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
        raise NotImplementedError(
            f"memopt: DTensor placements {placements} are not supported (Shard(0) on one mesh dim, "
            "Replicate elsewhere, as FSDP2/HSDP produce)"
        )
    if not shard_dims:
        return local, Layout.whole(p.shape)
    md = shard_dims[0]
    group = mesh.get_group(md)
    world = mesh.size(md)
    rank = mesh.get_local_rank(md)
    d0 = p.shape[0]
    chunk = math.ceil(d0 / world) if d0 else 0
    start = min(rank * chunk, d0)
    stop = min(start + chunk, d0)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"memopt: unexpected Shard(0) split: rank {rank} holds {local.shape[0]} of {d0} rows")
    return local, Layout.row_shard(p.shape, start, stop, group)


# -- name-keyed, world-size-independent optimizer state ------------------------------------------
def _slots(opt, names: dict | None):
    """(name, layout, state, init) for every logical parameter of ``opt``, in the same order on every
    rank. ``init()`` creates the state of a parameter that has none yet (for loading)."""
    from .base import _is_dtensor

    names = names or {}
    # Bound flat partitions first, in binding order (ZeRO-3 empties param_groups between steps).
    for p, frags in opt._fragments.items():
        group = opt._fragment_group[p]
        st = opt.state[p]
        for name, _off, layout in frags:
            sub = st.setdefault(name, {})
            yield name, layout, sub, _initializer(opt, name, layout, sub, group, p.device, None)
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt._fragments:
                continue
            if _is_dtensor(p):
                local, layout = dtensor_layout(p)
            else:
                local, layout = p, Layout.whole(p.shape)
            if p not in names:
                raise KeyError(f"no name for a parameter of shape {tuple(p.shape)}: pass names=model")
            st = opt.state[p]
            yield names[p], layout, st, _initializer(opt, p, layout, st, group, p.device, local)


def _initializer(opt, key, layout, state, group, device, local):
    def init():
        if not state:
            opt._new_state(key, local, layout, state, group, device)
    return init


def _param_names(model_or_names) -> dict:
    if model_or_names is None:
        return {}
    if isinstance(model_or_names, torch.nn.Module):
        return {p: n for n, p in model_or_names.named_parameters()}
    return dict(model_or_names)


def _kind_of(opt, key: str, layout: Layout) -> str:
    """How a state tensor is indexed: "elem" (like the parameter), "row" (by the rows of the
    (B*m, n) stack) or "col" (by matrix and column). Optimizers name it in ``state_kinds``;
    otherwise the suffixes _row/_col say it."""
    if not layout.factored:
        return "elem"
    declared = getattr(opt, "state_kinds", {}).get(key)
    if declared is not None:
        return declared
    if key.endswith("_row"):
        return "row"
    if key.endswith("_col"):
        return "col"
    return "elem"


def _extra_dims(v: torch.Tensor, layout: Layout, kind: str, local: bool) -> tuple:
    """Trailing dims per row / column of a row- or col-kind tensor (Adapprox's rank k; none for
    Adafactor's vectors). Local row tensors are (window, *extra); full ones and col tensors are
    (*full_shape[:-1], *extra) and (*full_shape[:-2], n, *extra)."""
    if kind == "row" and local and layout.sharded:
        return tuple(v.shape[1:])
    return tuple(v.shape[len(layout.full_shape) - 1:])


def full_state_dict(opt, names=None) -> dict:
    """The optimizer state keyed by parameter *name*, every tensor at its full logical shape.

    A collective when parameters are sharded: every rank must call it; every rank gets the same
    result (save it from one rank). ``names``: the model (its ``named_parameters``) or a
    {parameter: name} dict; DeepSpeed-bound partitions carry their names already. Restore with
    ``load_full_state_dict`` at any world size and any layout.
    """
    names = _param_names(names)
    out = {}
    for name, layout, st, _init in _slots(opt, names):
        if not st:
            continue
        entry = {}
        for key, v in st.items():
            if not torch.is_tensor(v):
                entry[key] = v
                continue
            kind = _kind_of(opt, key, layout)
            if kind == "elem":
                entry[key] = layout.gather_full(v) if layout.sharded else v.detach().clone()
                continue
            extra = _extra_dims(v, layout, kind, local=True)
            if kind == "row":
                shape = layout.full_shape[:-1] + extra
                if layout.kind == "flat":
                    entry[key] = _from_holders(layout, v, shape.numel()).view(shape)
                else:
                    entry[key] = layout.gather_rows(v, extra).view(shape)
            else:
                shape = layout.full_shape[:-2] + layout.full_shape[-1:] + extra
                if layout.kind == "flat":
                    entry[key] = _from_holders(layout, v, shape.numel()).view(shape)
                else:
                    entry[key] = v.detach().clone().view(shape)
        out[name] = entry
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sd = {"state": out, "param_groups": groups, "format": "memopt-full-v1"}
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None:
        sd["loss_scaler"] = dict(vars(scaler))
    return sd


def _from_holders(layout: Layout, v: torch.Tensor, numel: int) -> torch.Tensor:
    """A replicated factor of a ``flat`` layout, from the ranks that hold it (a MAX all-reduce:
    factors are positive and identical on holders; ranks holding no element contribute zeros)."""
    full = v.detach().reshape(-1).clone() if v.numel() else torch.zeros(numel, dtype=torch.float32, device=v.device)
    if _world(layout.group) > 1:
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=layout.group)
    return full


def load_full_state_dict(opt, sd: dict, names=None) -> None:
    """Restore a ``full_state_dict`` into ``opt`` (any world size, any layout)."""
    if sd.get("format") != "memopt-full-v1":
        raise ValueError("not a memopt full optimizer state dict (memopt.sharding.full_state_dict)")
    names = _param_names(names)
    missing = []
    for name, layout, st, init in _slots(opt, names):
        entry = sd["state"].get(name)
        if entry is None:
            missing.append(name)
            continue
        init()
        for key, v in entry.items():
            if not torch.is_tensor(v):
                st[key] = v
                continue
            cur = st.get(key)
            if cur is None:
                raise KeyError(f"{name}: saved state {key!r} is unknown to {type(opt).__name__}")
            kind = _kind_of(opt, key, layout)
            extra = () if kind == "elem" else _extra_dims(v, layout, kind, local=False)
            if kind == "elem":
                new = layout.local_of(v) if layout.sharded else v
            elif kind == "row" and layout.sharded:
                new = layout.rows_of(v, extra)  # (window, *extra); a flat window is all rows
            else:
                new = v
            if key in getattr(opt, "resizable_state", ()):
                # Its trailing size (a rank) changes during training: take the saved tensor as it is.
                st[key] = new.to(device=cur.device, dtype=torch.float32).clone()
                continue
            if cur.numel() == 0 and new.numel() != 0:
                continue  # a factor this rank does not keep (it holds no element of the parameter)
            cur.copy_(new.reshape(cur.shape))
    if missing and len(missing) == sum(1 for _ in _slots(opt, names)):
        raise KeyError(f"no saved state matches these parameters (e.g. {missing[0]!r})")
    if len(sd["param_groups"]) == len(opt.param_groups):
        for g, saved in zip(opt.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k in g})
    if "loss_scaler" in sd and getattr(opt, "loss_scaler", None) is not None:
        for k, v in sd["loss_scaler"].items():
            setattr(opt.loss_scaler, k, v)
