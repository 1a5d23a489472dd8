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


def _run(case, peak, after_build=510e6, **kw):
    return dict(case=case, seq=128, peak=peak, weights=500e6, after_build=after_build, steps=3,
                largest_param=dict(shape=[50304, 768], bytes=155e6), peak_stage="x", **kw)


def test_allocator_table_reports_the_heap_trims_and_the_probe_without_them():
    from bench_memory_report import allocator_table

    fixed = {(c, 128): _run(c, p) for c, p in (("weights", 503e6), ("activations", 621e6), ("adamw", 2326e6),
                                               ("adalomo_fused", 782e6), ("adalomo_fused_stock", 833e6),
                                               ("adalomo_fused_notrim", 783e6))}
    default = [{("weights", 128): _run("weights", 503e6), ("activations", 128): _run("activations", 630e6),
                ("adamw", 128): _run("adamw", 2400e6),
                ("adalomo_fused", 128): _run("adalomo_fused", 790e6, heap_trims=42, heap_trim_seconds=0.006),
                ("adalomo_fused_stock", 128): _run("adalomo_fused_stock", 840e6),
                ("adalomo_fused_notrim", 128): _run("adalomo_fused_notrim", 1000e6, after_build=800e6)}]
    text = allocator_table(default, fixed, 128)
    assert "| adalomo_fused_notrim | 783 | 1,000 | 1.289 |" in text  # floor 776 MB
    assert "14 calls per step here, 2.0 ms per step inside `malloc_trim`" in text
    assert "300 MB without the trim" in text and "10 MB above the weights" in text
    assert "met both bars" in text and "in all 1 processes" in text
