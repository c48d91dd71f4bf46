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
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("x must be a torch.Tensor with at least one dimension")
    R, C = weight.shape
    if x.shape[-1] != C:
        raise ValueError(f"x's last dim must be in_features={C}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (R,):
        raise ValueError(f"bias must have shape ({R},), got {tuple(bias.shape)}")
    dense = weight.to_dense().to(device=x.device, dtype=x.dtype)
    return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
