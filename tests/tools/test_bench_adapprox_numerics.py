"""tools/bench_adapprox_numerics.py: the 1-ulp gradient perturbation it trains with, and the
training-curve gaps it reports (the runs themselves are the benchmark)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_adapprox_numerics as bn  # noqa: E402


def _grads_seen_by_step(stream: int, grad: torch.Tensor, steps: int = 2) -> list[torch.Tensor]:
    """The gradient an SGD(lr=0) sees at each step, through the perturbing wrapper."""
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["params"][0].grad.clone())
            return super().step(closure)

    p = torch.nn.Parameter(torch.zeros(grad.shape))
    opt = bn.ulp_perturbed(Recorder, stream)([p], lr=0.0)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return seen


def test_every_nonzero_element_moves_by_exactly_one_ulp_zeros_stay():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    g[3, :5] = 0.0
    out = _grads_seen_by_step(0, g)[0]
    up, down = torch.nextafter(g, torch.tensor(float("inf"))), torch.nextafter(g, torch.tensor(float("-inf")))
    nonzero = g != 0
    assert torch.all(((out == up) | (out == down))[nonzero]), "each element is its upper or lower fp32 neighbour"
    assert torch.all(out[~nonzero] == 0)
    moved_up = (out == up)[nonzero].float().mean().item()
    assert 0.4 < moved_up < 0.6, f"directions are random signs, got {moved_up:.2f} up"


def test_directions_are_deterministic_differ_by_step_and_by_stream():
    g = torch.randn(40, 40, generator=torch.Generator().manual_seed(1))
    a, b = _grads_seen_by_step(0, g), _grads_seen_by_step(0, g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]), "each step draws new directions"
    assert not torch.equal(a[0], _grads_seen_by_step(1, g)[0]), "another stream, other directions"


def test_train_gaps_read_the_curves_at_the_checkpoint_steps():
    # 10 steps of 100 tokens, logged every 2 steps; the second run is 0.5 lower from step 6 on.
    a = [[100 * s, 9.0 - 0.1 * s] for s in (2, 4, 6, 8, 10)]
    b = [[t, loss - (0.5 if t >= 600 else 0.0)] for t, loss in a]
    gaps = bn.train_gaps(a, b, steps=10, checkpoints=[4, 10])
    assert gaps == {"4": 0.0, "10": 0.5}
