"""pretrain/baselines: Adam-mini and APOLLO-Mini against hand-computed steps, every baseline
decreasing a small loss, and the registration that makes them run-config names."""
import math

import pytest
import torch
from torch import nn

import memopt
from pretrain import baselines
from pretrain.baselines.adam_mini import AdamMini, megatron_gpt_groups, qkv_segments
from pretrain.baselines.apollo_mini import ApolloMini

G1 = [[3.0, 4.0], [1.0, 1.0]]  # row RMS: sqrt(12.5) = 3.5355339, 1


def test_adam_mini_first_step_divides_by_each_rows_rms():
    p = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = AdamMini([p], lr=0.1, eps=0.0)  # a matrix: one v per row ("auto" -> "row")
    p.grad = torch.tensor(G1)
    opt.step()
    # bias-corrected first step: m^ = g, v^ = mean(g_row^2)  ->  W -= lr * g / RMS(g_row)
    expected = [[1 - 0.3 / 3.5355339, 2 - 0.4 / 3.5355339], [3 - 0.1, 4 - 0.1]]
    assert torch.allclose(p.detach(), torch.tensor(expected), atol=1e-6)
    assert opt.state[p]["v"].shape == (2, 1)  # one scalar per row, not per entry


def test_adam_mini_second_step_keeps_block_moments():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = AdamMini([p], lr=1.0, betas=(0.5, 0.5), eps=0.0)
    p.grad = torch.tensor(G1)
    opt.step()
    after1 = p.detach().clone()
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    opt.step()
    # m = 0.5*0.5*g1 + 0.5*g2 -> m^ = m / 0.75; row v = 0.25*ms(g1_row) + 0.5*ms(g2_row) -> v^ = v / 0.75
    # row 0: ms(g1) = 12.5, ms(g2) = 0.5 -> v^ = (3.125 + 0.25)/0.75 = 4.5;  row 1: ms 1, 2 -> v^ = 1.25/0.75
    m_hat = torch.tensor([[0.75 + 0.5, 1.0], [0.25, 0.25 + 1.0]]) / 0.75
    v_hat = torch.tensor([[4.5], [1.25 / 0.75]])
    assert torch.allclose(p.detach(), after1 - m_hat / v_hat.sqrt(), atol=1e-6)


def test_qkv_segments_are_query_and_key_heads_and_value_rows():
    # 2 heads, 1 query group, head_dim 2: rows q0 q0 q1 q1 k k v v
    assert qkv_segments(2, 1, 2).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    # grouped-query attention: 4 heads in 2 groups of (q, q, k, v), head_dim 1
    assert qkv_segments(4, 2, 1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_adam_mini_segments_and_tensor_blocks():
    w = nn.Parameter(torch.zeros(4, 1))
    b = nn.Parameter(torch.zeros(2))
    opt = AdamMini([dict(params=[w], block="segments", segments=torch.tensor([0, 0, 1, 1])),
                    dict(params=[b], block="tensor")], lr=1.0, eps=0.0)
    w.grad = torch.tensor([[3.0], [4.0], [1.0], [1.0]])
    b.grad = torch.tensor([3.0, 4.0])
    opt.step()
    r = 3.5355339
    assert torch.allclose(w.detach().flatten(), torch.tensor([-3 / r, -4 / r, -1.0, -1.0]), atol=1e-6)
    assert torch.allclose(b.detach(), torch.tensor([-3 / r, -4 / r]), atol=1e-6)
    assert opt.state[w]["v"].shape == (2,) and opt.state[b]["v"].numel() == 1


def test_adam_mini_refuses_segments_without_ids():
    with pytest.raises(ValueError, match="needs 'segments'"):
        AdamMini([dict(params=[nn.Parameter(torch.zeros(2, 2))], block="segments")])


def test_apollo_mini_first_step_by_hand():
    p = nn.Parameter(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]]))
    w0 = p.detach().clone()
    g = torch.tensor([[0.5, -1.0, 2.0], [1.0, 3.0, -0.5]])
    opt = ApolloMini([p], lr=0.01, eps=0.0, rank=1)
    proj = opt.projection(p, 1)  # 1 x 2 (the smaller side), N(0, 1)
    assert proj.shape == (1, 2)
    p.grad = g
    opt.step()
    r = proj @ g  # 1 x 3
    # first Adam step on R: m^ = R, v^ = R^2 -> R~ = sign(R): ||R~|| = sqrt(3); s = sqrt(3) / ||R||
    s = math.sqrt(3) / r.norm()
    assert torch.allclose(p.detach(), w0 - 0.01 * math.sqrt(128) * s * g, atol=1e-6)
    assert opt.state[p]["exp_avg"].shape == (1, 3)  # the projected moments: r x n


def test_apollo_mini_limits_norm_growth_to_1_01():
    p = nn.Parameter(torch.zeros(2, 3))
    opt = ApolloMini([p], lr=1.0, rank=1)
    p.grad = torch.ones(2, 3)
    opt.step()
    opt.state[p]["prev_norm"] = torch.tensor(1e-3)
    before = p.detach().clone()
    p.grad = torch.ones(2, 3)
    opt.step()
    assert (p.detach() - before).norm().item() == pytest.approx(1.01e-3, rel=1e-3)  # fp32 rounding of W ~ 1


def test_apollo_mini_projection_is_resampled_every_gap():
    p = nn.Parameter(torch.zeros(2, 3))
    opt = ApolloMini([p], update_proj_gap=2)
    assert torch.equal(opt.projection(p, 1), opt.projection(p, 2))
    assert not torch.equal(opt.projection(p, 2), opt.projection(p, 3))


def least_squares(steps, make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    x, y = torch.randn(32, 64), torch.randn(32, 8)
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, opt, model


@pytest.mark.parametrize("name,hparams", [
    ("adam_mini", dict(lr=3e-3)),
    ("apollo_mini", dict(lr=3e-3)),
    ("adamw8bit", dict(lr=3e-3)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
])
def test_each_baseline_decreases_a_small_loss(name, hparams):
    pytest.importorskip("bitsandbytes") if name == "adamw8bit" else None
    baselines.register()
    losses, opt, model = least_squares(40, lambda ps: memopt.create_optimizer(name, ps, **hparams))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_adamw8bit_keeps_8bit_moments():
    pytest.importorskip("bitsandbytes")
    baselines.register()
    _, opt, model = least_squares(2, lambda ps: memopt.create_optimizer("adamw8bit", ps, lr=1e-3))
    state = opt.state[model[0].weight]  # 64 x 64 = 4096 entries: bitsandbytes' 8-bit threshold
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


class FakeGPT(nn.Module):
    """Parameter names and attention config as megatron-core's GPTModel has them."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Module()
        self.embedding.word_embeddings = nn.Embedding(10, 4)
        layer = nn.Module()
        layer.linear_qkv = nn.Linear(4, 8)  # 2 heads x head_dim 2, 1 group: (2 + 2) x 2 rows
        layer.linear_proj = nn.Linear(4, 4)
        layer.norm = nn.LayerNorm(4)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([layer])
        self.config = type("Cfg", (), dict(num_attention_heads=2, num_query_groups=1, kv_channels=2))()


def test_register_partitions_a_megatron_gpt_by_name():
    model = FakeGPT()
    baselines.register(model)
    opt = memopt.create_optimizer("adam_mini", model.parameters(), lr=1e-3)
    blocks = {id(p): g["block"] for g in opt.param_groups for p in g["params"]}
    layer = model.decoder.layers[0]
    assert blocks[id(layer.linear_qkv.weight)] == "segments" and blocks[id(layer.linear_qkv.bias)] == "segments"
    assert blocks[id(model.embedding.word_embeddings.weight)] == "coordinate"
    assert blocks[id(layer.linear_proj.weight)] == "row" and blocks[id(layer.norm.weight)] == "tensor"
    apollo = memopt.create_optimizer("apollo_mini", model.parameters(), lr=1e-3)
    on = {id(p) for g in apollo.param_groups if g["apollo"] for p in g["params"]}
    assert on == {id(layer.linear_qkv.weight), id(layer.linear_proj.weight)}


def test_megatron_groups_match_the_registry_path():
    model = FakeGPT()
    groups = megatron_gpt_groups(model.named_parameters(), 2, 1, 2)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_baselines_train_the_tiny_gpt_through_the_study(tmp_path):
    """The study's worker trains every baseline by its catalog key through the real trainer
    (tiny GPT, 2 steps), with Adam-mini and APOLLO-Mini partitioning the model by name."""
    import importlib.util
    import json
    from pathlib import Path

    from pretrain.study.study import inprocess_run

    pytest.importorskip("bitsandbytes")
    root = Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("compare_optimizers", root / "tools/compare_optimizers.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    keys = ["sgdm", "adam_mini", "apollo_mini", "adamw8bit"]
    argv = ["--optimizers", ",".join(keys), "--tasks", "gpt", "--gpt-config", str(root / "configs/gpt_tiny.yaml"),
            "--budget-tokens", "256", "--lrs-per-optimizer", "1", "--seeds", "1234", "--evals-per-run", "1",
            "--no-zeroshot", "--out", str(tmp_path / "report"), "--work-dir", str(tmp_path / "runs")]
    assert tool.main(argv, run_fn=inprocess_run) == 0
    final = {r["key"]: r for r in json.loads((tmp_path / "report/results.json").read_text())["study"]["tasks"]["gpt"]["final"]}
    assert set(final) == set(keys)
    for key, r in final.items():
        assert not r["failed"] and math.isfinite(r["final_val_loss"]), (key, r.get("error"))
    # state: SGD-momentum one buffer per parameter; APOLLO-Mini far less than Adam-mini's first moment
    assert final["apollo_mini"]["optimizer_state_bytes"] < final["adam_mini"]["optimizer_state_bytes"]
