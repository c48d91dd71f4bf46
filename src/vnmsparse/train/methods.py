"""Sparse training methods: what to wrap, what to train, when to re-prune, and how to finish.

A method is driven by `train.loop.train` in three calls: `prepare(model, total_steps)` before the model is
wrapped for DDP/FSDP (swaps the chosen nn.Linear layers and returns the parameters to train),
`before_step(step, optimizer)` outside autocast before every step (re-prunes per the `MaskSchedule`), and
`finish()` after the last step (final masks in place, factors merged). `SRSTE` is masked full fine-tuning;
`StagedLoRA` (staged.py) is the brief's three-staged LoRA.

Masks are identical on every rank: scores come from whole (gathered) weights that are equal on all ranks,
with calibration statistics averaged over the ranks, and rank 0's mask is then broadcast as the guarantee.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..format import VNMTensor
from ..masks import vnm_mask
from ..nn import VNMLinear
from ..pattern import VNMPattern
from ..sparsify import DEFAULT_EXCLUDE
from .dist import broadcast_
from .masked import MaskedLinear
from .schedule import MaskSchedule
from .scoring import Scorer, magnitude_scorer

LinearFilter = Callable[[nn.Module, str], bool]  # (module, name), as sparsify's filter_fn


def default_filter(module: nn.Module, name: str) -> bool:
    """Every nn.Linear that `sparsify` would prune by default: heads and embeddings stay dense."""
    return type(module) is nn.Linear and not any(re.fullmatch(r, name) for r in DEFAULT_EXCLUDE)


@dataclass
class SparseMethod:
    """Shared machinery: the pattern, the schedule, the scorer, and the wrapped layers by name."""

    pattern: VNMPattern | str
    schedule: MaskSchedule = field(default_factory=MaskSchedule)
    scorer: Scorer = magnitude_scorer
    filter_fn: LinearFilter = default_filter
    layers: dict[str, MaskedLinear] = field(default_factory=dict, init=False, repr=False)
    total_steps: int = field(default=0, init=False, repr=False)
    remask_at: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    remasks: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pattern = VNMPattern.parse(self.pattern)
        if not isinstance(self.schedule, MaskSchedule):
            raise TypeError(f"schedule must be a MaskSchedule, got {type(self.schedule).__name__}")
        if not callable(self.scorer):
            raise TypeError("scorer must be callable (layer name, weight) -> scores")

    # --- hooks for subclasses ---------------------------------------------------------------------
    def wrap(self, name: str, linear: nn.Linear) -> MaskedLinear:
        """The trainable replacement of one selected linear layer."""
        raise NotImplementedError

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the optimizer updates (after wrapping)."""
        raise NotImplementedError

    def before_remask(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Called just before masks are recomputed (StagedLoRA merges its factors here)."""

    # --- driven by the loop ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, total_steps: int) -> list[nn.Parameter]:
        """Swap the selected linears for masked ones; returns the parameters to train."""
        if self.layers:
            raise ValueError("this method was already prepared on a model; build a new one per run")
        self.remask_at = frozenset(self.schedule.remask_steps(total_steps))  # validates total_steps too
        self.total_steps = total_steps
        self.layers = self._adopt(model)
        if not self.layers:
            raise ValueError("no linear layer was selected: check filter_fn (or the model has no nn.Linear)")
        return self.trainable(model)

    def selected(self, model: nn.Module) -> list[str]:
        """Names of the layers `prepare` would wrap (calibrate RIA on these)."""
        return [n for n, m in model.named_modules() if n and self.filter_fn(m, n)]

    def _adopt(self, model: nn.Module) -> dict[str, MaskedLinear]:
        layers = {}
        for name in self.selected(model):
            layers[name] = self.wrap(name, model.get_submodule(name))
            model.set_submodule(name, layers[name])
        return layers

    def before_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Re-prune when the schedule says so; True when masks were recomputed before this step."""
        if step not in self.remask_at:
            return False
        self.remask(optimizer)
        return True

    @torch.no_grad()
    def remask(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Score every wrapped layer's whole dense weight, build V:N:M masks, and install rank 0's."""
        self.before_remask(optimizer)
        for name, layer in self.layers.items():
            weight = layer.dense_weight()
            mask = vnm_mask(self.scorer(name, weight), self.pattern)
            layer.set_mask(broadcast_(mask.to(weight.device)))
        self.remasks += 1

    def finish(self) -> None:
        """Leave every layer with its final mask (computing one if training never reached the sparse stages)."""
        if any(layer.mask is None for layer in self.layers.values()):
            self.remask(None)

    def masks(self) -> dict[str, torch.Tensor]:
        """The current mask of every wrapped layer (None entries are layers still dense)."""
        return {name: layer.mask for name, layer in self.layers.items()}

    def export(self) -> dict[str, VNMTensor]:
        """The final compressed weight of every wrapped layer, whole on every rank (call `finish` first)."""
        return {name: layer.to_vnm_tensor() for name, layer in self.layers.items()}

    @torch.no_grad()
    def convert(self, model: nn.Module) -> nn.Module:
        """Replace every wrapped layer of `model` by a `VNMLinear` holding exactly dense_weight() * mask.

        For an unsharded model (single process, or the module inside DDP); under FSDP use `export()`.
        """
        modules = dict(model.named_modules())
        for name, layer in self.layers.items():
            if isinstance(layer.weight, DTensor):
                raise ValueError(f"layer {name!r} is FSDP-sharded; use export() for whole compressed weights")
            if modules.get(name) is not layer:
                raise ValueError(f"model has no wrapped layer {name!r}: convert the model this method prepared")
        for name, layer in self.layers.items():
            if layer.mask is None:
                raise ValueError(f"layer {name!r} has no mask yet: finish training (method.finish()) first")
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = nn.Parameter(layer.dense_weight(), requires_grad=False)
            if layer.bias is not None:
                linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
            model.set_submodule(name, VNMLinear.from_linear(linear, self.pattern, mask=layer.mask))
        return model


@dataclass
class SRSTE(SparseMethod):
    """Masked full fine-tuning: every parameter trains; wrapped weights get SR-STE's decay on pruned entries."""

    schedule: MaskSchedule = field(default_factory=lambda: MaskSchedule(dense_frac=0.0, dynamic_frac=0.5, remask_every=20))
    decay: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or self.decay < 0:
            raise ValueError(f"decay must be a number >= 0, got {self.decay!r}")

    def wrap(self, name: str, linear: nn.Linear) -> MaskedLinear:
        return MaskedLinear.from_linear(linear, self.pattern, decay=self.decay)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]
