"""`MaskSchedule`: when masks exist, when they are recomputed, and when they freeze, as fractions of the steps.

Three stages (the brief's three-staged LoRA; SR-STE uses the same object):
1. dense: steps [0, dense_end) run with no mask;
2. dynamic: masks are recomputed at `dense_end` and every `remask_every` steps after it, before `dynamic_end`;
3. fixed: from `dynamic_end` on, the last masks stay.
A remask at step t happens before step t runs. With no dynamic stage, masks are computed once, at `dense_end`.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class MaskSchedule:
    """Stage fractions of the total steps, and the remask period (in steps) of the dynamic stage."""

    dense_frac: float = 0.02
    dynamic_frac: float = 0.08
    remask_every: int = 10

    def __post_init__(self) -> None:
        _check_fraction("dense_frac", self.dense_frac)
        _check_fraction("dynamic_frac", self.dynamic_frac)
        if self.dense_frac + self.dynamic_frac > 1.0 + 1e-12:
            raise ValueError(f"dense_frac + dynamic_frac must be <= 1, got {self.dense_frac} + {self.dynamic_frac}")
        if isinstance(self.remask_every, bool) or not isinstance(self.remask_every, int) or self.remask_every < 1:
            raise ValueError(f"remask_every must be an int >= 1 (steps), got {self.remask_every!r}")

    def boundaries(self, total_steps: int) -> tuple[int, int]:
        """(dense_end, dynamic_end): the first step of stage 2 and of stage 3."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        dense_end = min(total_steps, round(self.dense_frac * total_steps))
        dynamic_end = min(total_steps, dense_end + round(self.dynamic_frac * total_steps))
        return dense_end, dynamic_end

    def stage(self, step: int, total_steps: int) -> int:
        """1, 2 or 3: the stage that step `step` (0-based) runs in."""
        dense_end, dynamic_end = self.boundaries(total_steps)
        if not 0 <= step < total_steps:
            raise ValueError(f"step must be in [0, {total_steps}), got {step}")
        return 1 if step < dense_end else 2 if step < dynamic_end else 3

    def remask_steps(self, total_steps: int) -> list[int]:
        """The steps before which masks are (re)computed; empty when the whole run is dense."""
        dense_end, dynamic_end = self.boundaries(total_steps)
        if dense_end >= total_steps:
            return []
        if dynamic_end == dense_end:
            return [dense_end]
        return list(range(dense_end, dynamic_end, self.remask_every))
