"""Calibration statistics: the per-input-channel mean of x_j^2 seen by each linear layer, via forward hooks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm


class ActivationStats:
    """Running mean of x_j^2 over all tokens fed to one linear layer (`add_batch` per forward)."""

    def __init__(self, in_features: int) -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        self.sum_sq += flat.float().pow(2).sum(dim=0, dtype=torch.float64).cpu()
        self.tokens += flat.shape[0]

    @property
    def act_sq_mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen by this layer")
        return (self.sum_sq / self.tokens).float()


@torch.no_grad()
def collect_act_sq_mean(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str], progress: bool = True
) -> dict[str, torch.Tensor]:
    """Run `batches` (token ids or model inputs) through `model` and return act_sq_mean per named linear."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no modules named {missing[:5]} in the model")
    stats = {n: ActivationStats(modules[n].in_features) for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, s=stats[n]: s.add_batch(args[0])) for n in names]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress, leave=False):
            model(batch.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: s.act_sq_mean for n, s in stats.items()}
