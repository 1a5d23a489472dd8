"""Name-keyed optimizer state (memopt.checkpoint.full_state_dict): saved on W ranks, restored on
W' ranks (2 -> 1, 1 -> 2, ZeRO-3 on 2 -> 1), training continues exactly as an uninterrupted run."""
from __future__ import annotations

import pytest

import dist_helpers as dh
import memopt
from memopt.checkpoint import full_state_dict, load_full_state_dict

CASES = ["adafactor_b1_wd", "came", "adalomo", "adapprox", "adapprox_k2_cold"]


def _single(case, saved=None, split=3):
    name, hp, fused = dh.CASES[case]
    model = dh.BagModel(0)
    opt = memopt.create_optimizer(name, model.parameters(), **hp)
    if saved is None:
        dh.train_steps(model, opt, range(split), fused=fused)
        return [p.detach().clone() for p in model.ps], full_state_dict(opt, model)
    dh.load_full_params(model, saved[0])
    load_full_state_dict(opt, saved[1], model)
    dh.train_steps(model, opt, range(split, dh.STEPS), fused=fused)
    return [p.detach().clone() for p in model.ps]


def _resumed_and_lost(case, saved):
    """The resumed run, and a run resumed *without* optimizer state (must differ)."""
    resumed = _single(case, saved)
    params, _state = saved
    name, hp, fused = dh.CASES[case]
    model = dh.BagModel(0)
    dh.load_full_params(model, params)
    opt = memopt.create_optimizer(name, model.parameters(), **hp)
    dh.train_steps(model, opt, range(3, dh.STEPS), fused=fused)
    return resumed, [p.detach() for p in model.ps]


def test_fsdp2_w2_to_single_and_single_to_w2():
    single_saved = {c: _single(c) for c in CASES}
    results = dh.run_world(dh.fsdp2_checkpoint_worker, 2, CASES)
    # W=2 -> 1
    for case in CASES:
        ref = dh.reference(case)
        saved = results[0][case]
        for key, entry in saved[1]["state"].items():  # full logical shapes under names
            assert key.startswith("ps.")
        resumed, lost = _resumed_and_lost(case, saved)
        assert dh.max_abs_diff(resumed, ref) <= dh.TOL, case
        assert dh.max_abs_diff(lost, ref) > 1e-4, case
    # 1 -> W=2
    results = dh.run_world(dh.fsdp2_checkpoint_worker, 2, CASES, single_saved)
    for case in CASES:
        for r in results:
            assert dh.max_abs_diff(r[case], dh.reference(case)) <= dh.TOL, case


@pytest.mark.slow
def test_zero3_w2_to_single():
    pytest.importorskip("deepspeed")
    results = dh.run_world(dh.deepspeed_checkpoint_worker, 2, 3, CASES)
    for case in CASES:
        assert dh.max_abs_diff(_single(case, results[0][case]), dh.reference(case)) <= dh.TOL, case
