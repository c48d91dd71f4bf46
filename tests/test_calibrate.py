"""Calibration statistics: the running mean of x^2 per input channel, hooks removed afterwards, the block stack
found, and sequential capture refusing models whose blocks are not a plain chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vnmsparse.calibrate import ActivationStats, BlockRunner, block_index, collect_act_sq_mean, find_blocks


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def test_activation_stats_is_the_mean_of_squares_over_all_tokens():
    stats = ActivationStats(3)
    a, b = torch.randn(2, 5, 3), torch.randn(7, 3)
    stats.add_batch(a)
    stats.add_batch(b)
    expected = torch.cat([a.reshape(-1, 3), b]).double().pow(2).mean(0).float()
    torch.testing.assert_close(stats.act_sq_mean, expected)
    with pytest.raises(ValueError, match="no calibration tokens"):
        ActivationStats(3).act_sq_mean


def test_collect_matches_a_manual_pass_and_removes_its_hooks():
    torch.manual_seed(0)
    model = _Chain()
    batches = [torch.randn(3, 4) for _ in range(2)]
    got = collect_act_sq_mean(model, batches, ["layers.1.0", "head"], progress=False)
    with torch.no_grad():
        seen = [model.layers[0](model.embed(b)) for b in batches]
    torch.testing.assert_close(got["layers.1.0"], torch.cat(seen).pow(2).mean(0))
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no modules named"):
        collect_act_sq_mean(model, batches, ["nope"], progress=False)


def test_find_blocks_and_block_index():
    model = _Chain()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert find_blocks(model, names) == "layers"
    assert block_index("layers.2.0", "layers") == 2 and block_index("head", "layers") is None
    assert find_blocks(nn.Linear(2, 2), ["weight"]) is None


def test_block_runner_advances_one_block_at_a_time():
    torch.manual_seed(1)
    model = _Chain()
    batches = [torch.randn(3, 4) for _ in range(2)]
    runner = BlockRunner(model, model.layers, batches)
    with torch.no_grad():
        for i in range(3):
            runner.advance(i)
        expected = [model.layers[2](model.layers[1](model.layers[0](model.embed(b)))) for b in batches]
    for (args, _), want in zip(runner.inputs, expected):
        torch.testing.assert_close(args[0], want)


def test_block_runner_refuses_a_stack_that_is_not_a_chain():
    class Branchy(_Chain):
        def forward(self, x):
            h = self.embed(x)
            h = self.layers[0](h)
            h = self.layers[1](h) + self.layers[2](h)  # block 2 is not fed block 1's output
            return self.head(h)

    model = Branchy()
    with pytest.raises(ValueError, match="sequential calibration needs each block"):
        BlockRunner(model, model.layers, [torch.randn(2, 4)])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())  # hooks removed
