"""Stochastic rounding of updates into bf16 weights (memopt.stochastic_rounding, LOMO/AdaLomo's
``stochastic_rounding=True``): unbiased, reproducible from (seed, step) alone, independent of the
sharding layout, and free of host syncs on the sync-free path.

Expected values come from the bf16 grid itself (the two bf16 neighbours of an fp32 value, by bit
truncation, and the fraction of the way between them in float64), never from the code tested.
"""
from __future__ import annotations

import pytest
import torch

import memopt
from memopt.stochastic_rounding import hash32, stochastic_round_bf16
from test_foreach import CountOps


def _neighbours(x: torch.Tensor):
    """The bf16 values just below and above fp32 ``x`` in magnitude (x > 0), and how far between."""
    down = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    up = (down.bfloat16().view(torch.int16) + 1).view(torch.bfloat16).float()
    frac = (x.double() - down.double()) / (up.double() - down.double())
    return down, up, frac


def test_hash_is_the_published_lowbias32_on_ints_and_tensors():
    # lowbias32 (C. Wellons, "Prospecting for hash functions"), computed by hand in 64-bit ints.
    def reference(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    assert [hash32(x) for x in xs] == [reference(x) for x in xs]
    assert hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [reference(x) for x in xs]


def test_rounds_to_a_neighbour_with_the_right_probability():
    n = 200_000
    # 1 + a quarter of a bf16 step: rounded up with probability 1/4.
    x = torch.full((n,), 1.0 + 0.25 * 2.0**-7)
    r = stochastic_round_bf16(x, seed=0, index=0, step=1).float()
    down, up, _ = _neighbours(x[:1])
    assert set(r.unique().tolist()) == {float(down), float(up)}
    share_up = float((r == float(up)).double().mean())
    assert abs(share_up - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5


def test_mean_of_many_roundings_is_the_fp32_value():
    gen = torch.Generator().manual_seed(0)
    # Both signs, exponents over 12 binades, fractions anywhere between two bf16 values.
    x = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-6, 6, (4096,), generator=gen).float())
    reps = 512
    mean = torch.stack([stochastic_round_bf16(x, 7, 3, step).double() for step in range(1, reps + 1)]).mean(0)
    down, up, frac = _neighbours(x.abs())
    ulp = up.double() - down.double()
    # Each rounding is down + ulp * Bernoulli(frac): the mean's standard error is ulp*sqrt(f(1-f)/reps).
    z = (mean.abs() - x.abs().double()) / (ulp * (frac * (1 - frac) / reps).clamp_min(1e-12).sqrt())
    z = z[(frac > 0.01) & (frac < 0.99)]
    assert z.abs().max() < 6
    assert abs(float(z.mean())) < 4 / z.numel() ** 0.5 * 1.5  # no bias over all elements together
    # Round to nearest would be off by frac*ulp on average: far outside the statistics.
    nearest = x.bfloat16().double()
    assert float((nearest - x.double()).abs().mean()) > 10 * float((mean - x.double()).abs().mean())


def test_exact_values_inf_and_nan_are_kept():
    x = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), float("nan"), 3.0e38])
    r = stochastic_round_bf16(x, 0, 0, 1).float()
    assert r[:5].tolist() == [1.0, -2.5, 0.0, float("inf"), -float("inf")]
    assert torch.isnan(r[5]) and r[6] > 2.9e38


def test_same_key_same_bits_other_key_other_bits():
    x = torch.randn(1000) * 1e-2
    a = stochastic_round_bf16(x, 1, 5, 9)
    assert torch.equal(a.view(torch.int16), stochastic_round_bf16(x.clone(), 1, 5, 9).view(torch.int16))
    for other in [(2, 5, 9), (1, 6, 9), (1, 5, 10)]:
        assert not torch.equal(a, stochastic_round_bf16(x, *other))


def test_a_shard_rounds_as_its_range_of_the_whole_tensor():
    x = torch.randn(10_000) * 1e-2
    whole = stochastic_round_bf16(x, 3, 2, 4)
    for lo, hi in [(0, 4000), (4000, 7001), (7001, 10_000)]:
        assert torch.equal(stochastic_round_bf16(x[lo:hi], 3, 2, 4, start=lo), whole[lo:hi])


def test_a_column_slice_rounds_as_those_columns_of_the_whole_tensor():
    """A row-parallel TP slice (columns [c0, c1) of every row), also a ZeRO range inside it,
    draws the bits the whole tensor draws for the same elements."""
    from memopt.sharding import Layout, TensorParallelSplit, tensor_parallel_layout

    x = torch.randn(12, 10) * 1e-2
    whole = stochastic_round_bf16(x, 3, 2, 4)
    for rank in range(2):
        layout = tensor_parallel_layout(Layout.flat((12, 5), 7, 31, "dp"), TensorParallelSplit(1, rank, 2, "tp", "tp_dp"))
        local = layout.local_of(x)
        got = stochastic_round_bf16(local, 3, 2, 4, start=layout.start, window=layout.column_window)
        assert torch.equal(got, layout.local_of(whole))


def test_a_stack_rounds_as_its_parameters_one_by_one():
    x = torch.randn(3, 40, 7)
    index, step = torch.tensor([4, 0, 9]), torch.tensor([2.0, 2.0, 5.0])
    stacked = stochastic_round_bf16(x, 11, index, step)
    for i in range(3):
        assert torch.equal(stacked[i], stochastic_round_bf16(x[i], 11, int(index[i]), int(step[i])))


# -- in the optimizers -----------------------------------------------------------------------------
def _tiny_updates(cls, stochastic, foreach, steps=200):
    """Weights 1.0 in bf16, an update of 1e-4 per step: 1/78 of a bf16 step (2**-7)."""
    p = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    opt = cls([p], lr=1e-4, stochastic_rounding=stochastic, foreach=foreach)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p.detach().double()


@pytest.mark.parametrize("foreach", [False, True])
def test_lomo_keeps_updates_below_bf16_resolution(foreach):
    assert torch.equal(_tiny_updates(memopt.Lomo, False, foreach), torch.ones(20_000, dtype=torch.double))
    p = _tiny_updates(memopt.Lomo, True, foreach)
    # The fp32 trajectory ends at 1 - 200 * 1e-4 = 0.98; each element is a sum of unbiased roundings.
    assert abs(float(p.mean()) - 0.98) < 2e-4


def _update(opt, loss, fused):
    if fused:
        return opt.fused_backward(loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _run(cls, hp, steps, foreach, fused, state=None, start=0, params=None):
    gen = torch.Generator().manual_seed(0)
    params = params or [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).bfloat16())
                        for s in [(33, 16), (16,), (33, 16), (7, 5, 3)]]
    opt = cls(params, stochastic_rounding=True, rounding_seed=5, foreach=foreach, **hp)
    if state is not None:
        opt.load_state_dict(state)
    for step in range(start, steps):
        g = torch.Generator().manual_seed(100 + step)
        xs = [torch.randn(p.shape, generator=g) for p in params]
        loss = sum((p.float() * x).sum() + (p.float() ** 2).sum() for p, x in zip(params, xs))
        _update(opt, loss, fused)
    return params, opt


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls, hp", [(memopt.Lomo, dict(lr=1e-3)), (memopt.AdaLomo, dict(lr=1e-3, weight_decay=0.1))])
def test_reproducible_and_resume_continues_bit_exactly(cls, hp, foreach, fused):
    full, _ = _run(cls, hp, 6, foreach, fused)
    again, _ = _run(cls, hp, 6, foreach, fused)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(full, again))
    half, opt = _run(cls, hp, 3, foreach, fused)
    state = opt.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in half]
    resumed, _ = _run(cls, hp, 6, foreach, fused, state=state, start=3, params=resumed_params)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(full, resumed))
    moved = [torch.equal(a, b) for a, b in zip(full, half)]
    assert not any(moved)  # the last three steps changed every parameter


def test_seed_changes_the_rounding():
    a, _ = _run(memopt.Lomo, dict(lr=1e-3), 3, False, False)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).bfloat16())
              for s in [(33, 16), (16,), (33, 16), (7, 5, 3)]]
    opt = memopt.Lomo(params, lr=1e-3, stochastic_rounding=True, rounding_seed=6)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        loss = sum((p.float() * torch.randn(p.shape, generator=g)).sum() + (p.float() ** 2).sum() for p in params)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert not torch.equal(a[0], params[0])


@pytest.mark.parametrize("cls", [memopt.Lomo, memopt.AdaLomo])
def test_no_host_sync_on_the_sync_free_path(cls):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in [(8, 4), (8, 4), (5,)]]
    opt = cls(params, lr=1e-3, stochastic_rounding=True, foreach=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        with CountOps() as c:
            opt.step()
        assert c.syncs == 0
        opt.zero_grad(set_to_none=True)
        loss = sum((p.float() ** 2).sum() for p in params)
        with CountOps() as c:
            opt.fused_backward(loss)
        assert c.syncs == 0


def _ops_per_step(layers: int) -> int:
    params = [torch.nn.Parameter(torch.randn(s).bfloat16()) for _ in range(layers) for s in [(16, 16), (16,)]]
    opt = memopt.AdaLomo(params, lr=1e-3, stochastic_rounding=True, foreach=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape).bfloat16()
        with CountOps() as c:
            opt.step()
    return len(c.ops)


def test_dispatched_ops_do_not_grow_with_depth():
    assert _ops_per_step(4) == _ops_per_step(8)


@pytest.mark.parametrize("bad", [dict(stochastic_rounding=1), dict(rounding_seed=-1), dict(rounding_seed=1.5)])
def test_bad_options_are_refused_with_one_line(bad):
    with pytest.raises(ValueError, match="stochastic_rounding|rounding_seed"):
        memopt.AdaLomo([torch.nn.Parameter(torch.ones(2))], **bad)


# -- identical across sharding layouts ---------------------------------------------------------------
def _bag_bf16():
    import dist_helpers as dh

    model = dh.BagModel(0)
    return model.to(torch.bfloat16)


def _lomo_steps(model, fused, batches):
    opt = memopt.Lomo(model.parameters(), lr=3e-2, stochastic_rounding=True, rounding_seed=3)
    for xs in batches:
        loss = model([x.bfloat16() for x in xs])
        _update(opt, loss, fused)


def _fsdp2_sr_worker(rank, world, fused):
    import dist_helpers as dh
    from torch.distributed.fsdp import fully_shard

    model = _bag_bf16()
    fully_shard(model)
    # Every rank sees the whole batch, so the averaged bf16 gradient is the single process's.
    _lomo_steps(model, fused, [dh.batch(s) for s in range(dh.STEPS)])
    return [p.full_tensor().detach().clone() for p in model.ps]


def test_fsdp2_shards_round_as_the_single_process():
    """2 ranks, fused backward (ordinary steps write back through the same sharded path)."""
    import dist_helpers as dh

    fused = True
    single = _bag_bf16()
    _lomo_steps(single, fused, [dh.batch(s) for s in range(dh.STEPS)])
    nearest = _bag_bf16()
    opt = memopt.Lomo(nearest.parameters(), lr=3e-2)
    for s in range(dh.STEPS):
        nearest([x.bfloat16() for x in dh.batch(s)]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    results = dh.run_world(_fsdp2_sr_worker, 2, fused)
    for ranked in results:
        assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(ranked, single.ps))
    # ... and the rounding did something: it is not round-to-nearest.
    assert not all(torch.equal(a, b) for a, b in zip(single.ps, nearest.ps))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rounds_the_same_bits_as_cpu_without_a_host_sync():
    x = torch.randn(3, 70_000) * 1e-2
    index, step = torch.tensor([1, 4, 2]), torch.tensor([3.0, 3.0, 8.0])
    cpu = stochastic_round_bf16(x, 9, index, step)
    assert torch.equal(stochastic_round_bf16(x.cuda(), 9, index.cuda(), step.cuda()).cpu(), cpu)
    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda").bfloat16()) for _ in range(3)]
    opt = memopt.AdaLomo(params, lr=1e-3, stochastic_rounding=True, foreach=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # raises on any host sync
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
