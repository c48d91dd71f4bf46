"""Three-staged LoRA (the brief): W' = (W + s B A) * M, with W frozen and only B, A trained.

1. dense LoRA warm-up (M = 1);
2. sparse LoRA with dynamic masks: every `remask_every` steps the masks are recomputed from W + s B A;
3. sparse LoRA with fixed masks for the rest (>= 90% of the steps by default).

At each remask the factors are either
- "fresh" (default): B A is merged into W, B <- 0 and A is drawn anew, and their optimizer state is cleared.
  The output is unchanged at the merge, the merged update is kept exactly, and each dynamic interval gets a new
  rank-r subspace, so the total update can exceed rank r (as in ReLoRA). This is the brief's "merged into W
  before re-pruning".
- "kept": nothing is merged; the masks are scored on W + s B A and the same factors and Adam moments continue.
  One rank-r update for the whole run, and no optimizer restart.
bench/accuracy.py measures both. At the end B A is merged for good and the layers hold W * M.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import LoRALinear, from_peft
from .masked import MaskedLinear
from .methods import SparseMethod
from .schedule import MaskSchedule

FACTOR_MODES = ("fresh", "kept")


@dataclass
class StagedLoRA(SparseMethod):
    """Three-staged LoRA over the selected linears (or over a PEFT model's LoRA layers, converted)."""

    schedule: MaskSchedule = field(default_factory=MaskSchedule)
    rank: int = 16
    alpha: float = 32.0
    factors: str = "fresh"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factors not in FACTOR_MODES:
            raise ValueError(f"factors must be one of {FACTOR_MODES}, got {self.factors!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")

    def _adopt(self, model: nn.Module) -> dict[str, MaskedLinear]:
        """Convert a PEFT model's LoRA layers if there are any (the user chose the targets); else wrap by filter."""
        converted = from_peft(model, self.pattern)
        if converted:
            return {name: model.get_submodule(name) for name in converted}
        return super()._adopt(model)

    def wrap(self, name: str, linear: nn.Linear) -> MaskedLinear:
        return LoRALinear.from_linear(linear, self.pattern, rank=self.rank, alpha=self.alpha, seed=self._layer_seed(name))

    def _layer_seed(self, name: str, generation: int = 0) -> int:
        """A seed from (run seed, layer name, remask count): equal on every rank, different per layer."""
        digest = hashlib.sha256(f"{self.seed}:{name}:{generation}".encode()).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Only the LoRA factors; everything else in the model is frozen."""
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for layer in self.layers.values():
            for p in (layer.lora_A, layer.lora_B):
                p.requires_grad_(True)
                params.append(p)
        return params

    def before_remask(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.factors == "kept":
            return
        for name, layer in self.layers.items():
            layer.merge_(fresh_seed=self._layer_seed(name, self.remasks + 1))
            if optimizer is not None:
                for p in (layer.lora_A, layer.lora_B):
                    optimizer.state.pop(p, None)

    def finish(self) -> None:
        """Final masks in place, then B A merged into W for good (B = 0), so the layer holds exactly W * M."""
        super().finish()
        for layer in self.layers.values():
            layer.merge_()
