"""Distillation from the dense teacher: the KD terms, what trains and what does not, and the inputs refused."""

import copy
import time

import pytest
import torch

from tiny_models import tiny_llama, token_ids
from vnmsparse.train import SRSTE, DistillConfig, Distiller, MaskSchedule, StagedLoRA, TrainConfig, kd_loss, train
from vnmsparse.train.distill import hidden_loss


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def batches(n: int = 200):
    ids = token_ids(16, 24)
    for i in range(n):
        yield ids[(2 * i) % 16 : (2 * i) % 16 + 2]


def test_kd_loss_is_zero_for_equal_distributions_and_positive_otherwise():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # same softmax
    other = logits.roll(1, dims=-1)
    assert kd_loss(logits, other).item() > 0.01
    # T^2 * KL at temperature T, against a direct computation on one distribution
    s, t, T = logits[0, 0], other[0, 0], 2.0
    p = torch.softmax(t / T, -1)
    expected = T**2 * (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum()
    assert kd_loss(s[None], t[None], T).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(logits, logits[..., :5])
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, logits, 0.0)


def test_hidden_loss_is_relative_mse():
    t = [torch.full((2, 3), 2.0), torch.ones(2, 3)]
    assert hidden_loss(t, [x.clone() for x in t]).item() == 0.0
    assert hidden_loss([torch.full((2, 3), 3.0), torch.ones(2, 3)], t).item() == pytest.approx((1 / 4) / 2)
    with pytest.raises(ValueError, match="one student and one teacher"):
        hidden_loss(t[:1], t)


@pytest.mark.parametrize("kwargs, error", [
    ({"weight": 1.5}, ValueError), ({"weight": True}, TypeError), ({"temperature": 0}, ValueError),
    ({"hidden_weight": -1.0}, ValueError), ({"blocks": 3}, TypeError), ({"temperature": float("nan")}, TypeError),
])
def test_config_is_validated(kwargs, error):
    with pytest.raises(error, match="DistillConfig"):
        DistillConfig(**kwargs)


def _lora_student(teacher):
    student = copy.deepcopy(teacher)
    method = StagedLoRA("16:2:8", schedule=MaskSchedule(dense_frac=1.0, dynamic_frac=0.0), rank=4)
    method.prepare(student, 10)
    return student, method


def test_zero_kd_when_student_is_teacher_and_gradients_reach_only_the_trainable_factors():
    teacher = tiny_llama()
    student, method = _lora_student(teacher)  # B = 0, no mask: the student computes exactly the teacher
    distiller = Distiller(teacher, DistillConfig(weight=1.0, hidden_weight=1.0))
    ids = token_ids(2, 24)
    with distiller.attach(student):
        loss = distiller.step_loss(lm_loss, student, ids)
    assert distiller.last["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert distiller.last["hidden"].item() == pytest.approx(0.0, abs=1e-10)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)

    method.remask()  # a pruned student differs from the teacher
    with distiller.attach(student):
        loss = distiller.step_loss(lm_loss, student, ids)
    assert distiller.last["kd"].item() > 1e-3 and distiller.last["hidden"].item() > 1e-3
    loss.backward()
    trainable = {id(p) for layer in method.layers.values() for p in (layer.lora_A, layer.lora_B)}
    for name, p in student.named_parameters():
        if id(p) in trainable:  # B = 0 still, so only B's gradient is non-zero yet
            assert p.grad is not None and (p.grad.abs().sum() > 0 or name.endswith("lora_A")), name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is None for p in teacher.parameters())


def test_hooks_are_inert_outside_a_step_and_removed_after():
    teacher = tiny_llama()
    student, _ = _lora_student(teacher)
    distiller = Distiller(teacher, DistillConfig(hidden_weight=0.5))
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    with distiller.attach(student):
        with torch.no_grad():
            student(token_ids(1, 8))  # an evaluation inside a run: the teacher does not run
        assert not calls
        distiller.step_loss(lm_loss, student, token_ids(1, 8))
        assert len(calls) == 1
    with torch.no_grad():
        student(token_ids(1, 8))
    assert len(calls) == 1 and not student._forward_hooks


@pytest.mark.parametrize("make", [
    lambda: StagedLoRA("16:2:8", schedule=MaskSchedule(0.0, 0.0), rank=4),
    lambda: SRSTE("16:2:8", schedule=MaskSchedule(0.0, 0.0)),
])
def test_distilling_moves_the_student_towards_the_teacher_and_leaves_the_teacher_alone(make):
    teacher = tiny_llama()
    before = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(teacher)
    ids = token_ids(4, 24, seed=7)

    def kl() -> float:
        with torch.no_grad():
            return kd_loss(student(ids).logits, teacher(ids).logits).item()

    kls = []

    def record(step: int, _seconds: float) -> None:
        if step in (1, 30):
            kls.append(kl())

    config = TrainConfig(steps=30, lr=1e-3, progress=False, distill=DistillConfig(weight=1.0))
    result = train(student, make(), batches(), lm_loss, config, teacher=teacher, on_step=record)
    assert result.steps == 30 and len(kls) == 2
    assert kls[1] < 0.9 * kls[0]  # masks fixed from step 0: KD pulls the pruned student back towards the teacher
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def test_train_refuses_inconsistent_distillation_inputs():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    config = TrainConfig(steps=2, progress=False, distill=DistillConfig())
    with pytest.raises(ValueError, match="both config.distill and teacher"):
        train(student, None, batches(), lm_loss, config)
    with pytest.raises(ValueError, match="both config.distill and teacher"):
        train(student, None, batches(), lm_loss, TrainConfig(steps=2, progress=False), teacher=teacher)
    with pytest.raises(ValueError, match="separate copy"):
        train(student, None, batches(), lm_loss, config, teacher=student)
    with pytest.raises(ValueError, match="dtype"):
        train(student, None, batches(), lm_loss, config, teacher=tiny_llama(dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="distill must be a DistillConfig"):
        TrainConfig(steps=2, distill={"weight": 0.5})
    with pytest.raises(ValueError, match="called the model"):
        train(student, None, batches(), lambda m, b: torch.tensor(0.0, requires_grad=True), config, teacher=teacher)


def test_on_step_time_is_not_training_time():
    teacher = tiny_llama()
    seen = []

    def slow(step, seconds):
        seen.append((step, seconds))
        time.sleep(0.2)

    start = time.perf_counter()
    result = train(copy.deepcopy(teacher), None, batches(), lm_loss, TrainConfig(steps=6, progress=False), on_step=slow)
    wall = time.perf_counter() - start
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(b[1] > a[1] for a, b in zip(seen, seen[1:]))
    assert result.seconds < wall - 6 * 0.2
