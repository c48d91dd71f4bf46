"""`recover(student, teacher, train_chunks, calib_chunks, config)`: train a dense causal LM copy into a V:N:M one.

The verb behind `vnm recover` and the recovery arms of bench/accuracy.py. The student starts as a copy of the
dense model (the dense weights are what the dynamic-mask stage re-scores); the method prunes, trains and re-prunes
it, and at the end its layers are `VNMLinear`s holding exactly the trained weights under the final masks.

Default: three-staged LoRA with distillation from the dense teacher. In the accuracy benchmark three-staged
LoRA reached a lower perplexity than SR-STE at equal GPU time at both 64:2:5 and 64:2:8, and it trains only the
factors, so its optimizer state stays small next to the teacher's copy of the weights that distillation adds. A `minutes` budget is turned into a step count by timing a few
steps on a throwaway copy first, so that the learning-rate decay and the mask stages end inside the budget.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .pattern import VNMPattern
from .train import SRSTE, DistillConfig, MaskSchedule, RIAScorer, StagedLoRA, TrainConfig, TrainResult, default_filter, train
from .train.loop import StepCallback
from .train.methods import SparseMethod
from .train.scoring import Scorer, magnitude_scorer

METHODS = ("lora3", "srste")
SCORES = ("ria", "magnitude")
DEFAULT_LR = {"lora3": 1e-3, "srste": 1e-4}
PROBE_STEPS = 8  # steps timed on a throwaway copy when only a time budget is given, after two of warm-up
PROBE_SHARE = 0.1  # ... but the probe stops after this share of the budget (one step at least)
BUDGET_MARGIN = 0.95  # plan steps for this share of the budget (remasks and the clock stop the rest)


@dataclass(frozen=True)
class RecoverConfig:
    """How to recover: method, distillation, budget, optimizer and batch.

    method:   "lora3" (three-staged LoRA: W frozen, rank-`rank` factors trained; default) or "srste" (every
              weight trained under SR-STE masks).
    distill:  distillation from the dense teacher (None: language-model loss only; saves the teacher's memory).
    steps:    steps to plan; None plans from `minutes` (timed on a throwaway copy).
    minutes:  wall-clock budget of training (None: `steps` alone stops it). At least one of the two is needed.
    lr:       None takes the method's default (1e-3 for the LoRA factors, 1e-4 for SR-STE's full weights).
    score:    how masks are chosen while training: "ria" (calibration statistics of the dense model) or "magnitude".
    autocast: "bf16" on a GPU; None (float32) on the CPU.
    """

    pattern: VNMPattern | str
    method: str = "lora3"
    distill: DistillConfig | None = field(default_factory=DistillConfig)
    steps: int | None = None
    minutes: float | None = 10.0
    lr: float | None = None
    rank: int = 64
    alpha: float = 64.0
    batch_size: int = 16
    score: str = "ria"
    a: float = 0.5
    autocast: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", VNMPattern.parse(self.pattern))
        if self.method not in METHODS:
            raise ValueError(f"RecoverConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.score not in SCORES:
            raise ValueError(f"RecoverConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise TypeError(f"RecoverConfig.distill must be a DistillConfig or None, got {type(self.distill).__name__}")
        if self.steps is None and self.minutes is None:
            raise ValueError("RecoverConfig needs a budget: steps, minutes, or both")
        for name in ("steps", "rank", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RecoverConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("minutes", "lr", "alpha"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                      or math.isinf(value)):
                raise ValueError(f"RecoverConfig.{name} must be a finite number > 0, got {value!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass
class RecoverResult:
    """What ran: the method (its layers now converted), the steps planned and how, the loop's config and result."""

    method: SparseMethod
    planned_steps: int
    planned_from: str  # "steps" or "minutes (probe: X s/step)"
    config: TrainConfig
    train: TrainResult


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM on a batch of token ids."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def chunk_batches(chunks: torch.Tensor, batch_size: int, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of whole chunks (a new order each epoch, from `seed`); short last batches dropped."""
    if len(chunks) < batch_size:
        raise ValueError(f"batch_size {batch_size} is more than the {len(chunks)} training chunks")
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(chunks), generator=g).split(batch_size):
            if len(idx) == batch_size:
                yield chunks[idx].to(device, non_blocking=True)


def make_method(config: RecoverConfig, scorer: Scorer, layers: Sequence[str] | None = None) -> SparseMethod:
    """The sparse method `config` asks for, wrapping the named layers (None: every layer `sparsify` prunes)."""
    selected = None if layers is None else frozenset(layers)

    def chosen(module: nn.Module, name: str) -> bool:
        return default_filter(module, name) if selected is None else name in selected and isinstance(module, nn.Linear)

    if config.method == "srste":
        schedule = MaskSchedule(dense_frac=0.0, dynamic_frac=0.5, remask_every=50)
        return SRSTE(config.pattern, schedule=schedule, scorer=scorer, filter_fn=chosen)
    return StagedLoRA(config.pattern, schedule=MaskSchedule(), scorer=scorer, filter_fn=chosen, rank=config.rank,
                      alpha=config.alpha, seed=config.seed)


def _train_config(config: RecoverConfig, steps: int, progress: bool) -> TrainConfig:
    return TrainConfig(steps=steps, lr=config.learning_rate, autocast=config.autocast, progress=progress,
                       max_seconds=None if config.minutes is None else 60.0 * config.minutes, distill=config.distill)


def seconds_per_step(student: nn.Module, teacher: nn.Module | None, train_chunks: torch.Tensor, config: RecoverConfig,
                     scorer: Scorer, layers: Sequence[str] | None) -> float:
    """The median time of a step on a throwaway copy of the student, over `PROBE_STEPS` steps after two of warm-up
    (first calls, optimizer state creation), so that one slow step does not shrink the plan. The probe stops
    after `PROBE_SHARE` of the budget (slow CPU steps), and then uses the steps it has. It holds a second copy
    of the student while it runs."""
    probe = copy.deepcopy(student)
    times: list[float] = []
    batches = chunk_batches(train_chunks, config.batch_size, config.seed + 1, next(student.parameters()).device)
    limit = PROBE_SHARE * 60.0 * config.minutes
    train(probe, make_method(config, scorer, layers), batches, lm_loss,
          replace(_train_config(config, PROBE_STEPS + 2, progress=False), max_seconds=limit), finish=False,
          teacher=teacher if config.distill else None, on_step=lambda _step, seconds: times.append(seconds))
    del probe
    steps = [b - a for a, b in zip([0.0, *times], times)]  # each step's own time
    return statistics.median(steps[2:] or steps[1:] or steps)


def recover(student: nn.Module, teacher: nn.Module | None, train_chunks: torch.Tensor, calib_chunks: torch.Tensor | None,
            config: RecoverConfig, layers: Sequence[str] | None = None, on_step: StepCallback | None = None) -> RecoverResult:
    """Train `student` (a dense copy of `teacher`) in place into V:N:M and convert its layers to `VNMLinear`.

    train_chunks: (n, seq_len) token ids of the training text; calib_chunks: those RIA is calibrated on (a few
    training chunks; None with score="magnitude"). `teacher` is needed when `config.distill` is set. `layers`
    names the linears to prune (default: every one `sparsify` prunes).
    """
    if not isinstance(config, RecoverConfig):
        raise TypeError(f"config must be a RecoverConfig, got {type(config).__name__}")
    if config.distill is not None and teacher is None:
        raise ValueError("config.distill needs the dense teacher; pass teacher= or set distill=None")
    if config.score == "ria" and calib_chunks is None:
        raise ValueError("score='ria' needs calib_chunks (token ids from the training text)")
    device = next(student.parameters()).device
    if config.score == "ria":
        names = make_method(config, magnitude_scorer, layers).selected(student)
        scorer = RIAScorer.calibrate(student, calib_chunks.to(device).split(config.batch_size), names, config.a,
                                     progress=False)
    else:
        scorer = magnitude_scorer
    steps, planned_from = config.steps, "steps"
    if steps is None:
        per_step = seconds_per_step(student, teacher, train_chunks, config, scorer, layers)
        steps = max(1, int(BUDGET_MARGIN * 60.0 * config.minutes / per_step))
        planned_from = f"minutes (probe: {per_step:.3f} s/step)"
    method = make_method(config, scorer, layers)
    batches = chunk_batches(train_chunks, config.batch_size, config.seed, device)
    train_config = _train_config(config, steps, config.progress)
    result = train(student, method, batches, lm_loss, train_config, teacher=teacher if config.distill else None,
                   on_step=on_step)
    method.convert(student)
    return RecoverResult(method, steps, planned_from, train_config, result)
