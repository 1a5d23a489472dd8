"""memopt.sharding.Layout: partial statistics of the pieces of a tensor add up to the full ones."""
from __future__ import annotations

import pytest
import torch

from memopt.sharding import Layout


def _split(numel, cuts):
    bounds = [0] + sorted(cuts) + [numel]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6), (2, 9), (1, 13), (5, 1)])
@pytest.mark.parametrize("kind", ["flat", "row"])
def test_partial_sums_add_up_and_scale_matches(shape, kind):
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(shape, generator=gen)
    numel = full.numel()
    n, m = shape[-1], shape[-2]
    B = numel // (m * n)
    if kind == "flat":
        cuts = torch.randperm(numel - 1, generator=gen)[:3].add(1).tolist()
        layouts = [Layout.flat(shape, a, l, None) for a, l in _split(numel, cuts)]
        layouts.append(Layout.flat(shape, numel, 0, None))  # an empty fragment
    else:
        d0 = shape[0]
        layouts = [Layout.row_shard(shape, a, min(a + 2, d0), None) for a in range(0, d0, 2)]
        layouts.append(Layout.row_shard(shape, d0, d0, None))
    rows = torch.zeros(B * m)
    cols = torch.zeros(B, n)
    a = torch.rand(B * m, generator=gen) + 0.5
    s = torch.rand(B, n, generator=gen) + 0.5
    expect_scaled = (full.reshape(B, m, n) * a.view(B, m, 1) * s.view(B, 1, n)).reshape(-1)
    covered = 0
    for L in layouts:
        local = L.local_of(full)
        assert local.numel() == L.length
        rs = L.row_sums(local)
        if L.row_sharded:
            rows[L.row_lo:L.row_hi] += rs
        else:
            rows += rs
        cols += L.col_sums(local)
        got = L.scale(local, a[L.row_lo:L.row_hi], s)
        torch.testing.assert_close(got, expect_scaled[L.start:L.start + L.length])
        covered += L.length
    assert covered == numel
    torch.testing.assert_close(rows, full.reshape(B, m, n).sum(-1).reshape(-1))
    torch.testing.assert_close(cols, full.reshape(B, m, n).sum(-2))


def test_row_layout_requires_whole_rows():
    with pytest.raises(ValueError, match="whole rows"):
        Layout((4, 5), 3, 5, "row")


def test_pieces_of_a_mid_row_fragment():
    L = Layout.flat((2, 3, 4), 6, 13, None)  # starts mid-row 1, crosses the matrix boundary
    got = [(p.row, p.rows, p.col, p.cols, p.mat) for p in L.pieces()]
    assert got == [(1, 1, 2, 2, 0), (2, 1, 0, 4, 0), (3, 1, 0, 4, 1), (4, 1, 0, 3, 1)]


def test_optimizer_without_sharding_support_refuses_sharded_parameters():
    from memopt.base import MemoptOptimizer

    class PlainSGD(MemoptOptimizer):  # a subclass that only writes the per-parameter hooks
        def __init__(self, params):
            super().__init__(params, dict(lr=0.1))

        def _init_state(self, p, state, group):
            pass

        def _update(self, p, grad, state, group, step):
            p.add_(grad, alpha=-group["lr"])
            return True

    flat = torch.nn.Parameter(torch.zeros(12))
    opt = PlainSGD([flat])
    assert not opt.supports_sharding
    opt.bind_fragments(flat, [("w", 0, Layout.flat((4, 6), 6, 12, None))])
    flat.grad = torch.ones(12)
    with pytest.raises(NotImplementedError, match="does not support sharded"):
        opt.step()


def test_single_process_fragments_equal_whole_parameter_update():
    """The phased sharded path on one rank holding whole parameters as flat fragments = the plain path."""
    import memopt

    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (3, 4, 6), (9,)]
    for name, hp in [("adafactor", dict(beta1=0.9)), ("came", dict(lr=1e-2)), ("adalomo", dict(lr=1e-2)),
                     ("adapprox", dict(lr=1e-2, k_max=2))]:
        whole = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in whole]))
        init = flat.detach().clone()
        frags, off = [], 0
        for i, p in enumerate(whole):
            # a rank holds at most one fragment of a parameter: here all of it, as a flat layout
            frags.append((f"p{i}", off, Layout.flat(p.shape, 0, p.numel(), None)))
            off += p.numel()
        o1 = memopt.create_optimizer(name, whole, **hp)
        o2 = memopt.create_optimizer(name, [flat], **hp)
        o2.bind_fragments(flat, frags)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for p, g in zip(whole, grads):
                p.grad = g
            flat.grad = torch.cat([g.reshape(-1) for g in grads])
            o1.step()
            o2.step()
        got = flat.detach()
        want = torch.cat([p.detach().reshape(-1) for p in whole])
        assert (want - init).abs().max() > 1e-3  # the parameters really moved
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,hp", [("adafactor", dict()), ("came", dict(lr=1e-2)), ("lomo", dict(lr=1e-2)),
                                     ("adapprox", dict(lr=1e-2))])
def test_sharded_path_skips_nonfinite_gradients_on_the_reduced_statistic(name, hp):
    import memopt

    flat = torch.nn.Parameter(torch.randn(35 + 9, generator=torch.Generator().manual_seed(0)))
    opt = memopt.create_optimizer(name, [flat], **hp)
    opt.bind_fragments(flat, [("w", 0, Layout.flat((7, 5), 0, 35, None)), ("b", 35, Layout.flat((9,), 0, 9, None))])
    flat.grad = torch.randn(44, generator=torch.Generator().manual_seed(1))
    opt.step()
    before = flat.detach().clone()
    g = torch.randn(44, generator=torch.Generator().manual_seed(2))
    g[3] = float("inf")  # poisons "w" only
    flat.grad = g
    opt.step()
    st = opt.state[flat]
    assert st["w"]["nonfinite_skips"] == 1 and st["w"]["step"] == 1
    assert st["b"]["nonfinite_skips"] == 0 and st["b"]["step"] == 2
    assert torch.equal(flat.detach()[:35], before[:35])
    assert not torch.equal(flat.detach()[35:], before[35:])
    for v in st["w"].values():
        if torch.is_tensor(v):
            assert torch.isfinite(v).all()


# -- tensor-parallel slices (memopt.sharding.tensor_parallel_layout) --------------------------
def _tp_layouts(shape, dim, tp, dp, inner):
    """Every (tp rank, dp rank) layout of a (m, n) tensor split over TP along ``dim`` and each
    slice sharded over DP as ``inner`` says ("whole", "row" or "flat")."""
    from memopt.sharding import TensorParallelSplit, tensor_parallel_layout

    local_shape = list(shape)
    local_shape[dim] //= tp
    numel = local_shape[0] * local_shape[1] if len(shape) == 2 else local_shape[0]
    out = []
    for t in range(tp):
        split = TensorParallelSplit(dim, t, tp, group=None, tp_dp_group=None if inner == "whole" else "tp_dp")
        if inner == "whole":
            locals_ = [Layout.whole(local_shape)]
        elif inner == "row":
            d0 = local_shape[0]
            chunk = -(-d0 // dp)
            locals_ = [Layout.row_shard(local_shape, min(r * chunk, d0), min((r + 1) * chunk, d0), "dp") for r in range(dp)]
        else:
            cuts = [numel * (r + 1) // dp - (r % 2) for r in range(dp - 1)]  # mid-row cuts
            locals_ = [Layout.flat(local_shape, a, l, "dp") for a, l in _split(numel, cuts)]
        out += [tensor_parallel_layout(L, split) for L in locals_]
    return out


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("inner", ["whole", "row", "flat"])
def test_tensor_parallel_pieces_cover_the_full_matrix_once(dim, inner):
    shape = (6, 8)
    full = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layouts = _tp_layouts(shape, dim, tp=2, dp=3, inner=inner)
    rows, cols = torch.zeros(6), torch.zeros(1, 8)
    rebuilt = torch.zeros(shape)
    for L in layouts:
        assert L.full_shape == torch.Size(shape) and L.sharded
        assert L.group == ("tp_dp" if inner != "whole" else None)
        local = L.local_of(full)
        assert local.numel() == L.length
        rows[L.row_lo:L.row_hi] += L.row_sums(local)
        cols += L.col_sums(local)
        rebuilt += L.gather_full(local)  # no process group: this rank's elements in place, zeros elsewhere
        # A column-split slice has partial rows: its row statistics need the reduction.
        assert L.rows_complete == (dim == 0 and inner != "flat")
    torch.testing.assert_close(rows, full.sum(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols, full.sum(0, keepdim=True), rtol=1e-6, atol=1e-6)
    assert torch.equal(rebuilt, full)


def test_column_window_local_elements_are_the_slice():
    from memopt.sharding import TensorParallelSplit, tensor_parallel_layout

    full = torch.arange(24.0).view(4, 6)
    L = tensor_parallel_layout(Layout.whole((4, 3)), TensorParallelSplit(1, 1, 2, group=None))
    assert torch.equal(L.local_of(full).view(4, 3), full[:, 3:])
    assert [(pc.row, pc.rows, pc.col, pc.cols) for pc in L.pieces()] == [(0, 4, 3, 3)]


def test_mark_tensor_parallel_rejects_what_it_cannot_place():
    import memopt

    with pytest.raises(ValueError, match="split dim 2"):
        memopt.mark_tensor_parallel(torch.nn.Parameter(torch.zeros(2, 2)), 2, 0, 2, None)
    with pytest.raises(ValueError, match="3-D"):
        memopt.mark_tensor_parallel(torch.nn.Parameter(torch.zeros(2, 2, 2)), 0, 0, 2, None)
    with pytest.raises(ValueError, match="rank 2 outside"):
        memopt.mark_tensor_parallel(torch.nn.Parameter(torch.zeros(2, 2)), 0, 2, 2, None)
    from memopt.sharding import TensorParallelSplit, tensor_parallel_layout

    with pytest.raises(ValueError, match="tp_dp_group"):
        tensor_parallel_layout(Layout.flat((2, 2), 0, 2, "dp"), TensorParallelSplit(0, 0, 2, group="tp"))
