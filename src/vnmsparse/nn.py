"""`VNMLinear`: an nn.Linear whose weight is a V:N:M-compressed `VNMTensor`, run through the vnmsparse op."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ops
from .format import FORMAT_VERSION, VNMTensor, compress
from .pattern import VNMPattern

_BUFFERS = ("values", "columns", "positions")


class VNMLinear(nn.Module):
    """y = x W^T + b with W stored V:N:M-compressed: the GPU kernel where there is one, the reference elsewhere.

    The compressed tensors are buffers (`values`, `columns`, `positions`) and the pattern and logical shape are
    extra state, so `state_dict` / `load_state_dict` round-trip; `weight` is the `VNMTensor` over those buffers.
    """

    def __init__(self, weight: VNMTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, VNMTensor):
            raise TypeError(f"weight must be a VNMTensor, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({self.out_features},), got {getattr(bias, 'shape', bias)!r}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.bias = bias
        for name, tensor in weight.state_tensors().items():
            self.register_buffer(name, tensor)
        self.pattern = weight.pattern
        self._weight = weight

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        pattern: VNMPattern | str,
        scores: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> VNMLinear:
        """Compress an nn.Linear's weight (keeping the highest `scores`, default |W|, or exactly `mask`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return cls(compress(linear.weight.detach(), pattern, mask=mask, scores=scores), bias)

    @property
    def weight(self) -> VNMTensor:
        """The compressed weight (shares storage with the buffers)."""
        return self._weight

    def to_linear(self) -> nn.Linear:
        """An ordinary nn.Linear with the decompressed weight (pruned entries zero), same dtype and device."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self._weight.to_dense())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self._weight, self.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """`.to()`, `.cuda()`, `.half()` replace the buffers; rebuild the `VNMTensor` over the new ones."""
        super()._apply(fn, recurse)
        self._weight = VNMTensor(self.values, self.columns, self.positions, self.pattern, (self.out_features, self.in_features))
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"pattern": str(self.pattern), "shape": [self.out_features, self.in_features], "version": FORMAT_VERSION}

    def set_extra_state(self, state: Any) -> None:
        """Called by `load_state_dict` after the buffers are loaded: check the record, then rebuild `weight`."""
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            raise ValueError(f"VNMLinear extra state must be a dict with version {FORMAT_VERSION!r}, got {state!r}")
        if list(state.get("shape", ())) != [self.out_features, self.in_features]:
            raise ValueError(f"VNMLinear state has shape {state.get('shape')}; this layer is "
                             f"{[self.out_features, self.in_features]}")
        pattern = VNMPattern.parse(state.get("pattern"))
        shape = (self.out_features, self.in_features)
        self._weight = VNMTensor(self.values, self.columns, self.positions, pattern, shape)  # validates first
        self.pattern = pattern

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}")
