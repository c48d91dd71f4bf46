"""Knowledge distillation from the dense model: a frozen teacher run on the student's own inputs, and its loss.

    config = TrainConfig(steps=1000, distill=DistillConfig(weight=0.9, temperature=1.0))
    train(student, StagedLoRA("64:2:5"), batches, lm_loss, config, teacher=dense)

The loss of a step is (1 - weight) * task + weight * T^2 * KL(teacher || student) over the output distributions
(every token of a causal LM, every image of a classifier), plus `hidden_weight` times the mean over the blocks of
the relative MSE between the student's and the teacher's block outputs. The teacher is called from a forward hook
on the student with the very arguments the student got (minus `labels`), inside the same autocast, under
`torch.no_grad`; it is never trained. The task loss is left to the caller's loss function, which needs no change.

Memory: a second copy of the dense weights (the teacher, in the student's dtype: 0.5 GB for SmolLM2-135M in
fp32, 13.5 GB for a 7B model in bf16, a full copy on every rank under DDP or FSDP), the teacher's activations
of one forward without gradients (freed layer by layer), and its logits plus two float32 log-softmax tensors of
batch x tokens x vocabulary (16 x 512 x 49,152 is 1.6 GB each). Leave `TrainConfig.distill` at None where that
does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import output_hidden, find_blocks


@dataclass(frozen=True)
class DistillConfig:
    """How much of the loss is distillation, at which temperature, and whether block outputs are matched.

    weight:        share of the KL term; the task loss gets 1 - weight (1.0: distillation only).
    temperature:   both distributions are softened by T and the KL is scaled by T^2 (Hinton et al.), so the
                   gradient's size does not depend on T.
    hidden_weight: weight of the block-output term, added on top (0: off, and no block hooks are installed).
    blocks:        the nn.ModuleList of blocks whose outputs are matched (None: found from the linear layers).
    """

    weight: float = 0.9
    temperature: float = 1.0
    hidden_weight: float = 0.0
    blocks: str | None = None

    def __post_init__(self) -> None:
        for name in ("weight", "temperature", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"DistillConfig.{name} must be a number, got {value!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"DistillConfig.weight must be in [0, 1], got {self.weight!r}")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature!r}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"DistillConfig.hidden_weight must be >= 0, got {self.hidden_weight!r}")
        if self.blocks is not None and not isinstance(self.blocks, str):
            raise TypeError(f"DistillConfig.blocks must be a module name or None, got {self.blocks!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over every distribution (all but the last dim).

    Zero exactly when the two distributions agree; computed in float32 whatever the logits' dtype.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ||s - t||^2 / ||t||^2 (MSE relative to the teacher's mean square, so that blocks with
    large activations do not outweigh the rest)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need one student and one teacher output per block, got {len(student)} and {len(teacher)}")
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def _logits(output: Any) -> torch.Tensor:
    """A model output's logits: the tensor itself, or `.logits` (Hugging Face outputs)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"distillation needs the model to return logits (a tensor or an object with .logits), "
                        f"got {type(output).__name__}")
    return logits


class Distiller:
    """The frozen teacher, hooked to one student for one run; `step_loss` is a step's loss with distillation."""

    def __init__(self, teacher: nn.Module, config: DistillConfig) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        self.teacher, self.config = teacher.eval(), config  # it runs under no_grad: its flags are left as they are
        self._armed = False
        self._student_logits: list[torch.Tensor] = []
        self._teacher_logits: list[torch.Tensor] = []
        self._hidden: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        self.last: dict[str, torch.Tensor] = {}  # the last step's loss terms (detached), for logging

    def check_student(self, student: nn.Module) -> None:
        """The teacher must sit on the student's device, in its dtype (the brief's "same dtype, same batch")."""
        s, t = _first_float(student), _first_float(self.teacher)
        if s is None or t is None:
            raise ValueError("distillation needs floating-point parameters in both the student and the teacher")
        if s.device != t.device or s.dtype != t.dtype:
            raise ValueError(f"the teacher must be on the student's device and in its dtype: student {s.device} {s.dtype}, "
                             f"teacher {t.device} {t.dtype}")

    def _blocks(self, model: nn.Module) -> list[nn.Module]:
        name = self.config.blocks
        if name is None:
            name = find_blocks(self.teacher, [n for n, m in self.teacher.named_modules() if isinstance(m, nn.Linear)])
            if name is None:
                raise ValueError("DistillConfig.hidden_weight > 0 needs a stack of blocks; none was found, name it in "
                                 "DistillConfig.blocks")
        try:
            return list(model.get_submodule(name))
        except (AttributeError, TypeError):
            raise ValueError(f"DistillConfig.blocks: no module list {name!r} in the model") from None

    @contextmanager
    def attach(self, student: nn.Module) -> Iterator[None]:
        """Hook the student (and, with block matching, both models' blocks) for the duration of a run."""
        self.check_student(student)
        hooks = [student.register_forward_hook(self._on_student, with_kwargs=True)]
        if self.config.hidden_weight > 0:
            student_blocks, teacher_blocks = self._blocks(student), self._blocks(self.teacher)
            if len(student_blocks) != len(teacher_blocks):
                raise ValueError(f"student has {len(student_blocks)} blocks, the teacher {len(teacher_blocks)}")
            hooks += [b.register_forward_hook(self._record("student")) for b in student_blocks]
            hooks += [b.register_forward_hook(self._record("teacher")) for b in teacher_blocks]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _record(self, who: str) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            if self._armed:
                self._hidden[who].append(output_hidden(output))
        return hook

    def _on_student(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._armed:
            return
        if self._student_logits:
            raise ValueError("distillation expects one forward of the model per step; the loss function ran it twice")
        self._student_logits.append(_logits(output))
        with torch.no_grad():
            teacher_out = self.teacher(*args, **{k: v for k, v in kwargs.items() if k != "labels"})
        self._teacher_logits.append(_logits(teacher_out).detach())

    def step_loss(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], runner: nn.Module, batch: Any) -> torch.Tensor:
        """`loss_fn(runner, batch)` mixed with the distillation terms of that same forward."""
        self._armed = True
        try:
            task = loss_fn(runner, batch)
        finally:
            self._armed = False
        student, teacher = self._student_logits, self._teacher_logits
        hidden_s, hidden_t = self._hidden["student"], self._hidden["teacher"]
        self._student_logits, self._teacher_logits = [], []
        self._hidden = {"student": [], "teacher": []}
        if not student:
            raise ValueError("the loss function never called the model it was given; distillation needs that forward")
        c = self.config
        kd = kd_loss(student[0], teacher[0], c.temperature)
        loss = (1 - c.weight) * task + c.weight * kd
        self.last = {"task": task.detach(), "kd": kd.detach()}
        if c.hidden_weight > 0:
            hidden = hidden_loss(hidden_s, hidden_t)
            loss = loss + c.hidden_weight * hidden
            self.last["hidden"] = hidden.detach()
        return loss


def _first_float(model: nn.Module) -> torch.Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)
