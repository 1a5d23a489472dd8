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
