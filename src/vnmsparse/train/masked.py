"""`MaskedLinear`: a dense trainable weight under a V:N:M mask, trained straight-through with SR-STE's decay.

Forward uses W * mask. Backward (SR-STE, Zhou et al. ICLR 2021) passes the gradient of the masked weight to
every entry of W, pruned ones included, and adds decay * (1 - mask) * W, which pulls pruned weights towards
zero so that the mask settles. With no mask (the dense stage) it is an ordinary linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..format import VNMTensor, compress
from ..masks import check_vnm
from ..pattern import VNMPattern
from .dist import full_tensor


class _SRSTE(torch.autograd.Function):
    """W * mask forward; grad + decay * (1 - mask) * W backward (straight through to W)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        if ctx.decay == 0.0:
            return grad, None, None
        return grad + ctx.decay * weight * ~mask, None, None


def srste(weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """W * mask, with the SR-STE gradient: dL/dW = dL/d(W*mask) + decay * (1 - mask) * W."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    return _SRSTE.apply(weight, mask, float(decay))


class MaskedLinear(nn.Module):
    """A linear layer with a dense weight and an optional V:N:M bool mask (a buffer; None means dense)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pattern: VNMPattern | str,
                 decay: float = 2e-4) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        self.out_features, self.in_features = weight.shape
        self.pattern = VNMPattern.parse(pattern)
        self.decay = float(decay)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach())
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        self.register_buffer("mask", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: VNMPattern | str, **kwargs) -> MaskedLinear:
        """Wrap an nn.Linear, sharing its parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, pattern, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.mask is None else srste(self.weight, self.mask, self.decay)
        return F.linear(x, weight, self.bias)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a bool V:N:M mask of the weight's shape."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {(self.out_features, self.in_features)}")
        check_vnm(mask, self.pattern)
        self.mask = mask.to(self.weight.device)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The whole dense weight that masks are scored on and that is kept at the end (gathered under FSDP)."""
        return full_tensor(self.weight)

    @torch.no_grad()
    def to_vnm_tensor(self) -> VNMTensor:
        """The final weight, dense_weight() * mask, compressed (the mask must be set)."""
        if self.mask is None:
            raise ValueError("this layer has no mask yet: set one (or finish training) before compressing")
        weight = self.dense_weight()
        return compress(weight, self.pattern, mask=self.mask.to(weight.device))

    def extra_repr(self) -> str:
        state = "dense" if self.mask is None else "masked"
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, {state}"
