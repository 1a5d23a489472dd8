"""ZeRO-Offload (``offload_optimizer: {device: cpu}``) with memopt optimizers through
``memopt.integrations.deepspeed.initialize``: no ``zero_force_ds_cpu_optimizer`` in the user's
config, the same parameters as the run without offload (2 gloo ranks, ZeRO-2, bit for bit) and
as the single-process reference; with one rank every partition holds whole parameters and the
fused CPU kernel steps them (counted), exact to the reference."""
from __future__ import annotations

import pytest

import dist_helpers as dh

pytest.importorskip("deepspeed")

CASES = ["adafactor", "adafactor_b1_wd", "came", "adalomo_clip", "lomo"]
KERNELS = ("factored_step_host", "came_step_host", "lomo_step_host")  # the host path's kernel calls


def offload_config(stage: int, world: int) -> dict:
    cfg = dh.deepspeed_config(stage, world)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def offload_worker(rank, world, cases, stage=2):
    """Per case: the parameters after dh.STEPS steps with and without offload, and how many
    fused-kernel calls the offloaded run made."""
    dh.no_deepspeed_op_builds()
    import memopt.kernels as kernels
    from memopt.integrations.deepspeed import initialize

    calls = {"n": 0}
    for name in KERNELS:
        real = getattr(kernels, name)

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        setattr(kernels, name, counted)
    out = {}
    for case in cases:
        name, hp, _ = dh.CASES[case]
        for offload in (False, True):
            calls["n"] = 0
            cfg = offload_config(stage, world) if offload else dh.deepspeed_config(stage, world)
            engine, *_ = initialize(model=dh.BagModel(0), optimizer=name, optimizer_params=hp, config=cfg)
            assert engine.zero_cpu_offload() == offload
            for step in range(dh.STEPS):
                loss = engine(dh.local_batch(step, rank, world))
                engine.backward(loss)
                engine.step()
            from deepspeed.utils import safe_get_full_fp32_param

            out[(case, offload)] = [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.ps]
            out[(case, offload, "kernel_calls")] = calls["n"]
            engine.destroy() if hasattr(engine, "destroy") else None
    return out


def test_offload_two_ranks_equals_no_offload_and_the_reference():
    results = dh.run_world(offload_worker, 2, CASES)
    for case in CASES:
        ref = dh.reference(case)
        assert dh.moved(ref) > 1e-3
        for r in results:
            assert dh.max_abs_diff(r[(case, True)], r[(case, False)]) == 0.0, case
            assert dh.max_abs_diff(r[(case, True)], ref) <= dh.TOL, case


def test_offload_one_rank_steps_with_the_fused_kernel():
    cases = ["adafactor", "came", "lomo"]
    (r,) = dh.run_world(offload_worker, 1, cases)
    for case in cases:
        ref = dh.reference(case)
        assert r[(case, True, "kernel_calls")] == dh.STEPS * len(dh.SHAPES), case
        assert dh.max_abs_diff(r[(case, True)], ref) <= 1e-6 * max(float(x.abs().max()) for x in ref), case
        assert dh.max_abs_diff(r[(case, True)], r[(case, False)]) == 0.0, case


def test_offload_config_switch():
    from memopt.integrations.deepspeed import offloads_optimizer

    assert offloads_optimizer(offload_config(2, 1))
    assert offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer(dh.deepspeed_config(2, 1))
