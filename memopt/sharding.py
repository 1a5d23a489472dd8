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
This module imports no other part of memopt: optimizers (``memopt.base``) build on layouts, and
what code outside an optimizer may rely on is the ``LayoutOptimizer`` protocol below
(``memopt.checkpoint`` uses nothing else).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ContextManager, Iterator, Mapping, Protocol

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

    def __init__(self, full_shape, start: int = 0, length: int | None = None, kind: str = "whole", group=None,
                 cols: tuple[int, int] | None = None):
        if kind not in KINDS:
            raise ValueError(f"layout kind must be one of {KINDS}, got {kind!r}")
        self.full_shape = torch.Size(full_shape)
        self.numel = self.full_shape.numel()
        self.factored = len(self.full_shape) >= 2
        # ``cols``: a column window [lo, hi) of every matrix (a row-parallel TP slice); the range
        # [start, start+length) then runs over the row-major flattening of that window.
        n_full = self.full_shape[-1] if self.factored else 0
        self.col_lo, self.col_hi = (0, n_full) if cols is None else (int(cols[0]), int(cols[1]))
        if cols is not None and (not self.factored or not 0 <= self.col_lo <= self.col_hi <= n_full):
            raise ValueError(f"column window {cols} does not fit a tensor of shape {tuple(self.full_shape)}")
        self.col_split = self.factored and (self.col_lo, self.col_hi) != (0, n_full)
        window_numel = self.numel // max(n_full, 1) * (self.col_hi - self.col_lo) if self.col_split else self.numel
        self.start = int(start)
        self.length = window_numel - self.start if length is None else int(length)
        if self.start < 0 or self.length < 0 or self.start + self.length > window_numel:
            raise ValueError(f"range [{start}, {start}+{length}) outside a tensor of {window_numel} elements")
        self.kind = kind
        self.group = group
        if self.factored:
            self.m, self.n = self.full_shape[-2], self.full_shape[-1]
            self.B = self.numel // max(self.m * self.n, 1)
            self.rows_total = self.B * self.m
            width = max(self.col_hi - self.col_lo, 1)
            if kind == "row" and (self.start % width or self.length % width):
                raise ValueError("a row layout must hold whole rows")
            if kind == "row" and not self.col_split:
                self.row_lo = self.start // width
                self.row_hi = (self.start + self.length) // width
            else:  # rows split over columns are partial: their factors are kept for all rows
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
        return self.kind != "whole" or self.col_split

    @property
    def rows_complete(self) -> bool:
        """Every local row is a full row (row sums need no reduction)."""
        return self.kind != "flat" and not self.col_split

    @property
    def row_sharded(self) -> bool:
        """Row-indexed factors are stored for the local rows only."""
        return self.kind == "row" and not self.col_split

    @property
    def column_window(self) -> tuple[int, int, int] | None:
        """(width, n, first column) of a column window (a row-parallel TP slice), else None:
        how a position in the local range maps to the full tensor (``stochastic_rounding``)."""
        return (self.col_hi - self.col_lo, self.n, self.col_lo) if self.col_split else None

    @property
    def holds_factors(self) -> bool:
        """False for a ``flat`` layout holding no element: it keeps no factor state at all."""
        return self.kind != "flat" or self.length > 0

    @property
    def window(self) -> int:
        """Length of the stored row-factor window."""
        return self.row_hi - self.row_lo

    def __repr__(self):
        cols = f", cols=[{self.col_lo}, {self.col_hi})" if self.col_split else ""
        return f"Layout({self.kind}, shape={tuple(self.full_shape)}, start={self.start}, length={self.length}{cols})"

    # -- pieces ------------------------------------------------------------------------------
    def pieces(self) -> list[Piece]:
        if self._pieces is None:
            out = []
            n, m, c0 = self.col_hi - self.col_lo, self.m, self.col_lo  # n: the window's width
            f, end = self.start, self.start + self.length
            while f < end:
                row, j = divmod(f, n)
                if j or end - f < n:
                    cols = min(n - j, end - f)
                    out.append(Piece(f - self.start, row, 1, c0 + j, cols, row // m))
                    f += cols
                else:
                    mat = row // m
                    rows = min((end - f) // n, (mat + 1) * m - row)
                    out.append(Piece(f - self.start, row, rows, c0, n, mat))
                    f += rows * n
            self._pieces = out
        return self._pieces

    def blocks(self, x: torch.Tensor):
        """(piece, its (rows, cols) view of local ``x``) for every piece of the local range."""
        flat = x.reshape(-1)
        for pc in self.pieces():
            yield pc, flat[pc.off: pc.off + pc.rows * pc.cols].view(pc.rows, pc.cols)

    def row_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Partial row sums of local ``x`` over the row window (full length for ``flat``)."""
        out = torch.zeros(self.window, dtype=torch.float32, device=x.device)
        for pc, blk in self.blocks(x):
            lo = pc.row - self.row_lo
            out[lo: lo + pc.rows] += blk.sum(dim=1)
        return out

    def col_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Partial column sums of local ``x`` per matrix: (B, n)."""
        out = torch.zeros(self.B, self.n, dtype=torch.float32, device=x.device)
        for pc, blk in self.blocks(x):
            out[pc.mat, pc.col: pc.col + pc.cols] += blk.sum(dim=0)
        return out

    def scale(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x * a[row] * s[mat, col]`` on the local elements (a over the row window, s (B, n))."""
        out = torch.empty(self.length, dtype=torch.float32, device=x.device)
        o = out.view(-1)
        for pc, blk in self.blocks(x):
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
        if self.col_split:
            grid = full.view(self.rows_total, self.n)
            for pc, blk in self.blocks(local):
                grid[pc.row: pc.row + pc.rows, pc.col: pc.col + pc.cols] = blk
        elif self.length:
            full[self.start: self.start + self.length] = local.reshape(-1)
        if self.sharded and _world(self.group) > 1:
            dist.all_reduce(full, group=self.group)
        return full.view(self.full_shape)

    def local_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a full logical tensor (flat)."""
        if self.col_split:
            grid = full.reshape(self.rows_total, self.n)
            parts = [grid[pc.row: pc.row + pc.rows, pc.col: pc.col + pc.cols].reshape(-1) for pc in self.pieces()]
            return torch.cat(parts) if parts else full.new_zeros(0)
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

    def gather_from_holders(self, v: torch.Tensor, numel: int) -> torch.Tensor:
        """A replicated factor of a ``flat`` layout, from the ranks that hold it (a MAX all-reduce:
        factors are positive and identical on holders; ranks holding no element contribute zeros)."""
        full = v.detach().reshape(-1).clone() if v.numel() else torch.zeros(numel, dtype=torch.float32, device=v.device)
        if _world(self.group) > 1:
            dist.all_reduce(full, op=dist.ReduceOp.MAX, group=self.group)
        return full


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


class LogicalParam:
    """One logical parameter of an optimizer as its users (checkpoints, engines) see it.

    ``key`` is what its state belongs to: the parameter itself, or its name for a fragment of a
    bound flat partition (which carries its name). ``local`` is the local tensor when the
    parameter is not a fragment (the parameter, or a DTensor's local shard), else None.
    """

    def __init__(self, key, layout: Layout, group: dict, device, local, states: dict, state_key):
        self.key = key
        self.layout = layout
        self.group = group
        self.device = device
        self.local = local
        self._states = states
        self._state_key = state_key

    @property
    def state(self) -> dict:
        """Its (possibly empty) state dict in the optimizer. Looked up on first use, so listing
        parameters creates no state entries for those a caller then rejects."""
        return self._states.setdefault(self._state_key, {})


class LayoutOptimizer(Protocol):
    """What code outside an optimizer (``memopt.checkpoint``, engine integrations) relies on.

    ``memopt.base.MemoptOptimizer`` implements it; this module defines it so that layouts and
    their users need not import the optimizers (the dependency runs layouts <- optimizers).
    """

    param_groups: list[dict]

    def logical_params(self) -> Iterator[LogicalParam]:
        """Every logical parameter, in the same order on every rank."""

    def ensure_state(self, lp: LogicalParam) -> dict:
        """``lp.state``, created first if it is empty."""

    def suspended(self) -> ContextManager[None]:
        """A context in which ``step()`` changes nothing."""

    def bind_fragments(self, flat: torch.Tensor, fragments: list[tuple[str, int, Layout]], group: dict | None = None) -> None:
        """Declare that the 1-D ``flat`` holds the given (name, offset, layout) pieces."""

    @property
    def fragments(self) -> Mapping[torch.Tensor, list[tuple[str, int, Layout]]]:
        """The bound flat partitions, read-only."""


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return DTensor


_DTENSOR = _dtensor_class()


def is_dtensor(t) -> bool:
    # Called for every parameter on every step: the class is looked up once, at import.
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


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


# -- tensor parallelism ----------------------------------------------------------------------
# A tensor-parallel weight (megatron-core's column-, row- and vocab-parallel layers) is a slice
# of its logical matrix: rows split (dim 0: column-parallel, vocab-parallel embedding) or columns
# split (dim 1: row-parallel). Engines mark such parameters; layouts then place the local slice
# inside the full matrix, so factored statistics are reduced over the ranks that split it.
TP_ATTR = "_memopt_tensor_parallel"


@dataclass(frozen=True)
class TensorParallelSplit:
    """How a parameter is split over a tensor-parallel group (equal contiguous slices)."""

    dim: int  # 0 (rows of the matrix) or 1 (columns); biases of column-parallel layers: 0
    rank: int  # this rank's index in the TP group
    world: int  # TP group size
    group: object  # the TP process group
    tp_dp_group: object = None  # the group of every rank of TP x DP (for data-parallel sharding)


def mark_tensor_parallel(param: torch.Tensor, dim: int, rank: int, world: int, group,
                         tp_dp_group=None) -> None:
    """Declare ``param`` (its local slice) as split along ``dim`` over a TP group of ``world``
    ranks; ``tp_dp_group`` spans TP x DP and is needed when the data-parallel engine shards the
    slice further (ZeRO, FSDP2). Call it on the parameter the optimizer will see (after FSDP2's
    ``fully_shard``, which replaces parameters)."""
    if dim not in (0, 1) or param.dim() not in (1, 2) or (param.dim() == 1 and dim != 0):
        raise ValueError(f"memopt: tensor-parallel split dim {dim} of a {param.dim()}-D parameter is not supported "
                         "(2-D weights split along 0 or 1, 1-D biases along 0)")
    if not 0 <= rank < world:
        raise ValueError(f"memopt: tensor-parallel rank {rank} outside a group of {world}")
    setattr(param, TP_ATTR, TensorParallelSplit(dim, rank, world, group, tp_dp_group))


def tensor_parallel_split(param) -> TensorParallelSplit | None:
    """The split ``mark_tensor_parallel`` declared for ``param``, or None (``world == 1`` too)."""
    split = getattr(param, TP_ATTR, None)
    return split if split is not None and split.world > 1 else None


def tensor_parallel_layout(local: Layout, split: TensorParallelSplit) -> Layout:
    """The layout, in the full logical tensor, of a tensor-parallel slice whose own layout (over
    the slice's shape, sharded over the data-parallel group or whole) is ``local``.

    Rows split (dim 0): the slice is a contiguous run of whole rows of the full tensor, so it is a
    ``row`` layout (or the ``flat``/``row`` range inside it, shifted). Columns split (dim 1): a
    column window; its rows are partial, so row statistics are reduced over the group too.
    The group is the TP group, or TP x DP when the data-parallel engine shards the slice further.
    """
    shape = list(local.full_shape)
    shape[split.dim] *= split.world
    if local.sharded:
        if split.tp_dp_group is None:
            raise ValueError("memopt: a tensor-parallel parameter sharded over data parallelism needs "
                             "mark_tensor_parallel(..., tp_dp_group=<the TP x DP group>)")
        group = split.tp_dp_group
    else:
        group = split.group
    if split.dim == 0:
        kind = local.kind if local.kind != "whole" else ("row" if len(shape) >= 2 else "flat")
        return Layout(shape, split.rank * local.numel + local.start, local.length, kind, group)
    width = local.full_shape[-1]
    return Layout(shape, local.start, local.length, local.kind, group,
                  cols=(split.rank * width, (split.rank + 1) * width))


def local_layout(p) -> tuple[torch.Tensor, Layout]:
    """(local tensor, layout in the full logical tensor) of a parameter the optimizer steps: a
    plain tensor, a DTensor (FSDP2), either possibly a tensor-parallel slice."""
    local, layout = dtensor_layout(p) if is_dtensor(p) else (p, Layout.whole(p.shape))
    return local, with_tensor_parallel(layout, p)


def with_tensor_parallel(layout: Layout, p) -> Layout:
    """``layout`` (of ``p``'s local slice) placed in the full tensor if ``p`` is marked
    tensor-parallel; unchanged otherwise."""
    split = tensor_parallel_split(p)
    return layout if split is None else tensor_parallel_layout(layout, split)
