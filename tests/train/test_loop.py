"""The training loop with SR-STE and three-staged LoRA: masks change only at the schedule, stay V:N:M, and end
as W * M; fresh factors restart the optimizer; budgets stop the run; bad input is refused."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from vnmsparse.masks import is_vnm
from vnmsparse.nn import VNMLinear
from vnmsparse.train import SRSTE, LoRALinear, MaskSchedule, StagedLoRA, TrainConfig, train

PATTERN = "16:2:8"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 64), act1=nn.GELU(), fc2=nn.Linear(64, 16), act2=nn.GELU(),
                                     head=nn.Linear(16, 3)))


def _batches(count: int = 1000):
    g = torch.Generator().manual_seed(1)
    for _ in range(count):
        x = torch.randn(32, 16, generator=g)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


class MaskRecorder:
    """A loss function that also records, before every step, each layer's mask (None while dense)."""

    def __init__(self, method) -> None:
        self.method, self.history = method, []

    def __call__(self, model, batch):
        self.history.append({n: None if m is None else m.clone() for n, m in self.method.masks().items()})
        return _loss(model, batch)


@pytest.mark.parametrize("make", [
    lambda s: SRSTE(PATTERN, schedule=s, decay=1e-2),
    lambda s: StagedLoRA(PATTERN, schedule=s, rank=4),
    lambda s: StagedLoRA(PATTERN, schedule=s, rank=4, factors="kept"),
])
def test_masks_change_only_at_the_schedule_and_stay_vnm(make):
    schedule = MaskSchedule(dense_frac=0.1, dynamic_frac=0.4, remask_every=4)
    method = make(schedule)
    recorder = MaskRecorder(method)
    result = train(_model(), method, _batches(), recorder, TrainConfig(steps=40, lr=2e-2, progress=False))
    assert result.steps == 40 and result.stopped == "steps"
    assert result.remask_steps == schedule.remask_steps(40) == [4, 8, 12, 16]
    for step, masks in enumerate(recorder.history):
        for name, mask in masks.items():
            assert (mask is None) == (step < 4), (step, name)
            if mask is not None:
                assert is_vnm(mask, PATTERN) and mask.float().mean().item() == 0.25
            if step > 0 and step not in result.remask_steps and mask is not None:
                assert torch.equal(mask, recorder.history[step - 1][name]), f"mask of {name} changed at step {step}"
    assert result.losses[-1][1] < result.losses[0][1]


def test_dynamic_stage_does_move_masks():
    """SR-STE with strong decay and a high lr re-prunes differently at least once (the remask is not a no-op)."""
    schedule = MaskSchedule(dense_frac=0.0, dynamic_frac=0.8, remask_every=5)
    method = SRSTE(PATTERN, schedule=schedule, decay=0.0)
    recorder = MaskRecorder(method)
    train(_model(), method, _batches(), recorder, TrainConfig(steps=40, lr=5e-2, progress=False))
    changed = [s for s in range(1, 40) if any(not torch.equal(recorder.history[s][n], recorder.history[s - 1][n])
                                             for n in recorder.history[s])]
    assert changed and set(changed) <= {5, 10, 15, 20, 25, 30}


def test_end_state_is_weight_times_mask_and_converts_exactly():
    model = _model()
    method = StagedLoRA(PATTERN, schedule=MaskSchedule(0.1, 0.2, 3), rank=4)
    train(model, method, _batches(), _loss, TrainConfig(steps=30, lr=1e-2, progress=False))
    x = torch.randn(8, 16)
    for name, tensor in method.export().items():
        layer = method.layers[name]
        assert isinstance(layer, LoRALinear) and not layer.lora_B.any()  # merged for good
        assert torch.equal(tensor.to_dense(), layer.weight.detach() * layer.mask)
    masked_out = model(x)
    method.convert(model)
    assert all(isinstance(model.get_submodule(n), VNMLinear) for n in method.layers)
    for name, layer in method.layers.items():
        assert torch.equal(model.get_submodule(name).weight.to_dense(), layer.weight.detach() * layer.mask)
    torch.testing.assert_close(model(x), masked_out)
    with pytest.raises(ValueError, match="convert the model this method prepared"):
        method.convert(_model())


def test_fresh_factors_clear_optimizer_state_and_kept_factors_do_not():
    for factors, cleared in (("fresh", True), ("kept", False)):
        method = StagedLoRA(PATTERN, schedule=MaskSchedule(0.2, 0.0), rank=4, factors=factors)
        model = _model()
        method.prepare(model, 10)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        _loss(model, next(_batches())).backward()
        opt.step()
        assert method.before_step(2, opt)
        layer = next(iter(method.layers.values()))
        assert (layer.lora_A not in opt.state) == cleared
        assert (not layer.lora_B.any()) == cleared


def test_lora_trains_only_the_factors():
    model = _model()
    method = StagedLoRA(PATTERN, rank=2)
    params = method.prepare(model, 10)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == 2 * 2  # two wrapped layers (the head stays dense), A and B each


def test_time_budget_stops_early():
    method = SRSTE(PATTERN)
    result = train(_model(), method, _batches(), _loss,
                   TrainConfig(steps=100_000, lr=1e-3, max_seconds=0.3, progress=False))
    assert result.stopped == "time" and 0 < result.steps < 100_000
    assert all(is_vnm(m, PATTERN) for m in method.masks().values())  # finish() still leaves masks


def test_running_out_of_data_stops_and_all_dense_run_still_ends_sparse():
    method = StagedLoRA(PATTERN, schedule=MaskSchedule(1.0, 0.0), rank=2)
    result = train(_model(), method, _batches(5), _loss, TrainConfig(steps=10, progress=False))
    assert result.stopped == "data" and result.steps == 5 and result.remask_steps == []
    assert all(is_vnm(m, PATTERN) for m in method.masks().values())


def test_no_method_is_dense_training_and_finish_false_keeps_layers_dense():
    model = _model()
    result = train(model, None, _batches(), _loss, TrainConfig(steps=30, lr=1e-2, progress=False))
    assert result.steps == 30 and result.losses[-1][1] < result.losses[0][1]
    assert all(type(m) is not LoRALinear for m in model.modules())
    method = StagedLoRA(PATTERN, schedule=MaskSchedule(1.0, 0.0), rank=2)
    train(_model(), method, _batches(), _loss, TrainConfig(steps=5, progress=False), finish=False)
    assert all(m is None for m in method.masks().values())


def test_bad_input():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainConfig(steps=1, autocast="bfloat16")
    with pytest.raises(ValueError, match="strategy must be one of"):
        TrainConfig(steps=1, strategy="deepspeed")
    with pytest.raises(ValueError, match="needs an initialized process group"):
        train(_model(), SRSTE(PATTERN), _batches(), _loss, TrainConfig(steps=1, strategy="ddp", progress=False))
    with pytest.raises(TypeError, match="method must be a SparseMethod"):
        train(_model(), "srste", _batches(), _loss, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="no linear layer was selected"):
        SRSTE(PATTERN, filter_fn=lambda m, n: False).prepare(_model(), 10)
    with pytest.raises(ValueError, match="factors must be one of"):
        StagedLoRA(PATTERN, factors="reuse")
    with pytest.raises(ValueError, match="decay must be a number >= 0"):
        SRSTE(PATTERN, decay=-1)
    method = SRSTE(PATTERN)
    method.prepare(_model(), 10)
    with pytest.raises(ValueError, match="already prepared"):
        method.prepare(_model(), 10)
