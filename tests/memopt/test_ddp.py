"""DDP: memopt optimizers work unchanged (whole parameters, averaged gradients), and fused
backward (AdaLomo, LOMO) runs in a comm hook on averaged gradients: 5 steps equal the
single-process run on the global batch."""
from __future__ import annotations

import pytest

import dist_helpers as dh

DEFAULT = ["adafactor", "came", "adalomo_fused", "lomo_fused"]
ALL = [c for c in dh.CASES if c != "adalomo_clip"]


def _check(results, cases):
    for case in cases:
        ref = dh.reference(case)
        assert dh.moved(ref) > 1e-3, case
        for r in results:
            assert dh.max_abs_diff(r[case], ref) <= dh.TOL, case


def test_ddp_w2_matches_single_process():
    _check(dh.run_world(dh.ddp_worker, 2, DEFAULT), DEFAULT)


@pytest.mark.slow
def test_ddp_w3_all_optimizers():
    _check(dh.run_world(dh.ddp_worker, 3, ALL), ALL)


def test_ddp_fused_refuses_global_norm_clipping():
    import memopt
    from memopt.integrations.ddp import register_fused_backward

    opt = memopt.AdaLomo(dh.BagModel(0).parameters(), clip_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="clip_grad_norm"):
        register_fused_backward(object(), opt)
