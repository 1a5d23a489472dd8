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


def test_tp2_dp2_zero2_zero3_match_single_process():
    results = dh.run_world(tph.deepspeed_worker, 4, 2, (2, 3), ZERO_CASES)
    _check(results, ZERO_CASES, tags=("zero2", "zero3"))
