"""FSDP2 (fully_shard, Shard(0) DTensors, uneven and empty shards): after 5 steps every memopt
optimizer gives the single-process parameters on the same global batch (max abs diff <= 1e-5),
in ordinary and fused-backward mode, while each rank holds only its share of the state."""
from __future__ import annotations

import pytest

import dist_helpers as dh

CASES = list(dh.CASES)


def _check(results, cases):
    for case in cases:
        ref = dh.reference(case)
        assert dh.moved(ref) > 1e-3, case
        for rank_result in results:
            assert dh.max_abs_diff(rank_result[case], ref) <= dh.TOL, case


# All-reduces per optimizer step, whatever the number of parameters (6 here): Adafactor/AdaLomo
# 2 phases, CAME 3, LOMO 1, global-norm clipping 1 more. Adapprox: 2 rounds plus one per product
# of its sketch (ALGORITHMS.md: 2 l + 2 for a cold sketch, l = 5; 2 l + 1 warm, l = 1): the
# first step is cold (14), the later ones warm (5), or cold every step with warm_start=False.
COLLECTIVES_PER_STEP = {"adafactor": 2, "adafactor_b1_wd": 2, "came": 3, "adalomo": 2, "adalomo_clip": 3, "lomo": 1,
                        "adapprox_k2_cold": 14}
COLLECTIVES_5_STEPS = {"adapprox": 14 + 4 * 5}


def test_fsdp2_w3_uneven_matches_single_process():
    results = dh.run_world(dh.fsdp2_worker, 3, CASES)
    _check(results, CASES)
    for case, per_step in COLLECTIVES_PER_STEP.items():
        for r in results:
            assert r[case + ":collectives"] == per_step * dh.STEPS, case
    for case, total in COLLECTIVES_5_STEPS.items():
        for r in results:
            assert r[case + ":collectives"] == total, case
    # Each rank holds its share: less factored state than a single process would.
    for case in ("came", "adafactor_b1_wd", "adapprox"):
        import memopt

        name, hp, _ = dh.CASES[case]
        single = memopt.create_optimizer(name, dh.BagModel(0).parameters(), **hp)
        model = dh.BagModel(0)
        model(dh.batch(0)).backward()
        single = memopt.create_optimizer(name, model.parameters(), **hp)
        single.step()
        assert max(r[case + ":state_bytes"] for r in results) < single.state_bytes()


@pytest.mark.slow
def test_fsdp2_w2_matches_single_process():
    _check(dh.run_world(dh.fsdp2_worker, 2, CASES), CASES)


def test_state_bytes_of_a_torch_optimizer_counts_the_local_shards():
    """AdamW's exp_avg / exp_avg_sq are DTensors under FSDP2: each rank counts its own shard."""
    results = dh.run_world(dh.torch_optimizer_state_bytes_worker, 2)
    # per rank: weight rows 3 x 8 and bias 3, two fp32 moments each, plus two fp32 step counters
    assert results == [(3 * 8 + 3) * 4 * 2 + 2 * 4] * 2
