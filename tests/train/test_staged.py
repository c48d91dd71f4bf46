"""Three-staged LoRA: only the factors train, each remask either merges the factors (fresh) or keeps them, the
output is unchanged by a merge, and the end holds exactly W * M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vnmsparse.masks import is_vnm
from vnmsparse.train import MaskSchedule, StagedLoRA


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))


def _nudge(method: StagedLoRA) -> None:
    """Non-zero factors, as after some training (B starts at zero)."""
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.normal_(0, 0.1)


def test_only_the_factors_train():
    model = _mlp()
    method = StagedLoRA("16:2:8", rank=4)
    params = method.prepare(model, total_steps=20)
    factors = {id(p) for layer in method.layers.values() for p in (layer.lora_A, layer.lora_B)}
    assert {id(p) for p in params} == factors
    assert all(p.requires_grad == (id(p) in factors) for p in model.parameters())


@pytest.mark.parametrize("factors", ["fresh", "kept"])
def test_a_remask_keeps_the_output_and_the_masks_are_vnm(factors):
    model = _mlp()
    method = StagedLoRA("16:2:8", rank=4, factors=factors, schedule=MaskSchedule(dense_frac=0.0, dynamic_frac=1.0))
    method.prepare(model, total_steps=20)
    method.remask()  # masks from W
    _nudge(method)
    x = torch.randn(5, 32)
    optimizer = torch.optim.Adam([p for layer in method.layers.values() for p in (layer.lora_A, layer.lora_B)])
    model(x).sum().backward()
    optimizer.step()  # creates Adam state
    before = model(x).detach()
    A_before = {n: layer.lora_A.detach().clone() for n, layer in method.layers.items()}
    method.before_remask(optimizer)
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)  # merging keeps the function
    for name, layer in method.layers.items():
        fresh = factors == "fresh"
        assert bool(torch.all(layer.lora_B == 0)) == fresh  # fresh: B A merged into W, B <- 0
        assert (not torch.equal(layer.lora_A, A_before[name])) == fresh  # and a new A
        assert (layer.lora_A in optimizer.state) != fresh  # its Adam moments cleared
    for mask in method.masks().values():
        assert is_vnm(mask, method.pattern)


def test_finish_merges_for_good():
    model = _mlp()
    method = StagedLoRA("16:2:8", rank=4)
    method.prepare(model, total_steps=10)
    method.finish()
    _nudge(method)
    method.finish()  # masks exist: only the merge
    for layer in method.layers.values():
        assert torch.all(layer.lora_B == 0)
        torch.testing.assert_close(layer.to_vnm_tensor().to_dense(), (layer.dense_weight() * layer.mask).to(layer.weight.dtype))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="factors must be one of"):
        StagedLoRA("16:2:8", factors="both")
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        StagedLoRA("16:2:8", rank=0)
