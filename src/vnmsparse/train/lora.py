"""`LoRALinear`: W' = (W + s * B A) * M with W frozen, for three-staged LoRA; and adoption of PEFT's LoRA layers.

The low-rank update is added to W *before* masking, as in the brief, so the layer computes the merged weight
(W + s B A) * M densely each step; the gradient reaching B and A is masked, which a PEFT layer (base(x) +
B(A(x))) cannot express. That is why our own layer is the primary path: `from_peft` converts a PEFT LoRA
model's layers into it, keeping the trained factors, and refuses what cannot be converted exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..pattern import VNMPattern
from .dist import assign_full_, full_tensor
from .masked import MaskedLinear


def init_lora_a(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A's initial value (kaiming-uniform, as nn.Linear and PEFT), from `seed` alone: equal on every rank."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(shape)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class LoRALinear(MaskedLinear):
    """Frozen W (and bias), trainable lora_A (r x C) and lora_B (R x r, zero at start), scaling alpha / r."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: VNMPattern | str, rank: int = 16,
                 alpha: float = 32.0, seed: int = 0) -> None:
        super().__init__(weight, bias, pattern, decay=0.0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(init_lora_a((rank, self.in_features), seed).to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: VNMPattern | str, **kwargs) -> LoRALinear:
        """Wrap an nn.Linear (its parameters become frozen and are shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, pattern, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # B A in the weight's precision: what merge_ keeps
            weight = self.weight + self.scaling * (self.lora_B @ self.lora_A)
        if self.mask is not None:
            weight = weight * self.mask
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W + s B A, whole (gathered under FSDP): what masks are scored on and what is kept at the end."""
        return full_tensor(self.weight) + self.scaling * (full_tensor(self.lora_B) @ full_tensor(self.lora_A))

    @torch.no_grad()
    def merge_(self, fresh_seed: int | None = None) -> None:
        """W <- W + s B A and B <- 0, so the output is unchanged; with `fresh_seed`, A is drawn anew from it."""
        assign_full_(self.weight, self.dense_weight())
        assign_full_(self.lora_B, torch.zeros(self.out_features, self.rank, device=self.weight.device))
        if fresh_seed is not None:
            assign_full_(self.lora_A, init_lora_a((self.rank, self.in_features), fresh_seed).to(self.weight.device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _peft_lora_layer_type() -> type | None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _check_peft_layer(name: str, layer: nn.Module) -> str:
    """The single active adapter of a PEFT LoRA layer that converts exactly; ValueError otherwise."""
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"{name}: PEFT layer holds adapters {adapters}; merge or delete all but one first")
    adapter = adapters[0]
    if not isinstance(layer.get_base_layer(), nn.Linear):
        raise ValueError(f"{name}: only LoRA on nn.Linear converts (got {type(layer.get_base_layer()).__name__})")
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{name}: DoRA adapters are not supported; use plain LoRA")
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        raise ValueError(f"{name}: lora_dropout must be 0 (dropout inside B(A(x)) cannot be masked as (W + BA) * M)")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name}: fan_in_fan_out=True (Conv1D-style weights) is not supported")
    if getattr(layer, "merged", False):
        raise ValueError(f"{name}: the adapter is merged into the base weight; unmerge it first")
    return adapter


def from_peft(model: nn.Module, pattern: VNMPattern | str) -> list[str]:
    """Replace every PEFT LoRA layer in `model` with a `LoRALinear` holding the same W, A, B and scaling.

    Returns the converted layer names. The PEFT wrapper object keeps working (it calls into the replaced
    modules). Multiple adapters, DoRA, LoRA dropout, merged adapters and non-Linear bases are refused.
    """
    layer_type = _peft_lora_layer_type()
    if layer_type is None:
        return []
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_type)]
    converted = []
    for name, layer in found:
        adapter = _check_peft_layer(name, layer)
        base = layer.get_base_layer()
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        rank = A.shape[0]
        new = LoRALinear(base.weight, base.bias, pattern, rank=rank, alpha=layer.scaling[adapter] * rank)
        with torch.no_grad():
            new.lora_A.copy_(A)
            new.lora_B.copy_(B)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        converted.append(name)
    return converted
