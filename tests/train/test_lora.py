"""LoRALinear: (W + s B A) * M forward, masked factor gradients, exact merges, and PEFT conversion or refusal."""

import pytest
import torch
from torch import nn

from vnmsparse.masks import vnm_mask
from vnmsparse.train import LoRALinear, from_peft


def _layer(mask: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(24, 32), "16:2:8", rank=4, alpha=8.0, seed=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    if mask:
        layer.set_mask(vnm_mask(layer.dense_weight().abs(), "16:2:8"))
    return layer


def test_forward_and_gradients_are_masked():
    layer = _layer()
    W, A, B, M = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.mask
    x = torch.randn(6, 24)
    torch.testing.assert_close(layer(x), x @ ((W + 2.0 * B @ A) * M).T + layer.bias)
    layer(x).sum().backward()
    G = (torch.ones(6, 32).T @ x) * M  # dL/dW' masked
    torch.testing.assert_close(layer.lora_B.grad, 2.0 * G @ A.T)
    torch.testing.assert_close(layer.lora_A.grad, 2.0 * B.T @ G)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("fresh_seed", [None, 7])
def test_merge_keeps_the_output_exactly(fresh_seed):
    layer = _layer()
    x = torch.randn(6, 24)
    before, dense = layer(x).detach(), layer.dense_weight().clone()
    old_a = layer.lora_A.detach().clone()
    layer.merge_(fresh_seed=fresh_seed)
    assert torch.equal(layer.weight.detach(), dense)
    assert torch.equal(layer.lora_B.detach(), torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.dense_weight(), dense)
    assert torch.equal(layer(x).detach(), before)
    assert torch.equal(layer.lora_A.detach(), old_a) == (fresh_seed is None)


def test_factor_init_is_a_function_of_the_seed():
    a = LoRALinear.from_linear(nn.Linear(8, 16), "16:2:8", rank=2, seed=5)
    b = LoRALinear.from_linear(nn.Linear(8, 16), "16:2:8", rank=2, seed=5)
    assert torch.equal(a.lora_A, b.lora_A) and not a.lora_B.any()


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        LoRALinear.from_linear(nn.Linear(8, 16), "16:2:8", rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRALinear.from_linear(nn.Linear(8, 16), "16:2:8", alpha=0)


peft = pytest.importorskip("peft")


def _peft_model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 24))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, **kwargs)
    return peft.get_peft_model(base, config)


def test_from_peft_keeps_the_function():
    model = _peft_model()
    x = torch.randn(5, 24)
    before = model(x).detach()
    names = from_peft(model, "16:2:8")
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(model(x).detach(), before)


def test_from_peft_refuses_what_it_cannot_convert_exactly():
    with pytest.raises(ValueError, match="lora_dropout must be 0"):
        from_peft(_peft_model(lora_dropout=0.1), "16:2:8")
    model = _peft_model()
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="adapters"):
        from_peft(model, "16:2:8")


def test_staged_lora_adopts_a_peft_models_layers_and_trains_only_their_factors():
    from vnmsparse.train import StagedLoRA

    model = _peft_model()
    method = StagedLoRA("16:2:8", rank=2)  # the PEFT layers keep their own rank (4)
    params = method.prepare(model, 10)
    assert sorted(method.layers) == ["base_model.model.0", "base_model.model.2"]
    assert all(layer.rank == 4 for layer in method.layers.values())
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad} and len(params) == 4
