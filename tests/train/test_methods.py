"""Sparse methods (SRSTE here; StagedLoRA in test_staged): which layers they take, what they train, when they
re-prune, and what they leave: V:N:M masks, a VNMLinear model computing exactly W * M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vnmsparse.masks import is_vnm
from vnmsparse.nn import VNMLinear
from vnmsparse.train import SRSTE, MaskSchedule
from vnmsparse.train.methods import default_filter


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def test_default_filter_takes_linears_but_not_heads():
    model = nn.ModuleDict({"proj": nn.Linear(4, 4), "lm_head": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    assert [n for n, m in model.named_modules() if n and default_filter(m, n)] == ["proj"]


def test_prepare_wraps_the_selected_layers_and_trains_everything():
    model = _mlp()
    method = SRSTE("16:2:8", filter_fn=lambda m, n: isinstance(m, nn.Linear) and n != "4")
    params = method.prepare(model, total_steps=100)
    assert sorted(method.layers) == ["0", "2"]
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}  # SR-STE: full fine-tuning
    with pytest.raises(ValueError, match="already prepared"):
        method.prepare(model, total_steps=100)


def test_remasks_follow_the_schedule_and_leave_vnm_masks():
    model = _mlp()
    method = SRSTE("16:2:8", schedule=MaskSchedule(dense_frac=0.1, dynamic_frac=0.3, remask_every=5))
    method.prepare(model, total_steps=50)
    steps = [s for s in range(50) if method.before_step(s)]
    assert steps == sorted(method.remask_at) and steps[0] == 5 and all(s < 20 for s in steps)
    assert method.remasks == len(steps)
    for mask in method.masks().values():
        assert is_vnm(mask, method.pattern)


def test_finish_masks_layers_that_never_reached_a_sparse_stage_and_convert_is_exact():
    model = _mlp()
    method = SRSTE("16:2:8", schedule=MaskSchedule(dense_frac=1.0, dynamic_frac=0.0))
    method.prepare(model, total_steps=10)
    assert all(m is None for m in method.masks().values())
    with pytest.raises(ValueError, match="no mask yet"):
        method.convert(model)
    method.finish()
    expected = {name: (layer.dense_weight() * layer.mask).detach().clone() for name, layer in method.layers.items()}
    method.convert(model)
    for name, weight in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, VNMLinear) and torch.equal(layer.weight.to_dense(), weight)
    x = torch.randn(3, 32)
    assert model(x).shape == (3, 10)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="schedule must be a MaskSchedule"):
        SRSTE("16:2:8", schedule={"dense_frac": 0.1})
    with pytest.raises(TypeError, match="scorer must be callable"):
        SRSTE("16:2:8", scorer="magnitude")
    with pytest.raises(ValueError, match="decay must be a number >= 0"):
        SRSTE("16:2:8", decay=-1)
    with pytest.raises(ValueError, match="no linear layer was selected"):
        SRSTE("16:2:8", filter_fn=lambda m, n: False).prepare(_mlp(), total_steps=10)
