"""`train`: one loop for every sparse method, single-process or under torchrun (DDP or FSDP2), with a time budget.

The method swaps layers before the model is wrapped for data parallelism, re-prunes between steps (outside
autocast), and finishes after the last step. With no method it is plain training of every trainable parameter
(dense baselines use the same loop). Every rank must be fed the same number of batches. A time budget stops
all ranks together, at the same step. With `TrainConfig.distill` and a `teacher`, each step's loss also
distills the dense teacher into the model (distill.py). An `on_step` callback (a perplexity curve, say) runs
after each step, and its time is not counted against the budget.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .dist import any_rank, is_distributed, rank, world_size
from .distill import DistillConfig, Distiller
from .methods import SparseMethod

LossFn = Callable[[nn.Module, Any], torch.Tensor]
StepCallback = Callable[[int, float], None]  # (steps done, training seconds so far)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer (AdamW, warm-up then cosine to min_lr_frac * lr), precision, budget, data parallelism, distillation.

    distill: None trains on the loss function alone; a `DistillConfig` adds distillation from the `teacher`
    given to `train` (it costs a second copy of the dense model: see distill.py).
    """

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    min_lr_frac: float = 0.1
    grad_clip: float | None = 1.0
    autocast: str | None = None
    max_seconds: float | None = None
    strategy: str = "auto"
    log_every: int = 10
    progress: bool = True
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("warmup_frac", "min_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {list(AUTOCAST)}, got {self.autocast!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every!r}")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig or None, got {type(self.distill).__name__}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at `step`: linear warm-up, then cosine decay to min_lr_frac."""
        warmup = max(1, round(self.warmup_frac * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What ran: steps done, wall time, why it stopped, logged (step, loss) pairs, and the remask steps."""

    steps: int
    seconds: float
    stopped: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    remask_steps: list[int] = field(default_factory=list)
    world_size: int = 1

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steps_per_second": self.steps_per_second}


def _block_units(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """FSDP units: the items of any nn.ModuleList holding a wrapped layer (any, with no layers), else the layers."""
    wrapped = {id(m) for m in layers}
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units += [b for b in module if not wrapped or any(id(m) in wrapped for m in b.modules())]
    return units or layers


def parallelize(model: nn.Module, method: SparseMethod | None, strategy: str = "auto") -> nn.Module:
    """The module to call for training: the model itself, DDP around it, or the model FSDP2-sharded in place."""
    if strategy == "auto":
        strategy = "ddp" if world_size() > 1 else "none"
    if strategy == "none":
        return model
    if not is_distributed():
        raise ValueError(f"strategy={strategy!r} needs an initialized process group (run under torchrun)")
    device = next(model.parameters()).device
    if strategy == "ddp":  # masks are synced at each remask, so buffers need not be broadcast every step
        ids = [device] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers": False}  # renamed in torch 2.14
        return ddp(model, device_ids=ids, **no_sync)
    from torch.distributed.fsdp import fully_shard

    for unit in _block_units(model, [] if method is None else list(method.layers.values())):
        fully_shard(unit)
    fully_shard(model)
    return model


def train(model: nn.Module, method: SparseMethod | None, batches: Iterable[Any], loss_fn: LossFn,
          config: TrainConfig, finish: bool = True, teacher: nn.Module | None = None,
          on_step: StepCallback | None = None) -> TrainResult:
    """Train `model` in place with `method` for `config.steps` steps (or until the time budget).

    `finish=False` leaves the layers as trained (a dense LoRA reference run keeps no mask); None as the method
    trains every parameter that requires grad, densely. `teacher` (the dense model, on the same device and in
    the same dtype) is required by `config.distill` and refused without it. `on_step(steps_done, seconds)` runs
    after every step; the seconds count training only. Under torch.distributed, let the model go and run
    `gc.collect()` before `destroy_process_group()`: DDP/FSDP wrappers freed after it can abort a gloo rank.
    """
    if method is not None and not isinstance(method, SparseMethod):
        raise TypeError(f"method must be a SparseMethod (SRSTE, StagedLoRA) or None, got {type(method).__name__}")
    if (config.distill is None) != (teacher is None):
        raise ValueError("give both config.distill and teacher= (the dense model) to distill, or neither")
    if teacher is model:
        raise ValueError("teacher must be a separate copy of the dense model, not the model being trained")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable (steps_done, seconds) or None, got {type(on_step).__name__}")
    distiller = None if teacher is None else Distiller(teacher, config.distill)
    if distiller is not None:
        distiller.check_student(model)
    if method is not None:
        method.prepare(model, config.steps)
    runner = parallelize(model, method, config.strategy)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2 replaces parameters
    if not params:
        raise ValueError("the method left no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    result = TrainResult(steps=0, seconds=0.0, stopped="steps", world_size=world_size())
    data = iter(batches)
    model.train()
    device = params[0].device
    dtype = AUTOCAST[config.autocast]
    desc = (type(method).__name__ if method else "dense") + (" + KD" if distiller else "")
    bar = tqdm(range(config.steps), desc=desc, disable=not config.progress or rank() != 0)
    start = time.perf_counter()
    with distiller.attach(model) if distiller else nullcontext():
        for step in bar:
            if config.max_seconds is not None and any_rank(time.perf_counter() - start > config.max_seconds, device):
                result.stopped = "time"
                break
            if method is not None and method.before_step(step, optimizer):
                result.remask_steps.append(step)
            batch = next(data, None)
            if batch is None:
                result.stopped = "data"
                break
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(runner, batch) if distiller is None else distiller.step_loss(loss_fn, runner, batch)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step + 1
            if step % config.log_every == 0 or step == config.steps - 1:
                result.losses.append((step, loss.item()))
                terms = {k: f"{v.item():.4f}" for k, v in distiller.last.items()} if distiller else {}
                bar.set_postfix(loss=f"{result.losses[-1][1]:.4f}", **terms)
            if on_step is not None:
                paused = time.perf_counter()
                on_step(result.steps, paused - start)
                start += time.perf_counter() - paused  # the callback's time is not training time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    if method is not None and finish:
        method.finish()
    return result
