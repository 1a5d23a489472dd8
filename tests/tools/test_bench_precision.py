"""tools/bench_precision.py's report, from made-up results (the runs themselves are the benchmark)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_precision as bp  # noqa: E402


def _result(mode, final, dtype, weight_bytes, peak):
    return dict(mode=mode, steps=10, wall_seconds=20.0, peak_bytes=peak, weight_bytes=weight_bytes, state_bytes=2**20,
                num_params=2_000_000, weight_dtype=dtype, val_loss={"5": final + 1.0, "10": final},
                train_loss={"1": 9.0, "10": final})


def test_report_has_every_mode_its_numbers_and_the_command(tmp_path):
    results = {"fp32": _result("fp32", 6.5, "float32", 8 * 2**20, 100 * 2**20),
               "bf16": _result("bf16", 6.51, "float32", 8 * 2**20, 120 * 2**20),
               "bf16_pure": _result("bf16_pure", 7.25, "bfloat16", 4 * 2**20, 90 * 2**20),
               "bf16_pure_sr": _result("bf16_pure_sr", 6.55, "bfloat16", 4 * 2**20, 95 * 2**20)}
    args = argparse.Namespace(lrs=[1e-3, 1e-2], config="configs/gpt_tiny.yaml", steps=10, eval_iters=8, eval_every=5,
                              memory_config="configs/gpt_demo.yaml", memory_steps=4)
    curves = {"0.001": results, "0.01": dict(results, fp32=_result("fp32", 5.125, "float32", 8 * 2**20, 100 * 2**20))}
    text = bp.markdown(curves, args, "nice -n 15 python tools/bench_precision.py --steps 10", memory=results)
    assert text.index("## lr 0.001") < text.index("## lr 0.01") < text.index("## Memory")
    assert "| fp32 | float32 | 5.1250 | 5.1250 | 9.00 MiB | 100.0 MiB | 20 s |" in text  # the second lr's table
    assert "| pure bf16 (round to nearest) | bfloat16 | 7.2500 | 7.2500 | 5.00 MiB | 90.0 MiB | 20 s |" in text
    assert "| 5 | 7.5000 | 7.5100 | 8.2500 | 7.5500 |" in text  # the per-evaluation table, in mode order
    assert "| pure bf16 + stochastic rounding | bfloat16 | 5.0 MiB | 95.0 MiB | 2.00 |" in text  # memory table: 20 s / 10 steps
    assert "Measured on CPU" in text and text.rstrip().endswith("nice -n 15 python tools/bench_precision.py --steps 10")
    bp.plot(curves, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
