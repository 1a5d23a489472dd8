"""tools/bench_memory.py: the RSS meter (the in-place tied gradient it measures is tested in
tests/pretrain/models/test_tied_embedding.py)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "tools" / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _bench()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_meter_sees_a_transient_allocation_and_resets():
    meter = bench.Meter()
    with meter.stage("alloc"):
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with meter.stage("idle"):
        pass
    alloc, idle = meter.stages
    assert alloc["peak"] > 60 * 2**20  # the high-water mark kept the freed tensor
    assert idle["peak"] < alloc["peak"] - 50 * 2**20  # and was reset for the next stage
