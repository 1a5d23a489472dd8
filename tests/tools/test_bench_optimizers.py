"""The optimizer benchmark's verdicts: memopt must beat every comparable peer of its algorithm."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_optimizers as bench  # noqa: E402


def _report(ours_ms, peer_ms, comparable=True):
    row = dict(times_ms=[], min_ms=0.0, state_bytes=0)
    return dict(
        params=1, layers=1, warmup=0, timed_steps=1, torch="x", threads=2, cpus=2,
        results=[
            dict(row, label="floor", algorithm="floor", implementation="torch", median_ms=1.0),
            dict(row, label="memopt X", algorithm="x", implementation="memopt", median_ms=ours_ms),
            dict(row, label="peer X", algorithm="x", implementation="peer", median_ms=peer_ms, comparable=comparable),
            dict(row, label="other algo", algorithm="y", implementation="peer", median_ms=0.1),
        ],
    )


def test_memopt_faster_than_its_peer_passes_and_slower_fails():
    assert bench.check(_report(10.0, 20.0)) == ["PASS: memopt X 10 ms vs peer X 20 ms (2.0x)"]
    assert bench.check(_report(30.0, 20.0))[0].startswith("FAIL: memopt X 30 ms vs peer X 20 ms")


def test_a_peer_that_skips_required_work_is_a_note_not_a_verdict():
    lines = bench.check(_report(30.0, 20.0, comparable=False))
    assert lines[0].startswith("NOTE: ")
    md = bench.markdown(_report(30.0, 20.0, comparable=False), "cmd", lines)
    assert "- NOTE: memopt X" in md and "Command: `cmd`" in md


def test_every_memopt_optimizer_has_a_case_and_peers_exist_for_the_required_ones():
    cases = bench.all_cases()
    by_algo = {}
    for c in cases:
        by_algo.setdefault(c.algorithm, set()).add(c.implementation)
    for algo in ("adafactor", "came", "adalomo", "lomo", "adapprox"):
        assert "memopt" in by_algo[algo]
    assert {"torch", "transformers"} <= by_algo["adafactor"]
    assert "came_pytorch" in by_algo["came"]
    assert {"fused", "foreach"} <= {c.label.split("(")[-1].rstrip(")") for c in cases if c.algorithm == "adamw"}
