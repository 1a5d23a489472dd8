"""DeepSpeed ZeRO-0/1/2/3 (CPU, gloo): memopt optimizers through
``memopt.integrations.deepspeed.initialize`` compute the single-process update (5 steps, max abs
diff <= 1e-5) while each rank holds only its flat fragment; in bf16, every sharded update equals
the single-process update of the same full master weights and gradients; a memopt optimizer handed to plain
``deepspeed.initialize`` under ZeRO >= 1 fails on its first step with an error naming the fix.

DeepSpeed's CPU shared-memory all-reduce op is kept from JIT-compiling
(``dist_helpers.no_deepspeed_op_builds``), so these tests need no compiler and no op cache.
"""
from __future__ import annotations

import pytest

import dist_helpers as dh

pytest.importorskip("deepspeed")

ALL = [c for c in dh.CASES if not dh.CASES[c][2]]  # fused backward is not for ZeRO


def _check(results, stages, cases):
    for stage in stages:
        for case in cases:
            ref = dh.reference(case)
            assert dh.moved(ref) > 1e-3
            for r in results:
                assert dh.max_abs_diff(r[(stage, case)], ref) <= dh.TOL, (stage, case)
                if stage:
                    assert r[(stage, case, "bound")] >= 1


NAMES = [f"ps.{i}" for i in range(len(dh.SHAPES))]


def _check_bf16(results, stages, cases):
    """bf16 (DeepSpeed's bf16 model, fp32 master partitions): every client step equals the
    single-process fp32 update of the same full master weights and gradients."""
    for stage in stages:
        for case in cases:
            records = results[0][("bf16", stage, case)]
            assert len(records) == 3 and sorted(records[0]) == NAMES, (stage, case)
            moved = max(float((r[n][2] - r[n][0]).abs().max()) for r in records for n in NAMES)
            assert moved > 1e-4, (stage, case)
            assert dh.replay_single(case, records, NAMES) <= 1e-6, (stage, case)


def _single_state_bytes(case):
    import memopt

    name, hp, _ = dh.CASES[case]
    model = dh.BagModel(0)
    model(dh.batch(0)).backward()
    opt = memopt.create_optimizer(name, model.parameters(), **hp)
    opt.step()
    return opt.state_bytes()


def test_zero2_zero3_w3_uneven_exact_and_plain_initialize_fails_clearly():
    stages, cases = [2, 3], ["adafactor", "came", "adapprox_k2_cold"]
    jobs = [(dh.deepspeed_worker, (stages, cases)), (dh.deepspeed_worker, ([1], ["adafactor"], 2, False, True)),
            (dh.deepspeed_capture_worker, ([3], ["came", "adapprox_k2_cold"]))]
    results = dh.run_world(dh.combo_worker, 3, jobs)
    _check(results, stages, cases)
    _check_bf16(results, [3], ["came", "adapprox_k2_cold"])
    # Each rank holds its fragment: CAME keeps a first moment of every element, so a rank's state
    # is well under the single-process state.
    assert max(r[(3, "came", "state_bytes")] for r in results) < 0.75 * _single_state_bytes("came")
    # plain deepspeed.initialize: the first real step raises, naming the right call
    for r in results:
        msg = r[(1, "adafactor")]
        assert isinstance(msg, str), "a memopt optimizer under plain deepspeed.initialize must not run"
        assert "memopt.integrations.deepspeed.initialize" in msg


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_full_matrix(world):
    stages = [0, 1, 2, 3]
    _check(dh.run_world(dh.deepspeed_worker, world, stages, ALL), stages, ALL)


@pytest.mark.slow
def test_bf16_matrix_w2():
    stages = [1, 2, 3]
    _check_bf16(dh.run_world(dh.deepspeed_capture_worker, 2, stages, ALL), stages, ALL)
