"""The optimizer benchmark's verdicts: memopt must beat every comparable peer of its algorithm."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def test_targets_and_byte_floor_columns():
    row = dict(times_ms=[], min_ms=0.0, state_bytes=0)
    report = dict(
        params=1, layers=1, warmup=0, timed_steps=1, torch="x", threads=2, cpus=2,
        results=[
            dict(row, label="floor", algorithm="floor", implementation="torch", median_ms=12.0),
            dict(row, label="torch AdamW (fused)", algorithm="adamw", implementation="torch", median_ms=40.0),
            dict(row, label="memopt Adafactor [fused=True]", algorithm="adafactor", implementation="memopt", median_ms=30.0),
            dict(row, label="memopt CAME [fused=True]", algorithm="came", implementation="memopt", median_ms=70.0),
        ],
    )
    assert bench.target_lines(report) == [
        "MET: memopt Adafactor [fused=True] 0.75x AdamW fused (target <= 1.0x)",
        "MISSED: memopt CAME [fused=True] 1.75x AdamW fused (target <= 1.5x)",
    ]
    md = bench.markdown(report, "cmd", [])
    # Adafactor moves 16 bytes/param: its byte floor is 12 ms * 16/12 = 16 ms, so 30 ms is 1.88x.
    assert "| memopt Adafactor [fused=True] | adafactor | 30 | 0.75 | 2.50 | 16 | 1.88 |" in md


def test_fused_paths_add_fused_cases_and_deepspeed_cpu_adam():
    labels = [c.label for c in bench.all_cases("fused")]
    assert "memopt Adafactor [foreach=False]" in labels and "memopt Adafactor [foreach=True]" not in labels
    assert "memopt Adafactor [fused=True]" in labels and "memopt LOMO (step) [fused=True]" in labels
    assert "memopt Adapprox [fused=True]" in labels
    assert "DeepSpeedCPUAdam (adamw_mode)" in labels


def test_adapprox_rows_per_resketch_every():
    cases = [c for c in bench.all_cases("default", adapprox_resketch=(1, 8)) if c.algorithm == "adapprox"]
    assert [c.label for c in cases] == ["memopt Adapprox", "memopt Adapprox (resketch_every=8)"]
    opt = cases[1].build([torch.nn.Parameter(torch.zeros(4, 3))]).__self__  # build returns opt.step
    assert opt.param_groups[0]["resketch_every"] == 8
    assert [c.cycle for c in cases] == [1, 8]


def test_a_resketch_row_is_judged_by_its_mean_over_whole_cycles_not_its_median():
    row = dict(min_ms=0.0, state_bytes=0)
    # 7 projection steps of 20 ms and one sketch of 100 ms: median 20, mean 30.
    ts = [20.0] * 7 + [100.0]
    report = dict(
        params=1, layers=1, warmup=0, timed_steps=8, torch="x", threads=2, cpus=2,
        results=[
            dict(row, times_ms=[12.0], label="floor", algorithm="floor", implementation="torch", median_ms=12.0),
            dict(row, times_ms=[10.0], label="torch AdamW (fused)", algorithm="adamw", implementation="torch",
                 median_ms=10.0),
            dict(row, times_ms=ts, label="memopt Adapprox (resketch_every=8)", algorithm="adapprox",
                 implementation="memopt", median_ms=20.0, cycle=8, cycle_mean_ms=30.0),
        ],
    )
    assert bench.target_lines(report) == ["MET: memopt Adapprox (resketch_every=8) 3.00x AdamW fused (target <= 3.0x)"]
    assert "| memopt Adapprox (resketch_every=8) | adapprox | 30 mean (median 20) | 3.00 |" in bench.markdown(report, "c", [])


def test_steps_must_hold_whole_resketch_cycles(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--steps", "10", "--adapprox-resketch", "1", "8", "--out", "/nonexistent"])
    assert "multiple of every --adapprox-resketch K" in capsys.readouterr().err
