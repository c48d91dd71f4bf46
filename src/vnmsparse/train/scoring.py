"""Scorers for re-pruning during training: a callable (layer name, current dense weight) -> importance scores.

`magnitude_scorer` needs nothing else. `RIAScorer` holds each layer's calibration statistic (mean of x_j^2),
collected once before training and averaged over the ranks, so that every rank scores identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..calibrate import collect_act_sq_mean
from ..scores import magnitude_scores, ria_scores
from .dist import all_reduce_mean_

Scorer = Callable[[str, torch.Tensor], torch.Tensor]


def magnitude_scorer(name: str, weight: torch.Tensor) -> torch.Tensor:
    """|W|, whatever the layer."""
    return magnitude_scores(weight)


class RIAScorer:
    """RIA scores from per-layer calibration statistics (fixed for the whole run)."""

    def __init__(self, act_sq_mean: dict[str, torch.Tensor], a: float = 0.5) -> None:
        if not isinstance(act_sq_mean, dict) or not act_sq_mean:
            raise ValueError("act_sq_mean must be a non-empty dict {layer name: (in_features,) tensor}")
        self.act_sq_mean = act_sq_mean
        self.a = a

    @classmethod
    def calibrate(cls, model: nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str], a: float = 0.5,
                  progress: bool = True) -> RIAScorer:
        """Run `batches` through `model`, hook the named linears, and average the statistics over all ranks."""
        names = list(names)
        if not names:
            raise ValueError("names must list at least one linear layer to calibrate")
        stats = collect_act_sq_mean(model, batches, names, progress=progress)
        device = next(model.parameters()).device
        for name, value in stats.items():  # NCCL reduces on the GPU; gloo on the CPU
            stats[name] = all_reduce_mean_(value.to(device)).cpu()
        return cls(stats, a)

    def __repr__(self) -> str:
        return f"RIAScorer(a={self.a}, layers={len(self.act_sq_mean)})"

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.act_sq_mean:
            raise ValueError(f"RIAScorer has no calibration statistic for layer {name!r}; calibrate it with the same names")
        return ria_scores(weight, self.act_sq_mean[name], self.a)


def make_scorer(kind: str, model: nn.Module | None = None, batches: Iterable[torch.Tensor] | None = None,
                names: Iterable[str] = (), a: float = 0.5) -> Scorer:
    """'magnitude', or 'ria' (which needs `model`, calibration `batches` and the layer `names`)."""
    if kind == "magnitude":
        return magnitude_scorer
    if kind == "ria":
        if model is None or batches is None:
            raise ValueError("score='ria' needs a model and calibration batches")
        return RIAScorer.calibrate(model, batches, names, a)
    raise ValueError(f"score must be 'magnitude' or 'ria', got {kind!r}")
