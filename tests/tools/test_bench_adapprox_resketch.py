"""tools/bench_adapprox_resketch.py's step-time part: which cases it times side by side, that the
kernel cases really run with and without the lowrank passes, and that it leaves the switch on."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_adapprox_resketch as br  # noqa: E402
import gpt2_shapes  # noqa: E402

from memopt.kernels import cpu_adapprox  # noqa: E402


def test_step_time_runs_the_kernels_both_ways_and_restores_the_switch(monkeypatch):
    if not cpu_adapprox.ready():
        pytest.skip("Adapprox's C++ CPU kernels do not build here")
    monkeypatch.setattr(gpt2_shapes, "gpt2_shapes", lambda: [("w", (40, 48)), ("b", (48,))])
    seen = []
    real = cpu_adapprox.lowrank_gram
    monkeypatch.setattr(cpu_adapprox, "lowrank_gram", lambda *a: seen.append(cpu_adapprox.LOWRANK_PASSES) or real(*a))
    rows = br.step_time(steps=8, warmup=0, kernels_only=True)
    assert [r["case"] for r in rows] == [
        "torch AdamW(fused=True)",
        "Adapprox resketch_every=1, fused kernels, GEMMs through the buffer",
        "Adapprox resketch_every=1, fused kernels, V, residual and Vhat per row block",
        "Adapprox resketch_every=8, fused kernels, GEMMs through the buffer",
        "Adapprox resketch_every=8, fused kernels, V, residual and Vhat per row block",
    ]
    assert rows[0]["x_adamw_fused"] == 1.0 and all(len(r["all_ms"]) == 8 for r in rows)
    # the projection steps of K = 8 (steps 2-8) ran lowrank_gram, only with the switch on
    assert seen == [True] * 7
    assert cpu_adapprox.LOWRANK_PASSES is True
