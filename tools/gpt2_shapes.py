"""Parameter shapes of GPT-2 small (124M) in Megatron's layout, for benchmarks and reports."""
from __future__ import annotations


def gpt2_shapes(layers: int = 12, hidden: int = 768, vocab: int = 50257, positions: int = 1024):
    """(name, shape) of every parameter; 124,439,808 parameters at the defaults (tied embeddings)."""
    h = hidden
    shapes = [("embedding.word_embeddings.weight", (vocab, h)), ("embedding.position_embeddings.weight", (positions, h))]
    for i in range(layers):
        pre = f"decoder.layers.{i}."
        shapes += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "input_layernorm.bias", (h,)),
            (pre + "self_attention.linear_qkv.weight", (3 * h, h)),
            (pre + "self_attention.linear_qkv.bias", (3 * h,)),
            (pre + "self_attention.linear_proj.weight", (h, h)),
            (pre + "self_attention.linear_proj.bias", (h,)),
            (pre + "pre_mlp_layernorm.weight", (h,)),
            (pre + "pre_mlp_layernorm.bias", (h,)),
            (pre + "mlp.linear_fc1.weight", (4 * h, h)),
            (pre + "mlp.linear_fc1.bias", (4 * h,)),
            (pre + "mlp.linear_fc2.weight", (h, 4 * h)),
            (pre + "mlp.linear_fc2.bias", (h,)),
        ]
    shapes += [("decoder.final_layernorm.weight", (h,)), ("decoder.final_layernorm.bias", (h,))]
    return shapes
