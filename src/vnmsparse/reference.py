"""The plain-torch V:N:M linear: the CPU path and the oracle every kernel is tested against."""

from __future__ import annotations

import torch

from .format import VNMTensor


def vnm_linear(x: torch.Tensor, weight: VNMTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W_sparse.T (+ bias), nn.Linear semantics, any leading dims of x.

    Decompresses W and runs a dense matmul in x's dtype: simple and exactly the function the kernels
    must compute, not fast.
    """
    if not isinstance(weight, VNMTensor):
        raise TypeError(f"weight must be a VNMTensor, got {type(weight).__name__}")
    check_input(x, bias, *weight.shape)
    return dense_linear(x, weight.to_dense(), bias)


def dense_linear(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference matmul itself, on the decompressed weight (pruned entries zero) in x's dtype and device: what
    `vnm_linear` runs, and the op's CPU implementation on a weight unpacked from its kernel layout."""
    return torch.nn.functional.linear(x, dense.to(device=x.device, dtype=x.dtype), None if bias is None else bias.to(x.dtype))


def check_input(x: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int) -> None:
    """What nn.Linear refuses, refused with a message: x a floating-point tensor of at least one dim ending in
    in_features (an integer x would otherwise be multiplied by a weight cast to integers: zeros), bias a tensor of
    shape (out_features,) or None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (as for nn.Linear), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have at least one dim and last dim in_features={in_features}, got shape {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
