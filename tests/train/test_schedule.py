"""MaskSchedule: stage boundaries as fractions of the steps, remask steps, and refusal of bad fractions."""

import pytest

from vnmsparse.train import MaskSchedule, SRSTE, StagedLoRA


def test_default_three_staged_lora_spends_at_most_ten_percent_in_stages_one_and_two():
    for total in (10, 97, 1000, 12345):
        dense_end, dynamic_end = StagedLoRA("64:2:5").schedule.boundaries(total)
        assert 0 <= dense_end <= dynamic_end <= round(0.1 * total) + 1
        assert dynamic_end / total <= 0.1 + 1 / total


def test_stages_and_remask_steps():
    s = MaskSchedule(dense_frac=0.1, dynamic_frac=0.2, remask_every=5)
    assert s.boundaries(100) == (10, 30)
    assert [s.stage(t, 100) for t in (0, 9, 10, 29, 30, 99)] == [1, 1, 2, 2, 3, 3]
    assert s.remask_steps(100) == [10, 15, 20, 25]


def test_edge_schedules():
    assert MaskSchedule(0.0, 0.0).remask_steps(50) == [0]  # fixed masks from the start
    assert MaskSchedule(1.0, 0.0).remask_steps(50) == []  # all dense: masks only at the end
    assert MaskSchedule(0.2, 0.0).remask_steps(50) == [10]  # one mask, frozen
    assert SRSTE("64:2:8").schedule.remask_steps(100) == [0, 20, 40]


@pytest.mark.parametrize("kwargs, rule", [
    ({"dense_frac": -0.1}, "dense_frac must be a number in"),
    ({"dynamic_frac": 1.5}, "dynamic_frac must be a number in"),
    ({"dense_frac": 0.6, "dynamic_frac": 0.6}, "must be <= 1"),
    ({"remask_every": 0}, "remask_every must be an int >= 1"),
    ({"remask_every": 2.5}, "remask_every must be an int >= 1"),
])
def test_bad_schedules(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        MaskSchedule(**kwargs)


def test_bad_steps():
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        MaskSchedule().boundaries(0)
    with pytest.raises(ValueError, match="step must be in"):
        MaskSchedule().stage(10, 10)
