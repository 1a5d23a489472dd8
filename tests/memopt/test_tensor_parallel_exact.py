"""Tensor parallelism (memopt's 2-D layouts): parameters split over a TP group as megatron-core
splits them (rows, columns, replicated), optionally sharded further over the data-parallel group
(FSDP2 Shard(0) of each slice), give the single-process parameters after 5 steps (<= 1e-5) for
every memopt optimizer, in ordinary and fused-backward mode."""
from __future__ import annotations

import pytest

import dist_helpers as dh
import tp_helpers as tph

CASES = list(dh.CASES)


def _check(results, cases, tags=("whole",)):
    for case in cases:
        ref = dh.reference(case, shapes=tph.TP_SHAPES)
        init = dh.BagModel(0, tph.TP_SHAPES).ps
        assert max(float((x - p.detach()).abs().max()) for x, p in zip(ref, init)) > 1e-3, case
        for rank_result in results:
            for tag in tags:
                assert dh.max_abs_diff(rank_result[(tag, case)], ref) <= dh.TOL, (tag, case)


def test_tp2_dp1_matches_single_process():
    results = dh.run_world(tph.whole_worker, 2, 2, CASES)
    _check(results, CASES)


def test_tp2_dp2_ddp_and_fsdp2_match_single_process():
    results = dh.run_world(dh.combo_worker, 4, [(tph.whole_worker, (2, CASES)), (tph.fsdp2_worker, (2, CASES))])
    _check(results, CASES, tags=("whole", "fsdp2"))


ZERO_CASES = [c for c in CASES if not dh.CASES[c][2]]
# Every kind of state (row/column factors, CAME's extra pair, Adapprox's Q and U, dense vectors)
# and global-norm clipping, for the tests that run in CI's time; the slow marks cover all cases.
SUBSET = ["adafactor_b1_wd", "came", "adalomo_clip", "adapprox_k2_cold", "lomo_fused"]


def test_tp2_dp2_zero2_matches_single_process():
    cases = [c for c in SUBSET if c in ZERO_CASES]
    _check(dh.run_world(tph.deepspeed_worker, 4, 2, (2,), cases), cases, tags=("zero2",))


@pytest.mark.slow
def test_tp2_dp2_zero2_zero3_match_single_process_every_case():
    results = dh.run_world(tph.deepspeed_worker, 4, 2, (2, 3), ZERO_CASES)
    _check(results, ZERO_CASES, tags=("zero2", "zero3"))


@pytest.mark.parametrize("tp_before,tp_after", [(2, 1), (1, 2)])
def test_resume_at_another_tp_size_continues_exactly(tp_before, tp_after):
    """3 steps at one TP size, memopt.checkpoint.full_state_dict (by name, full shapes), 2 more
    at the other: the 5-step single-process parameters."""
    saved = dh.run_world(tph.resume_worker, tp_before, tp_before, SUBSET)[0]
    results = dh.run_world(tph.resume_worker, tp_after, tp_after, SUBSET, saved)
    for case in SUBSET:
        ref = dh.reference(case, shapes=tph.TP_SHAPES)
        for rank_result in results:
            assert dh.max_abs_diff(rank_result[case], ref) <= dh.TOL, case
