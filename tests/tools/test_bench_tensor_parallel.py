"""tools/bench_tensor_parallel.py: megatron's split of each GPT parameter, and the two facts its
24-layer extrapolation rests on (payload linear in depth, all-reduce count independent of it)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_tensor_parallel as btp  # noqa: E402
from gpt2_shapes import gpt2_shapes  # noqa: E402


def _shapes(layers):
    return gpt2_shapes(layers=layers, hidden=16, vocab=64, positions=8)


def test_split_dims_follow_megatron():
    dims = {name: btp.split_dim(name) for name, _ in _shapes(1)}
    assert dims["embedding.word_embeddings.weight"] == 0
    assert dims["decoder.layers.0.self_attention.linear_qkv.weight"] == 0
    assert dims["decoder.layers.0.self_attention.linear_qkv.bias"] == 0
    assert dims["decoder.layers.0.mlp.linear_fc1.bias"] == 0
    assert dims["decoder.layers.0.self_attention.linear_proj.weight"] == 1
    assert dims["decoder.layers.0.mlp.linear_fc2.weight"] == 1
    for name in ("decoder.layers.0.mlp.linear_fc2.bias", "decoder.layers.0.input_layernorm.weight",
                 "embedding.position_embeddings.weight"):
        assert dims[name] is None, name


def test_payload_is_linear_in_depth_and_the_collectives_are_not():
    for name in ("adafactor", "adapprox"):
        runs = [btp.measure(name, _shapes(layers), tp=2) for layers in (1, 2, 3)]
        assert runs[0]["bytes"] > 0
        assert runs[2]["bytes"] - runs[1]["bytes"] == runs[1]["bytes"] - runs[0]["bytes"] > 0, name
        assert runs[0]["calls"] == runs[1]["calls"] == runs[2]["calls"], name
    # Without tensor parallelism nothing is split: no collectives at all.
    assert btp.measure("adafactor", _shapes(1), tp=1)["bytes"] == 0
